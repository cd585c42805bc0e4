"""Zeroth order: directional derivatives from forward passes only (SPSA / MeZO).

Malladi et al. — *Fine-Tuning Language Models with Just Forward Passes* (MeZO, 2023,
arXiv 2305.17333). For each direction ``z_k`` (regenerated from a seed, never stored):

    d_k ≈ (L(θ + ε z_k) − L(θ − ε z_k)) / 2ε,        g = (1/K) Σ_k d_k z_k

The parameters are perturbed *in place* (``θ += εz``, ``θ −= 2εz``, ``θ += εz``), so a step
needs no copy of the parameters: the memory of inference plus one tensor's direction. The
restore is exact up to float rounding (about one ulp of θ per step).

``zo-sign`` is the essay's literal pseudo-code: compare ``L(θ + εv)`` with ``L(θ)`` and step
towards ``+v`` if the loss went down, ``−v`` otherwise: ``g = (1/K) Σ_k sign(L(θ+εv_k) − L(θ)) v_k``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..directions import DirectionSampler
from .base import Estimator, LossFn, mix_seed, register, set_grad


@register("zo")
class ZerothOrder(Estimator):
    """Two-point zeroth-order (SPSA) gradient estimate with in-place, seeded perturbations.

    Arguments:
        model, loss_fn, seed: see :class:`Estimator`.
        directions: K, the number of directions averaged per step.
        distribution: ``"gaussian"``, ``"rademacher"`` or ``"rank1"``.
        epsilon: the perturbation size ε.
    """

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
    def _perturb(self, sampler: DirectionSampler, scale: float) -> None:
        for i, (_, p) in enumerate(self.trainable()):
            p.add_(sampler.dense(i, p, 1)[0], alpha=scale)

    @torch.no_grad()
    def _loss(self, inputs: Tensor, targets: Tensor) -> float:
        # Same dropout masks (if any) in every evaluation of this step.
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(mix_seed(self.step_seed(), 0x5EED))
            return self.loss_fn(self.model(inputs), targets).item()

    def coefficients(self, samplers: list[DirectionSampler], inputs: Tensor, targets: Tensor
                     ) -> tuple[float, Tensor]:
        """Loss (at θ, estimated as the mean of the two sides) and the K coefficients d_k/K."""
        eps, d, mid = self.epsilon, [], []
        for sampler in samplers:
            self._perturb(sampler, +eps)
            plus = self._loss(inputs, targets)
            self._perturb(sampler, -2 * eps)
            minus = self._loss(inputs, targets)
            self._perturb(sampler, +eps)
            d.append((plus - minus) / (2 * eps))
            mid.append((plus + minus) / 2)
        return sum(mid) / len(mid), torch.tensor(d, dtype=torch.float64) / self.directions

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        samplers = self._samplers()
        loss, coeffs = self.coefficients(samplers, inputs, targets)
        with torch.no_grad():
            for i, (_, p) in enumerate(self.trainable()):
                g = torch.zeros_like(p)
                for sampler, c in zip(samplers, coeffs.tolist(), strict=True):
                    g.add_(sampler.dense(i, p, 1)[0], alpha=c)
                set_grad(p, g)
        return {"loss": loss, "dir_deriv_rms": (coeffs * self.directions).pow(2).mean().sqrt()
                .item()}


@register("zo-sign")
class ZerothOrderSign(ZerothOrder):
    """The essay's pseudo-code: ``g = (1/K) Σ_k sign(L(θ + εv_k) − L(θ)) v_k``."""

    def coefficients(self, samplers, inputs, targets):
        base = self._loss(inputs, targets)
        signs = []
        for sampler in samplers:
            self._perturb(sampler, +self.epsilon)
            signs.append(math.copysign(1.0, self._loss(inputs, targets) - base))
            self._perturb(sampler, -self.epsilon)
        return base, torch.tensor(signs, dtype=torch.float64) / self.directions
