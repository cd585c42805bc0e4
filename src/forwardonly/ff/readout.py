"""A linear softmax readout fitted on the frozen activities of a trained FF network.

Hinton's unsupervised protocol (arXiv 2212.13345, Section 3.2): after Forward-Forward has
trained the layers, a linear softmax classifier reads the length-normalized activities of the
last hidden layers (``FFNet.features``). The head an :class:`~forwardonly.ff.ForwardForward`
run trains alongside the layers chases moving features; this module fits it again on the
final ones, by full-batch L-BFGS on the L2-regularized cross-entropy

    min_W,b  (1/N) Σ_i CE(W f_i + b, y_i) + (λ/2) ‖W‖²

— for λ > 0 a strictly convex problem with one minimizer, which :func:`choose_weight_decay`
picks λ for on a held-out part of the *training* set (the test set plays no part). (With
λ = 0 and separable features there is no minimizer; the fit then stops at ``max_iter``.)

Refitting changes the softmax readout (``FFNet.readout_logits``, which is ``model(x)`` when
``readout="softmax"``); a supervised net predicting by goodness keeps its predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from forwardonly.ff.network import FFNet


@torch.no_grad()
def readout_features(model: FFNet, x: Tensor, batch_size: int = 1000) -> Tensor:
    """The readout's input for images ``x`` (N, C, H, W): (N, F) normalized activities
    (neutral label when supervised), computed in batches."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    out = None
    for start, xb in zip(range(0, len(x), batch_size), x.split(batch_size), strict=True):
        f = model.features(model.activities(model.neutral(model.flatten(xb.to(device)))))
        if out is None:  # filled in place: no second copy of an (N, F) matrix
            out = torch.empty(len(x), f.shape[1], dtype=f.dtype, device=device)
        out[start:start + len(f)] = f
    model.train(was_training)
    if out is None:
        raise ValueError("readout_features needs at least one image")
    return out


def fit_linear_softmax(features: Tensor, targets: Tensor, num_classes: int, *,
                       weight_decay: float, max_iter: int = 300,
                       tolerance: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Minimize the regularized cross-entropy above by L-BFGS; returns ``(W (K, F), b (K,))``.

    Starts from zero (the objective is convex, so the start only affects the time).
    """
    if features.dim() != 2 or targets.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (N, F) and targets (N,), got {tuple(features.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    dtype, device = features.dtype, features.device
    w = torch.zeros(num_classes, features.shape[1], dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=tolerance, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(features @ w.t() + b, targets)
        loss = loss + 0.5 * weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def readout_error(features: Tensor, targets: Tensor, w: Tensor, b: Tensor) -> float:
    """Fraction of rows whose largest score under ``(w, b)`` is not the target."""
    return float(((features @ w.t() + b).argmax(1) != targets).float().mean())


def choose_weight_decay(features: Tensor, targets: Tensor, num_classes: int,
                        candidates: Sequence[float], held_out: int
                        ) -> tuple[float, dict[float, float]]:
    """The λ of ``candidates`` with the lowest error on the last ``held_out`` rows when fitted
    on the others; returns ``(λ, {λ: held-out error})`` (ties go to the larger λ)."""
    if not 0 < held_out < len(targets):
        raise ValueError(
            f"held_out must be between 1 and {len(targets) - 1} rows, got {held_out}"
        )
    if not candidates:
        raise ValueError("give at least one weight-decay candidate")
    fit_x, fit_y = features[:-held_out], targets[:-held_out]
    val_x, val_y = features[-held_out:], targets[-held_out:]
    errors: dict[float, float] = {}
    for lam in candidates:
        w, b = fit_linear_softmax(fit_x, fit_y, num_classes, weight_decay=lam)
        errors[lam] = readout_error(val_x, val_y, w, b)
    best = min(sorted(candidates, reverse=True), key=lambda lam: errors[lam])
    return best, errors


def refit_head(model: FFNet, x: Tensor, y: Tensor, *, candidates: Sequence[float] =
               (1e-5, 1e-4, 1e-3, 1e-2), held_out: int | None = None) -> dict[str, Any]:
    """Refit ``model.head`` on the frozen features of the training images ``x``, ``y``:
    λ chosen on the last ``held_out`` of them (default: a sixth, at most 10,000), then the
    head fitted on all. Returns ``{"weight_decay": λ, "held_out": rows,
    "held_out_errors": {λ: error}}``; ``model.head`` holds the new readout.
    """
    if held_out is None:
        held_out = min(10_000, len(y) // 6)
    feats = readout_features(model, x)
    lam, errors = choose_weight_decay(feats, y, model.num_classes, candidates, held_out)
    w, b = fit_linear_softmax(feats, y, model.num_classes, weight_decay=lam)
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
    return {"weight_decay": lam, "held_out": held_out, "held_out_errors": errors}
