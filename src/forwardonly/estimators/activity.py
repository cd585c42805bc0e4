"""Activity perturbation (FG-A), with one global loss or with local losses (LG-FG-A).

Ren, Kornblith, Liao, Hinton — *Scaling Forward Gradient With Local Losses* (ICLR 2023,
arXiv 2210.03310), Sections 3–4. Instead of weights, perturb the pre-activations: after
every layer's output LayerNorm (before the residual and the ReLU) add a tangent ``u`` with
``E[u uᵀ] = I`` (Gaussian or ±1; K of them, batched). One forward pass carrying the tangents
gives the directional derivative ``d = ∇_y L · u`` of every loss that sees the unit, and

    g_y = (1/K) Σ_k d_k u_k ⊙ [ReLU active],   g_z = J_LNᵀ g_y,   g_W = aᵀ g_z

is computed *inside the layer* from ``g_y`` and the layer's own input ``a``: no gradient
crosses a layer boundary. ``E[u uᵀ] = I`` makes ``g_y`` unbiased for ``∂L/∂y`` (the mask
only zeroes entries whose true gradient is zero). Activity perturbation needs q random
numbers per example for a ``p × q`` layer instead of ``pq``: per Table 1 its variance is
``p`` times lower than weight perturbation's.

- ``fg-a``: the model's own loss (final head on the last block), the tangents of every layer
  flowing through all blocks and residuals; ``d`` is per example (an example's tangent
  only changes its own loss term).
- ``lg-fg-a``: stop-gradient between blocks; the derivatives ``d`` come from the block ×
  patch × group *replicated* local losses (:mod:`forwardonly.local.replicated`), so a unit
  of patch ``p`` and group ``g`` uses ``d_{p,g}``, which mixes only the tangents of units that
  feed that (patch, group); the token-mixing units of patch ``p`` feed every group of ``p``
  and use ``Σ_g d_{p,g}``. One block is alive at a time.

Block heads and the final head train on their exact gradients. ``predict`` is the final
head's scores (as in the paper's code). ``fg-a`` also runs on plain ``nn.Sequential`` MLPs.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..autodiff import (
    ACTIVITY_DISTRIBUTIONS,
    DirectionSampler,
    LayerTrace,
    LossFn,
    NoiseFn,
    activity_forward,
    activity_weight_grads,
    block_forward,
    check_distribution,
    ln_jvp,
    ln_stats,
    sequential_layers,
)
from ..local.replicated import pooled_features, replicated_derivatives
from ..models.local_mixer import LocalMixer
from .base import register, set_grad
from .local_losses import LocalLosses, stats


class _ActivityBase(LocalLosses):
    """Arguments: see :class:`LocalLosses`; ``directions``: K tangents per step
    (one batched pass); ``distribution``: of the tangents, ``"gaussian"`` (the paper's,
    default) or ``"rademacher"`` (±1: lower variance, and much cheaper to draw) — see
    :meth:`forwardonly.autodiff.DirectionSampler.noise`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, directions: int = 1,
                 distribution: str = "gaussian", seed: int = 0,
                 freeze_backbone: bool = False) -> None:
        super().__init__(model, loss_fn, seed=seed, freeze_backbone=freeze_backbone)
        if int(directions) < 1:
            raise ValueError(f"directions must be a positive integer, got {directions}")
        check_distribution(distribution, ACTIVITY_DISTRIBUTIONS)
        self.directions = int(directions)
        self.distribution = distribution

    def write_layer_grads(self, trace: LayerTrace, coef: Tensor) -> None:
        gw, gb = activity_weight_grads(trace, coef)
        self.set_param_grad(trace.layer.weight, gw)
        self.set_param_grad(trace.layer.bias, gb.reshape(trace.layer.bias.shape))

    def noise(self) -> NoiseFn:
        """This step's activity tangents: layer ``i`` from ``mix_seed(step seed, i)``."""
        sampler = DirectionSampler(self.distribution, self.step_seed(),
                                   valid=ACTIVITY_DISTRIBUTIONS)
        return sampler.noise(self.directions)


@register("lg-fg-a")
class LocalActivityPerturbation(_ActivityBase):
    """LG-FG-A: activity perturbation with block × patch × group local losses."""

    @torch.no_grad()
    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        if self.freeze_backbone:
            return self.heads_only(inputs, targets)
        model, k, g = self.mixer, self.directions, self.mixer.groups
        noise = self.noise()
        h = model.patchify(inputs)
        local = []
        index = 0
        for i, block in enumerate(model.blocks):
            out, tout, traces = block_forward(block, h, None, first_index=index, noise=noise)
            index += len(block.layers)
            feats, mean, rstd = pooled_features(out, g)
            loss, dfeats = self.head_step(model.heads[i], feats, targets)
            assert tout is not None
            free = all(t.u is not tout for t in traces)  # no trace keeps tout as its u
            dl = replicated_derivatives(out, mean, rstd, dfeats, tout, g,
                                        overwrite=free).div_(k)  # (K, B, P, G)
            del tout
            per_group = dl.unsqueeze(-1)               # units of one (patch, group)
            per_patch = dl.sum(-1, keepdim=True).unsqueeze(-1)  # token-mixing units
            while traces:  # release each layer's trace once its gradient is written
                trace = traces.pop()
                coef = per_patch if trace.layer.kind == "token" else per_group
                self.write_layer_grads(trace, coef)
                del trace
            local.append(loss)
            h = out
        loss = self.final_head_step(h, targets)
        return stats(loss, local)


@register("fg-a")
class ActivityPerturbation(_ActivityBase):
    """FG-A: activity perturbation of every layer against the model's global loss.

    Works on a :class:`LocalMixer` and on plain ``nn.Sequential`` MLPs (the ``mlp`` model:
    tangents on every hidden pre-activation, the last Linear trained exactly; see
    :meth:`mlp_estimate`).
    """

    supports_sequential = True

    @torch.no_grad()
    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        if not isinstance(self.model, LocalMixer):
            return self.mlp_estimate(inputs, targets)
        if self.freeze_backbone:
            return self.heads_only(inputs, targets)
        model, k = self.mixer, self.directions
        noise = self.noise()
        h, th = model.patchify(inputs), None
        traces: list[LayerTrace] = []
        local = []
        index = 0
        for i, block in enumerate(model.blocks):
            h, th, block_traces = block_forward(block, h, th, first_index=index, noise=noise)
            index += len(block.layers)
            traces += block_traces
            local.append(self.block_head_step(i, h, targets))
        assert th is not None
        # final features f = LN(mean_p h); ∂L/∂(mean_p h) = J_LN ∂L/∂f (per example)
        pooled = h.mean(dim=1)
        feats, mean, rstd = ln_stats(pooled, 1)
        loss, dfeats = self.head_step(model.final_head, feats, targets)
        dpooled = ln_jvp(pooled, mean, rstd, dfeats, 1)            # (B, C)
        d = (th.mean(dim=2) * dpooled).sum(-1).div_(k)             # (K, B)
        del th
        coef = d.view(k, -1, 1, 1, 1)
        while traces:
            trace = traces.pop()
            self.write_layer_grads(trace, coef)
            del trace
        return stats(loss, local, dir_deriv_rms=float(d.pow(2).mean().sqrt() * k))

    def mlp_estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        """FG-A on an ``nn.Sequential`` MLP: tangents ``u`` on every hidden pre-activation
        (:func:`forwardonly.autodiff.activity_forward`), the last Linear (the head) on its
        exact gradient. With ``d[k, b]`` the per-example derivatives through the head,

            g_z = (1/K) Σ_k d_k u_k [⊙ (z > 0) for ReLU],   g_W = g_zᵀ x,   g_b = Σ_b g_z.
        """
        k = self.directions
        layers = [m for _, m in sequential_layers(self.model) or []]
        head = cast(nn.Linear, layers[-1])  # activity_rule_error checked it in __init__
        h, th, traces = activity_forward(layers[:-1], inputs, self.noise())
        logits = F.linear(h, head.weight, head.bias)
        with torch.enable_grad():
            lg = logits.detach().requires_grad_()
            loss = self.loss_fn(lg, targets)
            (dlogits,) = torch.autograd.grad(loss, lg)  # (B, classes), the batch mean's
        if head.weight.requires_grad:
            set_grad(head.weight, dlogits.t() @ h)
        if head.bias is not None and head.bias.requires_grad:
            set_grad(head.bias, dlogits.sum(0))
        if th is None:
            d = torch.zeros(k, inputs.shape[0], dtype=logits.dtype, device=logits.device)
        else:
            d = (torch.matmul(th, head.weight.t()) * dlogits).sum(-1).div_(k)  # (K, B)
        for t in traces:
            w, b = t.linear.weight, t.linear.bias
            if self.freeze_backbone:
                gz = torch.zeros(t.x.shape[0], w.shape[0], dtype=w.dtype, device=w.device)
            else:
                gz = (t.u * d.unsqueeze(-1)).sum(0)
                if t.mask is not None:
                    gz = gz * t.mask
            if w.requires_grad:
                set_grad(w, gz.t() @ t.x)
            if b is not None and b.requires_grad:
                set_grad(b, gz.sum(0))
        return {"loss": float(loss.detach()), "dir_deriv_rms": float(d.pow(2).mean().sqrt() * k)}
