"""Zeroth order: directional derivatives from forward passes only (SPSA / MeZO).

Malladi et al. — *Fine-Tuning Language Models with Just Forward Passes* (MeZO, 2023,
arXiv 2305.17333). For each direction ``z_k`` (regenerated from a seed, never stored):

    d_k ≈ (L(θ + ε z_k) − L(θ − ε z_k)) / 2ε,        g = (1/K) Σ_k d_k z_k

The parameters are perturbed *in place* (``θ += εz``, ``θ −= 2εz``, ``θ += εz``), so a step
needs no copy of the parameters: the memory of inference plus one tensor's direction. The
restore is exact up to float rounding (about one ulp of θ per step).

``zo-sign`` is the essay's literal pseudo-code: compare ``L(θ + εv)`` with ``L(θ)`` and step
towards ``+v`` if the loss went down, ``−v`` otherwise:
``g = (1/K) Σ_k sign(L(θ+εv_k) − L(θ)) v_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..autodiff import DirectionSampler, LossFn
from ..seeding import mix_seed
from .base import Estimator, register


@register("zo")
class ZerothOrder(Estimator):
    """Two-point zeroth-order (SPSA) gradient estimate with in-place, seeded perturbations.

    Arguments:
        model, loss_fn, seed: see :class:`Estimator`.
        directions: K, the number of directions averaged per step.
        distribution: ``"gaussian"``, ``"rademacher"`` or ``"rank1"``.
        epsilon: the perturbation size ε.
    """

    #: Combines this process's ``(loss, raw)`` — the mean loss and the K raw directional
    #: numbers of :meth:`directional` — with the other processes' before the estimate is
    #: formed (set by :mod:`forwardonly.distributed`); ``None`` in a single process.
    reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    #: Set during :meth:`estimate_inplace`: the update goes into θ, not into ``.grad``.
    _inplace_lr: float | None = None

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, directions: int = 1,
                 distribution: str = "gaussian", epsilon: float = 1e-3, seed: int = 0) -> None:
        super().__init__(model, loss_fn, seed=seed)
        if int(directions) < 1:
            raise ValueError(f"directions must be a positive integer, got {directions}")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
        DirectionSampler(distribution, 0)
        self.directions = int(directions)
        self.distribution = distribution
        self.epsilon = float(epsilon)

    def _samplers(self) -> list[DirectionSampler]:
        seed = self.step_seed()
        return [DirectionSampler(self.distribution, mix_seed(seed, k))
                for k in range(self.directions)]

    @torch.no_grad()
    def _perturb(self, sampler: DirectionSampler, scale: float, grad_coeff: float | None = None
                 ) -> None:
        """``θ += scale·z`` and, with ``grad_coeff``, add ``grad_coeff·z`` to the estimate
        (same draw): into ``.grad``, or — in place (MeZO) — as ``θ −= lr·grad_coeff·z``."""
        if grad_coeff is not None and self._inplace_lr is not None:
            scale, grad_coeff = scale - self._inplace_lr * grad_coeff, None
        for i, (_, p) in enumerate(self.trainable()):
            z = sampler.dense(i, p, 1)[0]
            if scale != 0.0:
                p.add_(z, alpha=scale)
            if grad_coeff is not None:
                p.grad.add_(z, alpha=grad_coeff)

    @torch.no_grad()
    def _loss(self, inputs: Tensor, targets: Tensor) -> float:
        # Every evaluation of a step sees the same random numbers (dropout masks); the
        # global RNG state is restored by ``estimate``.
        torch.random.default_generator.manual_seed(mix_seed(self.step_seed(), 0x5EED))
        return self.loss_fn(self.model(inputs), targets).item()

    def directional(self, sampler: DirectionSampler, inputs: Tensor, targets: Tensor
                    ) -> tuple[float, float]:
        """One direction: ``(loss estimate, raw number)``, the raw number being linear in the
        loss (so that it can be averaged over processes); θ ends at ``θ + ε z`` and the
        caller's final ``_perturb`` restores it."""
        eps = self.epsilon
        self._perturb(sampler, +eps)
        plus = self._loss(inputs, targets)
        self._perturb(sampler, -2 * eps)
        minus = self._loss(inputs, targets)
        return (plus + minus) / 2, (plus - minus) / (2 * eps)

    def coefficient(self, raw: float) -> float:
        """Weight of ``z`` in ``g`` before the 1/K, from :meth:`directional`'s raw number."""
        return raw

    def restore_shift(self) -> float:
        """Where ``directional`` leaves θ, in units of ε·z (restored by ``-shift``)."""
        return -1.0

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        rng = torch.get_rng_state()
        try:
            return self._estimate(inputs, targets)
        finally:
            torch.set_rng_state(rng)

    def estimate_inplace(self, inputs: Tensor, targets: Tensor, lr: float) -> dict[str, float]:
        self._inplace_lr = lr
        try:
            return self.estimate(inputs, targets)
        finally:
            self._inplace_lr = None

    def _estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        for _, p in self.trainable():
            if self._inplace_lr is not None:
                p.grad = None
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        if self.reduce is not None or (self._inplace_lr is not None and self.directions > 1):
            # every direction evaluated at the same θ before any update enters θ
            return self._estimate_reduced(inputs, targets)
        losses, coeffs = [], []
        for sampler in self._samplers():
            loss, raw = self.directional(sampler, inputs, targets)
            c = self.coefficient(raw)
            # restore θ and accumulate c/K · z into .grad from the same draw
            self._perturb(sampler, -self.restore_shift() * self.epsilon, c / self.directions)
            losses.append(loss)
            coeffs.append(c)
        d = torch.tensor(coeffs)
        return {"loss": sum(losses) / len(losses), "dir_deriv_rms": d.pow(2).mean().sqrt().item()}

    def _estimate_reduced(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        """As ``_estimate``, but the K raw numbers of all processes are combined (one
        ``reduce`` call) before any ``z`` enters ``.grad``: θ is restored after each
        direction, and the directions are drawn once more to form ``g``."""
        samplers = self._samplers()
        losses, raws = [], []
        for sampler in samplers:
            loss, raw = self.directional(sampler, inputs, targets)
            self._perturb(sampler, -self.restore_shift() * self.epsilon)
            losses.append(loss)
            raws.append(raw)
        mean_loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        raw_all = torch.tensor(raws, dtype=torch.float64)
        if self.reduce is not None:
            mean_loss, raw_all = self.reduce(mean_loss, raw_all)
        coeffs = [self.coefficient(r) for r in raw_all.tolist()]
        for sampler, c in zip(samplers, coeffs, strict=True):
            self._perturb(sampler, 0.0, c / self.directions)
        d = torch.tensor(coeffs)
        return {"loss": mean_loss.item(), "dir_deriv_rms": d.pow(2).mean().sqrt().item()}


@register("zo-sign")
class ZerothOrderSign(ZerothOrder):
    """The essay's pseudo-code: ``g = (1/K) Σ_k sign(L(θ + εv_k) − L(θ)) v_k``."""

    def _estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        self._base = self._loss(inputs, targets)
        return super()._estimate(inputs, targets)

    def directional(self, sampler, inputs, targets):
        self._perturb(sampler, +self.epsilon)
        return self._base, self._loss(inputs, targets) - self._base

    def coefficient(self, raw: float) -> float:
        return math.copysign(1.0, raw)

    def restore_shift(self) -> float:
        return 1.0
