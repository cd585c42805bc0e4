"""Backpropagation: the exact gradient, the baseline every other estimator is measured by."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Estimator, register


@register("bp")
class Backprop(Estimator):
    """Exact ``∇L`` by reverse-mode AD (``loss.backward()``).

    ``.grad`` is overwritten, not accumulated, like every estimator of this package.
    """

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        for _, p in self.trainable():
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(self.model(inputs), targets)
            loss.backward()
        for _, p in self.trainable():
            if p.grad is None:  # parameter unused by this forward pass: its gradient is 0
                p.grad = torch.zeros_like(p)
        return {"loss": loss.item()}
