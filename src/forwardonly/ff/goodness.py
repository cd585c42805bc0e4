"""Goodness and the layer-local Forward-Forward objective (Hinton 2022, arXiv 2212.13345).

A layer's *goodness* for one example is the sum (or mean) of its squared ReLU activities::

    G(h) = Σ_j h_j²            ("sum", Hinton's choice)
    G(h) = (1/n) Σ_j h_j²      ("mean")

Each layer is trained to make ``G`` high on positive (real) data and low on negative data.

Losses, with θ the threshold and T the temperature (both per layer):

* ``"softplus"`` — logistic regression of "real vs fake" on the logit ``(G − θ)/T``::

      L = 1/(2B) Σ_i [ softplus(−(G⁺_i − θ)/T) + softplus((G⁻_i − θ)/T) ]

  i.e. the mean binary cross-entropy over the 2B positive and negative examples, with
  ``p(real) = σ((G − θ)/T)``. With sum goodness, θ = layer width and T = 1 its gradient
  equals, sign aside, the update of Hinton's reference code.
* ``"symmetric"`` — the threshold-free "positive minus negative goodness" loss on pairs
  (SymBa, Lee & Song 2023)::

      L = 1/B Σ_i softplus(−(G⁺_i − G⁻_i)/T)

:func:`ff_loss` computes the loss with autograd-capable ops (the reference);
:func:`ff_loss_and_grad` returns the loss together with its closed-form derivatives
``∂L/∂G⁺`` and ``∂L/∂G⁻``, which the estimator chains by hand through ``G`` and the ReLU
(``∂G/∂h = 2h`` or ``2h/n``), so no autograd graph is built during training.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

GoodnessKind = Literal["sum", "mean"]
LossKind = Literal["softplus", "symmetric"]
GOODNESS_KINDS: tuple[str, ...] = ("sum", "mean")
LOSS_KINDS: tuple[str, ...] = ("softplus", "symmetric")


def check_goodness_kind(kind: str) -> None:
    if kind not in GOODNESS_KINDS:
        raise ValueError(f"ff_goodness must be one of 'sum', 'mean', got {kind!r}")


def check_loss_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"ff_loss must be one of 'softplus', 'symmetric', got {kind!r}")


def goodness(h: Tensor, kind: GoodnessKind = "sum") -> Tensor:
    """Goodness of each row: ``(B, n) -> (B,)``, sum or mean of squared activities."""
    if kind == "sum":
        return h.square().sum(dim=-1)
    if kind == "mean":
        return h.square().mean(dim=-1)
    check_goodness_kind(kind)
    raise AssertionError("unreachable")


def goodness_slope(kind: GoodnessKind, width: int) -> float:
    """The constant ``c`` in ``∂G/∂h = c·h``: 2 for sum goodness, 2/width for mean."""
    check_goodness_kind(kind)
    return 2.0 if kind == "sum" else 2.0 / width


def default_threshold(kind: GoodnessKind, width: int) -> float:
    """Hinton's threshold: mean squared activity 1 per unit (θ = width for sum goodness)."""
    check_goodness_kind(kind)
    return float(width) if kind == "sum" else 1.0


def ff_loss(
    g_pos: Tensor,
    g_neg: Tensor,
    *,
    threshold: float,
    temperature: float = 1.0,
    kind: LossKind = "softplus",
) -> Tensor:
    """The layer loss (scalar) from goodness of positives ``(B,)`` and negatives ``(B',)``.

    For ``"symmetric"`` the two must pair up one to one (``B == B'``); ``threshold`` is unused.
    """
    if kind == "softplus":
        logit_pos = (g_pos - threshold) / temperature
        logit_neg = (g_neg - threshold) / temperature
        total = F.softplus(-logit_pos).sum() + F.softplus(logit_neg).sum()
        return total / (g_pos.numel() + g_neg.numel())
    if kind == "symmetric":
        _check_pairs(g_pos, g_neg)
        return F.softplus(-(g_pos - g_neg) / temperature).mean()
    check_loss_kind(kind)
    raise AssertionError("unreachable")


def ff_loss_and_grad(
    g_pos: Tensor,
    g_neg: Tensor,
    *,
    threshold: float,
    temperature: float = 1.0,
    kind: LossKind = "softplus",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, ∂L/∂G⁺ (B,), ∂L/∂G⁻ (B',))`` in closed form; same ``L`` as :func:`ff_loss`.

    softplus: ``∂L/∂G⁺_i = −σ(−(G⁺_i − θ)/T) / (T·N)``, ``∂L/∂G⁻_i = σ((G⁻_i − θ)/T) / (T·N)``
    with N = B + B'. symmetric: with ``d_i = (G⁺_i − G⁻_i)/T``,
    ``∂L/∂G⁺_i = −σ(−d_i)/(T·B) = −∂L/∂G⁻_i``.
    """
    if kind == "softplus":
        n = g_pos.numel() + g_neg.numel()
        logit_pos = (g_pos - threshold) / temperature
        logit_neg = (g_neg - threshold) / temperature
        loss = (F.softplus(-logit_pos).sum() + F.softplus(logit_neg).sum()) / n
        d_pos = torch.sigmoid(-logit_pos).mul_(-1.0 / (temperature * n))
        d_neg = torch.sigmoid(logit_neg).mul_(1.0 / (temperature * n))
        return loss, d_pos, d_neg
    if kind == "symmetric":
        _check_pairs(g_pos, g_neg)
        margin = (g_pos - g_neg) / temperature
        loss = F.softplus(-margin).mean()
        d_pos = torch.sigmoid(-margin).mul_(-1.0 / (temperature * g_pos.numel()))
        return loss, d_pos, -d_pos
    check_loss_kind(kind)
    raise AssertionError("unreachable")


def _check_pairs(g_pos: Tensor, g_neg: Tensor) -> None:
    if g_pos.shape != g_neg.shape:
        raise ValueError(
            "the symmetric FF loss compares each positive with its own negative, so it needs "
            f"as many negatives as positives; got {tuple(g_pos.shape)} and {tuple(g_neg.shape)}"
        )
