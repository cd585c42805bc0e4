"""Random directions that can be regenerated from a seed instead of being stored.

Tensor ``i`` of a step is drawn from its own generator seeded with ``mix_seed(step_seed, i)``,
so any tensor's direction can be drawn again, in any order, on any rank, after a resume —
only the seed needs to be kept. Every distribution has ``E[v] = 0`` and ``E[v vᵀ] = I``,
which is what makes ``g = (∇L·v) v`` an unbiased estimate of ``∇L``.

- ``gaussian``: ``v ~ N(0, I)`` (Baydin et al. 2022). ``E‖g‖² = (n + 2)‖∇L‖²``.
- ``rademacher``: independent ±1 entries. ``E‖g‖² = n‖∇L‖² + ...`` — lower variance than
  Gaussian (``‖v‖² = n`` exactly), and generated from random bits, 64 signs per word.
- ``rank1``: for a weight matrix ``W ∈ R^{q×p}`` (conv kernels flattened to ``q × p``),
  ``V = b aᵀ`` with ``a ∈ {±1}^p, b ∈ {±1}^q`` independent Rademacher: still
  ``E[vec V vec Vᵀ] = I`` and ``‖V‖² = pq``, but it costs ``p + q`` random numbers instead
  of ``pq``, and the tangent of ``x Wᵀ`` is ``(x a) bᵀ`` — an outer product instead of a
  matmul. Vectors (biases, norms) use plain Rademacher.
- ``lowrank`` (rank ``r``, the ``rank1`` generalised): ``V = (1/√r) Σ_{i=1..r} b_i a_iᵀ``
  with all ``a_i ∈ {±1}^p, b_i ∈ {±1}^q`` independent Rademacher. Entry ``(j, l)`` is
  ``(1/√r) Σ_i b_ij a_il`` and ``E[b_ij a_il b_i'j' a_i'l'] = [i = i'][j = j'][l = l']``, so
  ``E[V_jl V_j'l'] = (1/r) Σ_i [j = j'][l = l'] = [j = j'][l = l']``: ``E[vec V vec Vᵀ] = I``
  for every r. It costs ``r(p + q)`` random numbers, and the tangent of ``x Wᵀ`` is
  ``((x A) Bᵀ)/√r`` (``A`` the ``p × r`` stack of the ``a_i``): ``r(p + q)`` per example
  instead of ``pq``. ±1 factors rather than Gaussian ones: the factors come from random bits,
  r = 1 draws exactly the ``rank1`` directions (same generator, same layout), and a sum of
  ±1 products has lighter tails than a sum of Gaussian products (``E[V_jl⁴] = 3 − 2/r``
  against ``3(1 + 2/r)``), so the estimate's variance is lower. Vectors: plain Rademacher.

The same sampler draws *activity* tangents (activity perturbation, Ren et al. 2023): K
tangents ``(K, *shape)`` per layer ``index`` from the generator of that index
(:meth:`DirectionSampler.noise`); only ``gaussian`` and ``rademacher`` apply there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..seeding import mix_seed

DISTRIBUTIONS = ("gaussian", "rademacher", "rank1", "lowrank")
#: Activity tangents (one per unit and example) have no weight matrix to factor: no rank1 or
#: lowrank.
ACTIVITY_DISTRIBUTIONS = ("gaussian", "rademacher")

# noise(index, shape, like) -> (K, *shape) activity tangents (dtype/device of ``like``)
NoiseFn = Callable[[int, tuple[int, ...], Tensor], Tensor]


def check_distribution(distribution: str, valid: tuple[str, ...] = DISTRIBUTIONS) -> str:
    """``distribution`` if it is one of ``valid``, else a ``ValueError`` naming them."""
    if distribution not in valid:
        names = ", ".join(repr(d) for d in valid)
        raise ValueError(f"distribution must be one of {names}, got {distribution!r}")
    return distribution


# Row v of this table holds the 8 bits of the byte v as ±1.0: one lookup turns a random byte
# into 8 independent signs (random bits are nearly free; drawing Gaussians is not).
_SIGN_BITS = [[1.0 if (v >> j) & 1 else -1.0 for j in range(8)] for v in range(256)]
_SIGN_TABLES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _sign_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (device, dtype)
    if key not in _SIGN_TABLES:
        _SIGN_TABLES[key] = torch.tensor(_SIGN_BITS, dtype=dtype, device=device)  # (256, 8)
    return _SIGN_TABLES[key]


def rademacher(shape: int | tuple[int, ...], generator: torch.Generator, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
               ) -> Tensor:
    """Independent ±1 entries of ``shape``, 64 of them from each random 64-bit word."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    n = math.prod(shape)
    words = torch.empty((n + 63) // 64, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)  # every bit uniform
    idx = words.view(torch.uint8).int()
    signs = torch.index_select(_sign_table(device, dtype), 0, idx)  # (8 · words, 8)
    return signs.view(-1)[:n].view(shape)


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


@dataclass(frozen=True)
class LowRank:
    """A batch of K rank-r directions ``V_k = (1/√r) Σ_i b_ki a_kiᵀ`` for a ``(q, p, ...)``
    weight."""

    b: Tensor  # (K, r, q)
    a: Tensor  # (K, r, p) with p = prod(shape[1:])
    shape: torch.Size

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    @property
    def scale(self) -> float:
        """``1/√r``, which makes ``E[vec V vec Vᵀ] = I``."""
        return 1.0 / math.sqrt(self.rank)

    def materialize(self) -> Tensor:
        """(K, *shape) dense directions."""
        dense = torch.matmul(self.b.transpose(1, 2), self.a).mul_(self.scale)  # (K, q, p)
        return dense.reshape(self.b.shape[0], *self.shape)

    def combine(self, coeffs: Tensor) -> Tensor:
        """``Σ_k coeffs[k] V_k`` as a dense ``shape`` tensor: one ``(q, Kr) @ (Kr, p)``."""
        k, r, q = self.b.shape
        b = (self.b * (coeffs * self.scale).view(k, 1, 1)).reshape(k * r, q)
        return (b.T @ self.a.reshape(k * r, -1)).reshape(self.shape)


#: Directions kept as their factors (weight matrices under ``rank1`` and ``lowrank``).
Factored = Rank1 | LowRank


def check_rank(rank: int) -> int:
    """``rank`` as an int if it is a positive integer, else a ``ValueError``."""
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"direction_rank must be a positive integer (the rank r of the "
                         f"lowrank directions), got {rank!r}")
    return int(rank)


class DirectionSampler:
    """Draws (and redraws) the directions of one step.

    Arguments:
        distribution: one of ``"gaussian"``, ``"rademacher"``, ``"rank1"``, ``"lowrank"``.
        step_seed: the seed of this step (``Estimator.step_seed()``).
        valid: the distributions the caller accepts (a ``ValueError`` names them).
        rank: r of the ``lowrank`` directions (a positive integer; ignored by the others).
    """

    def __init__(self, distribution: str, step_seed: int, *,
                 valid: tuple[str, ...] = DISTRIBUTIONS, rank: int = 4) -> None:
        self.distribution = check_distribution(distribution, valid)
        self.step_seed = step_seed
        self.rank = check_rank(rank)

    def generator(self, index: int, device: torch.device) -> torch.Generator:
        """The generator of tensor (or layer) ``index``, seeded ``mix_seed(step_seed, index)``."""
        gen = torch.Generator(device=device)
        gen.manual_seed(mix_seed(self.step_seed, index))
        return gen

    def draw(self, gen: torch.Generator, shape: tuple[int, ...], like: Tensor,
             out: Tensor | None = None) -> Tensor:
        """Dense ``shape`` entries from ``gen`` (Gaussian, or ±1 for the other two), with the
        dtype and device of ``like``; written into ``out`` if given."""
        if self.distribution == "gaussian":
            if out is None:
                out = torch.empty(shape, dtype=like.dtype, device=like.device)
            return out.normal_(generator=gen)
        signs = rademacher(shape, gen, dtype=like.dtype, device=like.device)
        return signs if out is None else out.copy_(signs)

    def is_rank1(self, shape: torch.Size) -> bool:
        return self.distribution == "rank1" and len(shape) >= 2

    def is_factored(self, shape: torch.Size) -> bool:
        """Whether a tensor of ``shape`` gets factored directions (≥2-D under ``rank1`` or
        ``lowrank``): :meth:`factors` draws them."""
        return self.distribution in ("rank1", "lowrank") and len(shape) >= 2

    def _signs(self, index: int, like: Tensor, k: int, r: int) -> tuple[Tensor, Tensor]:
        """``(b, a)``: ``(k, r, q)`` and ``(k, r, p)`` signs from the generator of ``index``."""
        gen = self.generator(index, like.device)
        q, p = like.shape[0], like[0].numel()
        ab = rademacher(k * r * (p + q), gen, dtype=like.dtype, device=like.device)
        ab = ab.view(k, r, p + q)
        return ab[..., p:], ab[..., :p]

    def rank1(self, index: int, like: Tensor, k: int) -> Rank1:
        """The rank-one factors of tensor ``index`` (only for ≥2-D tensors, ``rank1``)."""
        b, a = self._signs(index, like, k, 1)
        return Rank1(b=b[:, 0], a=a[:, 0], shape=like.shape)

    def lowrank(self, index: int, like: Tensor, k: int) -> LowRank:
        """The rank-r factors of tensor ``index`` (≥2-D tensors); r = 1 draws the same signs
        as :meth:`rank1`."""
        b, a = self._signs(index, like, k, self.rank)
        return LowRank(b=b, a=a, shape=like.shape)

    def factors(self, index: int, like: Tensor, k: int) -> Factored:
        """The factors of tensor ``index`` under this distribution (see :meth:`is_factored`)."""
        return self.rank1(index, like, k) if self.distribution == "rank1" \
            else self.lowrank(index, like, k)

    def dense(self, index: int, like: Tensor, k: int, out: Tensor | None = None) -> Tensor:
        """(k, *like.shape) directions of tensor ``index``; written into ``out`` if given."""
        if self.is_factored(like.shape):
            v = self.factors(index, like, k).materialize()
            return v if out is None else out.copy_(v)
        return self.draw(self.generator(index, like.device), (k, *like.shape), like, out)

    def combine(self, index: int, like: Tensor, coeffs: Tensor) -> Tensor:
        """``Σ_k coeffs[k] v_k`` for tensor ``index``, redrawing its K directions."""
        k = coeffs.shape[0]
        coeffs = coeffs.to(like.dtype)
        if self.is_factored(like.shape):
            return self.factors(index, like, k).combine(coeffs)
        v = self.dense(index, like, k)
        return torch.tensordot(coeffs, v, dims=1)

    def noise(self, k: int) -> NoiseFn:
        """Activity tangents: ``noise(index, shape, like)`` draws ``(k, *shape)`` from the
        generator of ``index``, so every tangent can be drawn again."""
        if self.distribution not in ACTIVITY_DISTRIBUTIONS:
            check_distribution(self.distribution, ACTIVITY_DISTRIBUTIONS)

        def draw(index: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
            return self.draw(self.generator(index, like.device), (k, *shape), like)

        return draw
