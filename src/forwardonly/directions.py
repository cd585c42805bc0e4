"""Random directions that can be regenerated from a seed instead of being stored.

Tensor ``i`` of a step is drawn from its own generator seeded with ``mix_seed(step_seed, i)``,
so any tensor's direction can be drawn again, in any order, on any rank, after a resume —
only the seed needs to be kept. Every distribution has ``E[v] = 0`` and ``E[v vᵀ] = I``,
which is what makes ``g = (∇L·v) v`` an unbiased estimate of ``∇L``.

- ``gaussian``: ``v ~ N(0, I)`` (Baydin et al. 2022). ``E‖g‖² = (n + 2)‖∇L‖²``.
- ``rademacher``: independent ±1 entries. ``E‖g‖² = n‖∇L‖² + ...`` — lower variance than
  Gaussian (``‖v‖² = n`` exactly), and generated from random bits, 32 signs per word.
- ``rank1``: for a weight matrix ``W ∈ R^{q×p}`` (conv kernels flattened to ``q × p``),
  ``V = b aᵀ`` with ``a ∈ {±1}^p, b ∈ {±1}^q`` independent Rademacher: still
  ``E[vec V vec Vᵀ] = I`` and ``‖V‖² = pq``, but it costs ``p + q`` random numbers instead
  of ``pq``, and the tangent of ``x Wᵀ`` is ``(x a) bᵀ`` — an outer product instead of a
  matmul. Vectors (biases, norms) use plain Rademacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .seeding import mix_seed

DISTRIBUTIONS = ("gaussian", "rademacher", "rank1")

_SHIFTS: dict[torch.device, Tensor] = {}


def _shifts(device: torch.device) -> Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = (31 - torch.arange(32, dtype=torch.int32)).to(device)
    return _SHIFTS[device]


def rademacher(n: int, generator: torch.Generator, *, dtype: torch.dtype, device: torch.device
               ) -> Tensor:
    """``n`` independent ±1 values from ``ceil(n / 32)`` random 32-bit words."""
    words = (n + 31) // 32
    # randint draws 64-bit integers; each gives two 32-bit words.
    raw = torch.randint(
        -(2**63), 2**63 - 1, ((words + 1) // 2,), generator=generator,
        dtype=torch.int64, device=device,
    ).view(torch.int32)[:words]
    # Move bit j of each word to the sign position and OR in the exponent of 1.0:
    # the float32 bit pattern is then exactly +1.0 or -1.0.
    sign = (raw.unsqueeze(-1) << _shifts(device)) & torch.tensor(
        -(2**31), dtype=torch.int32, device=device
    )
    signs = (sign | 0x3F800000).view(torch.float32).reshape(-1)[:n]
    return signs if dtype == torch.float32 else signs.to(dtype)


@dataclass(frozen=True)
class Rank1:
    """A batch of K rank-one directions ``V_k = b_k a_kᵀ`` for a ``(q, p, ...)`` weight."""

    b: Tensor  # (K, q)
    a: Tensor  # (K, p) with p = prod(shape[1:])
    shape: torch.Size

    def materialize(self) -> Tensor:
        """(K, *shape) dense directions."""
        dense = self.b.unsqueeze(2) * self.a.unsqueeze(1)  # (K, q, p)
        return dense.reshape(self.b.shape[0], *self.shape)

    def combine(self, coeffs: Tensor) -> Tensor:
        """``Σ_k coeffs[k] V_k`` as a dense ``shape`` tensor, without forming every V_k."""
        return ((self.b * coeffs.unsqueeze(1)).T @ self.a).reshape(self.shape)


class DirectionSampler:
    """Draws (and redraws) the directions of one step.

    Arguments:
        distribution: one of ``"gaussian"``, ``"rademacher"``, ``"rank1"``.
        step_seed: the seed of this step (``Estimator.step_seed()``).
    """

    def __init__(self, distribution: str, step_seed: int) -> None:
        if distribution not in DISTRIBUTIONS:
            valid = ", ".join(repr(d) for d in DISTRIBUTIONS)
            raise ValueError(f"distribution must be one of {valid}, got {distribution!r}")
        self.distribution = distribution
        self.step_seed = step_seed

    def generator(self, index: int, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(mix_seed(self.step_seed, index))
        return gen

    def is_rank1(self, shape: torch.Size) -> bool:
        return self.distribution == "rank1" and len(shape) >= 2

    def rank1(self, index: int, like: Tensor, k: int) -> Rank1:
        """The rank-one factors of tensor ``index`` (only for ≥2-D tensors, ``rank1``)."""
        gen = self.generator(index, like.device)
        q, p = like.shape[0], like[0].numel()
        ab = rademacher(k * (p + q), gen, dtype=like.dtype, device=like.device).view(k, p + q)
        return Rank1(b=ab[:, p:], a=ab[:, :p], shape=like.shape)

    def dense(self, index: int, like: Tensor, k: int, out: Tensor | None = None) -> Tensor:
        """(k, *like.shape) directions of tensor ``index``; written into ``out`` if given."""
        if self.is_rank1(like.shape):
            v = self.rank1(index, like, k).materialize()
            return v if out is None else out.copy_(v)
        gen = self.generator(index, like.device)
        shape = (k, *like.shape)
        if out is None:
            out = torch.empty(shape, dtype=like.dtype, device=like.device)
        if self.distribution == "gaussian":
            out.normal_(generator=gen)
        else:
            out.copy_(rademacher(out.numel(), gen, dtype=like.dtype, device=like.device)
                      .view(shape))
        return out

    def combine(self, index: int, like: Tensor, coeffs: Tensor) -> Tensor:
        """``Σ_k coeffs[k] v_k`` for tensor ``index``, redrawing its K directions."""
        k = coeffs.shape[0]
        coeffs = coeffs.to(like.dtype)
        if self.is_rank1(like.shape):
            return self.rank1(index, like, k).combine(coeffs)
        v = self.dense(index, like, k)
        return torch.tensordot(coeffs, v, dims=1)
