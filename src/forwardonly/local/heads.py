"""The linear heads: each trains on its own exact gradient (one linear layer, no backprop
into the network), and hands the loss's gradient w.r.t. its input features back to the
caller — the only signal the forward-gradient estimators need from the loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..autodiff import LossFn
from ..models.local_mixer import Head


def head_step(head: Head, feats: Tensor, targets: Tensor, loss_fn: LossFn, *,
              head_grads: bool = True
              ) -> tuple[Tensor, Tensor, list[tuple[nn.Parameter, Tensor]]]:
    """Loss of ``head(feats)``, ``∂L/∂feats`` and the head's exact gradient.

    Arguments:
        head: the linear head; ``feats``: ``(B, C)`` features (treated as constants).
        loss_fn: ``loss_fn(logits, targets) -> scalar`` (a mean over the batch).
        head_grads: also return ``∂L/∂W`` and ``∂L/∂b`` of the head's trainable parameters.

    Returns:
        ``(loss, dfeats, grads)``: the detached scalar loss, ``(B, C)`` ``∂L/∂feats``, and
        ``(parameter, gradient)`` pairs for the caller to write into ``.grad``.
    """
    f = feats.detach().requires_grad_()
    with torch.enable_grad():
        logits = head(f)
        loss = loss_fn(logits, targets)
        params = [p for p in (head.weight, head.bias) if p.requires_grad] if head_grads else []
        grads = torch.autograd.grad(loss, [f, *params])
    return loss.detach(), grads[0], list(zip(params, grads[1:], strict=True))
