"""Weight perturbation on LocalMixer: LG-FG-W (local losses) and FG-W with exact heads.

Ren, Kornblith, Liao, Hinton (ICLR 2023), Table 3's LG-FG-W. Per block (stop-gradient in
between), draw ``Ẇ_k, ḃ_k ~ N(0, I)`` for every weight of the block (K directions); one
forward pass carrying the tangents ``ż = a Ẇ + ḃ + ȧ W`` gives the derivatives of the
replicated losses ``d_k[b, p, g]`` in closed form (:mod:`forwardonly.local.replicated`).
The weights that produce the channels of group ``g`` (a column block of a dense layer, the
``g``-th block of the grouped layer) use ``c_k[g] = Σ_{b,p} d_k[b, p, g]``; the token-mixing
weights, which feed every group, use ``Σ_g c_k[g]``:

    g_W = (1/K) Σ_k c_k[group of W's output] Ẇ_k

This follows the paper's definition. It is unbiased for the grouped layer; for a dense
layer whose output LayerNorm runs over all C channels, a weight of group ``g`` also moves
the other groups' normalized outputs a little (through the LN's mean and variance), which
``c_k[g]`` leaves out — a small bias, of order 1/G.

``fg-w-mixer`` is the paper's global FG-W on LocalMixer: the same weight tangents for every
backbone layer, pushed through all blocks to the model's loss; one directional derivative
``d_k`` per direction (the perturbation is shared by the batch) and ``g = (1/K) Σ_k d_k Ẇ_k``.
Unlike the generic ``fg-w``, which perturbs every parameter, the heads train on their exact
gradients, as in the paper's code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..autodiff import DirectionSampler, LossFn, block_forward, ln_jvp, ln_stats
from ..local.replicated import pooled_features, replicated_derivatives
from ..models.local_mixer import MixerLayer
from .base import register
from .local_losses import LocalLosses, stats


@register("lg-fg-w")
class LocalWeightPerturbation(LocalLosses):
    """LG-FG-W: weight perturbation with block × patch × group local losses.

    Arguments: see :class:`LocalLosses`; ``directions``: K per step."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, directions: int = 1,
                 seed: int = 0, freeze_backbone: bool = False) -> None:
        super().__init__(model, loss_fn, seed=seed, freeze_backbone=freeze_backbone)
        if int(directions) < 1:
            raise ValueError(f"directions must be a positive integer, got {directions}")
        self.directions = int(directions)

    @torch.no_grad()
    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        if self.freeze_backbone:
            return self.heads_only(inputs, targets)
        model, k, g = self.mixer, self.directions, self.mixer.groups
        sampler = DirectionSampler("gaussian", self.step_seed())
        drawn: dict[int, tuple[Tensor, Tensor]] = {}

        def weight_tangent(index: int, layer: MixerLayer) -> tuple[Tensor, Tensor]:
            drawn[index] = _draw(sampler, index, layer, k)
            return drawn[index]

        h = model.patchify(inputs)
        local = []
        index = 0
        for i, block in enumerate(model.blocks):
            out, tout, _ = block_forward(block, h, None, first_index=index,
                                         weight_tangent=weight_tangent)
            feats, mean, rstd = pooled_features(out, g)
            loss, dfeats = self.head_step(model.heads[i], feats, targets)
            assert tout is not None
            c = replicated_derivatives(out, mean, rstd, dfeats, tout, g,
                                       overwrite=True).sum(dim=(1, 2)).div_(k)  # (K, G)
            del tout
            for j, layer in enumerate(block.layers):
                wd, bd = drawn.pop(index + j)
                gw, gb = _combine(layer, wd, bd, c)
                self.set_param_grad(layer.weight, gw)
                self.set_param_grad(layer.bias, gb)
            index += len(block.layers)
            local.append(loss)
            h = out
        loss = self.final_head_step(h, targets)
        return stats(loss, local)


def _combine(layer: MixerLayer, wd: Tensor, bd: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``Σ_k c_k[group of the output] Ẇ_k`` for the weight and the bias of ``layer``."""
    k, g = c.shape
    if layer.kind == "token":  # feeds every group of its patch
        ct = c.sum(-1)
        return torch.tensordot(ct, wd, dims=1), torch.tensordot(ct, bd, dims=1)
    if layer.kind == "dense":  # (C_in, C_out): output columns in G groups
        n_in, n_out = wd.shape[1:]
        gw = (wd.view(k, n_in, g, n_out // g) * c.view(k, 1, g, 1)).sum(0).view(n_in, n_out)
        gb = (bd.view(k, g, n_out // g) * c.view(k, g, 1)).sum(0).view(n_out)
        return gw, gb
    gw = (wd * c.view(k, g, 1, 1)).sum(0)  # (G, C_in/G, C_out/G)
    gb = (bd * c.view(k, g, 1)).sum(0)
    return gw, gb


@register("fg-w-mixer")
class MixerWeightPerturbation(LocalWeightPerturbation):
    """FG-W on LocalMixer as in the paper: backbone weights perturbed against the global
    loss, heads on their exact gradients."""

    @torch.no_grad()
    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        if self.freeze_backbone:
            return self.heads_only(inputs, targets)
        model, k = self.mixer, self.directions
        sampler = DirectionSampler("gaussian", self.step_seed())
        drawn: dict[int, tuple[MixerLayer, Tensor, Tensor]] = {}

        def weight_tangent(index: int, layer: MixerLayer) -> tuple[Tensor, Tensor]:
            wd, bd = _draw(sampler, index, layer, k)
            drawn[index] = (layer, wd, bd)
            return wd, bd

        h, th = model.patchify(inputs), None
        local = []
        index = 0
        for i, block in enumerate(model.blocks):
            h, th, _ = block_forward(block, h, th, first_index=index,
                                     weight_tangent=weight_tangent)
            index += len(block.layers)
            local.append(self.block_head_step(i, h, targets))
        assert th is not None
        pooled = h.mean(dim=1)  # final features f = LN(mean_p h)
        feats, mean, rstd = ln_stats(pooled, 1)
        loss, dfeats = self.head_step(model.final_head, feats, targets)
        dpooled = ln_jvp(pooled, mean, rstd, dfeats, 1)  # (B, C)
        d = (th.mean(dim=2) * dpooled).sum(dim=(1, 2)).div_(k)  # (K,): shared by the batch
        del th
        for layer, wd, bd in drawn.values():
            self.set_param_grad(layer.weight, torch.tensordot(d, wd, dims=1))
            self.set_param_grad(layer.bias, torch.tensordot(d, bd, dims=1))
        return stats(loss, local, dir_deriv_rms=float(d.pow(2).mean().sqrt() * k))


def _draw(sampler: DirectionSampler, index: int, layer: MixerLayer, k: int
          ) -> tuple[Tensor, Tensor]:
    """K tangents for the weight and the bias of layer ``index``, both from its generator."""
    w, b = layer.weight, layer.bias
    gen = sampler.generator(index, w.device)
    return sampler.draw(gen, (k, *w.shape), w), sampler.draw(gen, (k, *b.shape), b)
