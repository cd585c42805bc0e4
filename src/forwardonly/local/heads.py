"""The linear heads: each trains on its own exact gradient (one linear layer, no backprop
into the network), and hands the loss's gradient w.r.t. its input features back to the
caller — the only signal the forward-gradient estimators need from the loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..estimators.base import set_grad
from ..models.local_mixer import Head

LossFn = Callable[[Tensor, Tensor], Tensor]


def head_step(head: Head, feats: Tensor, targets: Tensor, loss_fn: LossFn, *,
              fill_grad: bool = True) -> tuple[Tensor, Tensor]:
    """Loss of ``head(feats)`` and ``∂L/∂feats``; writes the head's exact gradient.

    Arguments:
        head: the linear head; ``feats``: ``(B, C)`` features (treated as constants).
        loss_fn: ``loss_fn(logits, targets) -> scalar`` (a mean over the batch).
        fill_grad: write ``∂L/∂W`` and ``∂L/∂b`` into the head's ``.grad``.

    Returns:
        ``(loss, dfeats)``: the detached scalar loss and ``(B, C)`` ``∂L/∂feats``.
    """
    f = feats.detach().requires_grad_()
    with torch.enable_grad():
        logits = head(f)
        loss = loss_fn(logits, targets)
        params = [p for p in (head.weight, head.bias) if p.requires_grad] if fill_grad else []
        grads = torch.autograd.grad(loss, [f, *params])
    for p, g in zip(params, grads[1:], strict=True):
        set_grad(p, g)
    return loss.detach(), grads[0]
