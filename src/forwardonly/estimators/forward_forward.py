"""``--method ff``: Hinton's Forward-Forward as an estimator (arXiv 2212.13345).

One ``step(x, y)`` trains every layer of an :class:`~forwardonly.ff.network.FFNet` at once on
the mini-batch, each from its own local objective only:

1. Build positives and negatives. Supervised: the image with its true label written in, and
   the image with a wrong label — random, or "hard": drawn from the softmax readout of a
   neutral-label pass with the true class excluded. Unsupervised: the plain image, and a
   hybrid of two images (:mod:`forwardonly.ff.negatives`).
2. One forward pass over positives and negatives stacked (2B rows; with random negatives
   and a head to train, the B neutral-label rows ride along). The first layer multiplies
   each image once for all its label variants (:mod:`forwardonly.ff.first_layer`). In layer
   ``l`` with normalized input ``x̂`` (2B, n_in) and activity ``h = relu(x̂ Wᵀ + b)``
   (2B, n), the layer loss ``L_l(G(h⁺), G(h⁻))`` of :mod:`forwardonly.ff.goodness` has the
   exact gradient::

       δ = ∂L_l/∂z = (∂L_l/∂G) · c·h        (c = 2, or 2/n for mean goodness; h = 0 where z ≤ 0)
       ∂L_l/∂W = δᵀ x̂,   ∂L_l/∂b = Σ_rows δ

   computed in closed form, with no autograd graph: ``x̂`` is a constant for layer ``l``, so
   no gradient crosses a layer boundary (each layer's update is the exact gradient of its
   own one-layer objective, nothing more). Rows with ``|∂L_l/∂G| < 1e-24``, which a float32
   sum could not feel, count as 0, so no subnormal numbers slow the products.
3. Optional peer normalization (Hinton's reference code): a running mean ``m_j`` of each
   unit's positive-pass activity, and ``λ(m_j − mean(m))/B`` added to ``δ`` on positive rows,
   which pulls every unit's mean activity towards its layer's average, reviving dead units.
4. The linear softmax ``head`` is trained on the detached normalized activities (neutral
   label pass, or the positive pass when unsupervised) with ``loss_fn`` — autograd through
   that one linear layer only.

``.grad`` of every trainable parameter is filled; any ``torch.optim`` optimizer then steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..autodiff import LossFn
from ..ff.first_layer import (
    ImagePart,
    image_part,
    labelled_preactivation,
    labelled_weight_grad,
)
from ..ff.goodness import (
    LossKind,
    check_loss_kind,
    default_threshold,
    ff_loss,
    ff_loss_and_grad,
    goodness,
    goodness_slope,
)
from ..ff.labels import label_codes, write_codes
from ..ff.negatives import hard_wrong_labels, hybrid_images, random_wrong_labels
from ..ff.network import FFNet, affine, rms_normalize
from .base import Estimator, register, set_grad

NEGATIVES = ("random", "hard", "hybrid")
PEER_MOMENTUM = 0.9  # running-mean decay of peer normalization, as in Hinton's code
# |∂L/∂G| of a row below this is taken as 0: beside any row still learning, its share of the
# layer's gradient is far below float32 resolution, and its products δ = ∂L/∂G·c·h would be
# subnormal numbers, which x86 CPUs compute many times slower (`python -m benchmarks ff-speed`
# times the plain FF step with and without them flushed).
NEGLIGIBLE = 1e-24


class _Batch(NamedTuple):
    """One step's rows: ``size`` positives, then ``size`` negatives, then maybe neutral rows.

    Supervised: ``inputs`` are the B images and ``codes`` (R, K) the label codes of the R
    rows (the first layer multiplies the image part once, :mod:`forwardonly.ff.first_layer`);
    ``part`` is that shared product when a neutral pass already computed it. Unsupervised:
    ``inputs`` are the R stacked rows themselves and ``codes`` is None. The head learns from
    rows ``head_rows`` of the same pass, or from ``head_feats`` computed beforehand (the
    neutral pass that picked hard negatives), or not at all.
    """

    inputs: Tensor  # (B, D) supervised, (R, D) unsupervised
    codes: Tensor | None  # (R, K), R = 2B or 3B
    size: int  # B
    part: ImagePart | None = None
    head_rows: tuple[int, int] | None = None
    head_feats: Tensor | None = None

    def rows(self) -> Tensor:
        """The stacked input rows (R, D), materialized."""
        return self.inputs if self.codes is None else write_codes(self.inputs, self.codes)


@register("ff")
class ForwardForward(Estimator):
    """Forward-Forward training of an :class:`FFNet`; see the module docstring.

    Arguments:
        model: an ``FFNet`` (``--model ff-mlp``).
        loss_fn: loss of the softmax readout, ``loss_fn(logits, targets)``; cross-entropy.
        seed: seed of the negatives (wrong labels, hybrid masks), mixed with the step index.
        threshold: goodness threshold θ of every layer; default: the layer width for sum
            goodness, 1 for mean goodness (mean square activity 1 per unit).
        temperature: T in the logit ``(G − θ)/T``.
        loss: ``"softplus"`` (threshold logistic loss) or ``"symmetric"`` (``G⁺ − G⁻``).
        negatives: ``"random"`` or ``"hard"`` wrong labels (supervised), ``"hybrid"``
            images (unsupervised); default ``"hard"`` / ``"hybrid"`` by the model's mode.
        peer_weight: λ of peer normalization (0 turns it off).
        blur_steps: blur rounds of the hybrid-image masks.
    """

    def __init__(
        self,
        model: FFNet,
        loss_fn: LossFn = F.cross_entropy,
        *,
        seed: int = 0,
        threshold: float | None = None,
        temperature: float = 1.0,
        loss: LossKind = "softplus",
        negatives: str | None = None,
        peer_weight: float = 0.03,
        blur_steps: int = 10,
    ) -> None:
        if not isinstance(model, FFNet):
            raise TypeError(
                "the 'ff' method trains a Forward-Forward network: build the model with "
                f"--model ff-mlp (forwardonly.ff.FFNet), got {type(model).__name__}"
            )
        super().__init__(model, loss_fn, seed=seed)
        check_loss_kind(loss)
        if temperature <= 0:
            raise ValueError(f"temperature (--ff-temperature) must be > 0, got {temperature}")
        if peer_weight < 0:
            raise ValueError(f"peer_weight (--ff-peer-weight) must be >= 0, got {peer_weight}")
        if blur_steps < 0:
            raise ValueError(f"blur_steps (--ff-blur-steps) must be >= 0, got {blur_steps}")
        negatives = negatives or ("hard" if model.supervised else "hybrid")
        if negatives not in NEGATIVES:
            raise ValueError(
                f"negatives (--ff-negatives) must be one of 'random', 'hard', 'hybrid', got "
                f"{negatives!r}"
            )
        if (negatives == "hybrid") == model.supervised:
            need = "'random' or 'hard'" if model.supervised else "'hybrid'"
            raise ValueError(
                f"a {model.mode} FF network takes negatives={need} (--ff-negatives), got "
                f"{negatives!r}; hybrid-image negatives go with mode='unsupervised' (--ff-mode), "
                "wrong-label negatives with mode='supervised'"
            )
        self.model: FFNet = model
        self.negatives = negatives
        self.loss_kind: LossKind = loss
        self.temperature = float(temperature)
        self.peer_weight = float(peer_weight)
        self.blur_steps = int(blur_steps)
        self.thresholds = [
            float(threshold)
            if threshold is not None
            else default_threshold(model.goodness, layer.out_features)
            for layer in model.layers
        ]
        # The head is needed to pick hard negatives or to classify; otherwise skip its pass.
        self.train_head = model.readout == "softmax" or negatives == "hard"

    # -- one step --------------------------------------------------------------------
    @torch.no_grad()
    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        gen = torch.Generator(device=inputs.device).manual_seed(self.step_seed())
        cast = self._cast_parameters()
        batch = self._build_batch(inputs, targets, gen, cast)
        layer_losses, pair_errors, feats = self._layer_updates(batch, cast)
        stats = {"loss": float(layer_losses.sum()), "pair_error": float(pair_errors.mean())}
        for i, value in enumerate(layer_losses.tolist()):
            stats[f"loss_layer{i}"] = value
        if batch.head_feats is not None:
            feats = batch.head_feats
        if self.train_head:
            stats["readout_loss"] = float(self._train_head(feats, targets))
        else:
            for p in self.model.head.parameters():
                if p.requires_grad:
                    set_grad(p, torch.zeros_like(p))
        return stats

    def local_objectives(self, inputs: Tensor, targets: Tensor) -> list[Tensor]:
        """The per-layer FF losses of the next step, as autograd scalars (a slow reference).

        Same positives and negatives as the next :meth:`step` draws (nothing is advanced);
        each layer's input is detached, so ``losses[l].backward()`` reaches layer ``l`` only.
        Without peer normalization (``ff_peer_weight=0``) the gradients :meth:`step` writes
        equal these losses' autograd gradients.
        """
        net = self.model
        gen = torch.Generator(device=inputs.device).manual_seed(self.step_seed())
        with torch.no_grad():
            batch = self._build_batch(inputs, targets, gen, self._cast_parameters())
            h = batch.rows()  # (R, D), the embedded images themselves
        B = batch.size
        losses = []
        for i, layer in enumerate(net.layers):
            h = layer(h.detach())  # (R, n)
            g_pos = goodness(h[:B], net.goodness)
            g_neg = goodness(h[B : 2 * B], net.goodness)
            losses.append(
                ff_loss(
                    g_pos,
                    g_neg,
                    threshold=self.thresholds[i],
                    temperature=self.temperature,
                    kind=self.loss_kind,
                )
            )
        return losses

    def _cast_parameters(self) -> list[tuple[Tensor, Tensor]]:
        """Each layer's (weight, bias) in its compute dtype, cast once per step.

        float32 layers get their own parameters back (no copy).
        """
        return [
            (layer.weight.to(layer.dtype), layer.bias.to(layer.dtype))
            for layer in self.model.layers
        ]

    def _build_batch(
        self,
        inputs: Tensor,
        targets: Tensor,
        gen: torch.Generator,
        cast: list[tuple[Tensor, Tensor]],
    ) -> _Batch:
        """Positives, negatives (and maybe neutral rows for the head) for one pass."""
        net = self.model
        B, K = inputs.shape[0], net.num_classes
        flat = net.flatten(inputs)  # (B, D)
        if not net.supervised:
            neg = hybrid_images(inputs, blur_steps=self.blur_steps, generator=gen)
            return _Batch(torch.cat([flat, net.flatten(neg)]), None, B, head_rows=(0, B))

        def codes(labels: Tensor | None) -> Tensor:
            return label_codes(labels, B, K, net.label_scale, device=flat.device).to(flat.dtype)

        if self.negatives == "hard":
            part = image_part(net.layers[0], flat, K, weight=cast[0][0])
            h, _ = labelled_preactivation(net.layers[0], part, codes(None))
            acts = [h.clamp_min_(0.0)]
            for layer, (w, b) in zip(net.layers[1:], cast[1:], strict=True):
                x_hat = layer.prepare(acts[-1]).to(layer.dtype)
                acts.append(affine(x_hat, w, b, layer.dtype).clamp_min_(0.0))
            feats = net.features(acts)  # (B, F), neutral-label activities
            wrong = hard_wrong_labels(net.head(feats), targets, gen)
            stacked = torch.cat([codes(targets), codes(wrong)])
            return _Batch(flat, stacked, B, part=part, head_feats=feats)
        wrong = random_wrong_labels(targets, K, gen)
        parts = [codes(targets), codes(wrong)]
        if not self.train_head:
            return _Batch(flat, torch.cat(parts), B)
        parts.append(codes(None))  # neutral rows ride along for the head
        return _Batch(flat, torch.cat(parts), B, head_rows=(2 * B, 3 * B))

    def _layer_updates(
        self, batch: _Batch, cast: list[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Forward the batch's rows through all layers, writing each layer's local gradient.

        Returns per-layer losses (L,), per-layer pair errors (L,) — the fraction of negatives
        at least as good as their positive — and the head features of ``batch.head_rows``
        (empty if None).
        """
        net = self.model
        B, head_rows, codes = batch.size, batch.head_rows, batch.codes
        losses, pair_errors, feats = [], [], []
        h = batch.inputs
        for i, layer in enumerate(net.layers):
            labelled = codes if i == 0 else None  # (R, K) codes of the first layer's rows
            if labelled is not None:
                part = batch.part or image_part(
                    layer, batch.inputs, net.num_classes, weight=cast[0][0]
                )
                z, inv_r = labelled_preactivation(layer, part, labelled)  # (R, n), (R, 1)
            else:
                x_hat = layer.prepare(h).to(layer.dtype)  # (R, n_in), a constant for layer i
                z = affine(x_hat, *cast[i], layer.dtype)  # (R, n)
            h = z.clamp_min_(0.0)
            h_pos, h_neg = h[:B], h[B : 2 * B]
            g_pos, g_neg = goodness(h_pos, net.goodness), goodness(h_neg, net.goodness)
            loss, d_pos, d_neg = ff_loss_and_grad(
                g_pos,
                g_neg,
                threshold=self.thresholds[i],
                temperature=self.temperature,
                kind=self.loss_kind,
            )
            slope = goodness_slope(net.goodness, layer.out_features)
            coef = torch.cat([d_pos, d_neg]).mul_(slope)  # (2B,) = ∂L/∂G · c
            coef.masked_fill_(coef.abs() < NEGLIGIBLE, 0.0)
            delta = h[: 2 * B] * coef.unsqueeze(1)  # (2B, n) = ∂L/∂z
            if self.peer_weight > 0:
                m = layer.mean_activity  # (n,)
                m.mul_(PEER_MOMENTUM).add_(h_pos.mean(0), alpha=1.0 - PEER_MOMENTUM)
                delta[:B] += (self.peer_weight / B) * (m - m.mean())
            if layer.weight.requires_grad:
                out = _grad_buffer(layer.weight)
                if labelled is not None:
                    grad_w = labelled_weight_grad(
                        layer, part, labelled[: 2 * B], inv_r[: 2 * B], delta, out=out
                    )
                elif layer.dtype == torch.float32:
                    grad_w = torch.mm(delta.t(), x_hat[: 2 * B], out=out)  # (n, n_in)
                else:
                    grad_w = (delta.to(layer.dtype).t() @ x_hat[: 2 * B]).float()
                if out is None:
                    layer.weight.grad = grad_w
                elif grad_w is not out:
                    out.copy_(grad_w)
            if layer.bias.requires_grad:
                out = _grad_buffer(layer.bias)
                grad_b = torch.sum(delta, 0, out=out)  # (n,)
                if out is None:
                    layer.bias.grad = grad_b
            losses.append(loss)
            pair_errors.append((g_neg >= g_pos).float().mean())
            if head_rows is not None and i >= net.readout_from:
                feats.append(rms_normalize(h[head_rows[0] : head_rows[1]]))
        head_feats = torch.cat(feats, dim=1) if feats else h.new_empty(0)
        return torch.stack(losses), torch.stack(pair_errors), head_feats

    def _train_head(self, feats: Tensor, targets: Tensor) -> Tensor:
        """Fill the head's grads from ``loss_fn(head(feats), targets)``; feats are constants.

        Returns the loss, detached.
        """
        head = self.model.head
        params = [p for p in head.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self.loss_fn(head(feats.detach()), targets)
            if params:
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads, strict=True):
                    set_grad(p, g)
        return loss.detach()


def _grad_buffer(param: Tensor) -> Tensor | None:
    """``param.grad`` when a float32 result can be written straight into it, else None."""
    grad = param.grad
    if grad is None or grad.dtype != torch.float32 or not grad.is_contiguous():
        return None
    return grad
