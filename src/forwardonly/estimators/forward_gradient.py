"""Forward gradient with weight perturbation (FG-W), and the essay's sign-only variant.

Baydin, Pearlmutter, Syme, Wood, Torr — *Gradients without Backpropagation* (2022,
arXiv 2202.08587). Draw directions ``v_k`` in parameter space with ``E[v vᵀ] = I``; one
forward-mode pass gives the exact directional derivatives ``d_k = ∇L · v_k``; then

    g = (1/K) Σ_k d_k v_k,            E[g] = ∇L  (unbiased)

and for Gaussian ``v``: ``E‖g‖² = (n + 2)‖∇L‖²`` at K = 1 — the variance grows with the
number of parameters ``n`` (the curse of dimensionality).

``fg-sign`` is the essay's naive variant: ``g = (1/K) Σ_k sign(d_k) v_k`` — the optimizer's
step moves along ``−sign(d)·v``, a descent direction whenever ``d ≠ 0``, but not unbiased.

Directions are drawn per parameter tensor from ``(seed, step, tensor index)`` when the layer
runs and drawn again to form ``g``; they are never kept beyond the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..autodiff import DirectionSampler, LossFn, Rank1, directional_derivatives
from .base import Estimator, register, set_grad


@register("fg-w")
class ForwardGradient(Estimator):
    """Forward gradient, weight perturbation.

    Arguments:
        model, loss_fn, seed: see :class:`Estimator`.
        directions: K, the number of directions averaged per step (one batched pass).
        distribution: ``"gaussian"`` (Baydin et al.), ``"rademacher"`` or ``"rank1"``
            (see :mod:`forwardonly.autodiff.directions`).
    """

    #: Combines this process's ``(loss, d)`` with the other processes' before the estimate is
    #: formed — set by :mod:`forwardonly.distributed` (data parallelism: one all-gather of
    #: the K + 1 numbers); ``None`` in a single process.
    reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, directions: int = 1,
                 distribution: str = "gaussian", seed: int = 0) -> None:
        super().__init__(model, loss_fn, seed=seed)
        if int(directions) < 1:
            raise ValueError(f"directions must be a positive integer, got {directions}")
        DirectionSampler(distribution, 0)  # validates the name
        self.directions = int(directions)
        self.distribution = distribution

    def coefficients(self, d: Tensor) -> Tensor:
        """Weights of the K directions in the estimate: ``d_k / K``."""
        return d / self.directions

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        return self._step(inputs, targets, lr=None)

    def estimate_inplace(self, inputs: Tensor, targets: Tensor, lr: float) -> dict[str, float]:
        return self._step(inputs, targets, lr=lr)

    def _step(self, inputs: Tensor, targets: Tensor, lr: float | None) -> dict[str, float]:
        """``lr=None``: write ``g`` into ``.grad``; else ``θ −= lr·g`` with no ``g`` buffer."""
        k = self.directions
        sampler = DirectionSampler(self.distribution, self.step_seed())
        params = [p for _, p in self.trainable()]
        index = {id(p): i for i, p in enumerate(params)}
        in_grad: set[int] = set()  # tensors whose (single) direction was drawn into .grad

        def tangent(p: nn.Parameter) -> Tensor | Rank1:
            i = index[id(p)]
            if sampler.is_rank1(p.shape):
                return sampler.rank1(i, p, k)
            if k == 1 and lr is None:  # draw straight into .grad: no second buffer, no redraw
                if p.grad is None or p.grad.shape != p.shape:
                    p.grad = torch.empty_like(p)
                in_grad.add(i)
                return sampler.dense(i, p, 1, out=p.grad.unsqueeze(0))
            return sampler.dense(i, p, k)

        loss, d = directional_derivatives(self.model, self.loss_fn, inputs, targets, tangent, k)
        if self.reduce is not None:
            loss, d = self.reduce(loss, d)
        coeffs = self.coefficients(d)
        with torch.no_grad():
            for i, p in enumerate(params):
                if lr is not None:
                    p.grad = None
                    p.add_(sampler.combine(i, p, coeffs), alpha=-lr)
                elif i in in_grad:
                    p.grad.mul_(coeffs[0])
                else:
                    set_grad(p, sampler.combine(i, p, coeffs))
        return {"loss": loss.item(), "dir_deriv_rms": d.pow(2).mean().sqrt().item()}


@register("fg-sign")
class ForwardGradientSign(ForwardGradient):
    """The essay's naive forward gradient: ``g = (1/K) Σ_k sign(∇L·v_k) v_k``."""

    def coefficients(self, d: Tensor) -> Tensor:
        return torch.sign(d) / self.directions
