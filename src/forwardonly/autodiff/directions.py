"""Random directions that can be regenerated from a seed instead of being stored.

Tensor ``i`` of a step is drawn from its own generator seeded with ``mix_seed(step_seed, i)``,
so any tensor's direction can be drawn again, in any order, on any rank, after a resume —
only the seed needs to be kept. Every distribution has ``E[v] = 0`` and ``E[v vᵀ] = I``,
which is what makes ``g = (∇L·v) v`` an unbiased estimate of ``∇L`` (``gaussian-table``:
see below).

- ``gaussian``: ``v ~ N(0, I)`` (Baydin et al. 2022). ``E‖g‖² = (n + 2)‖∇L‖²``. On the
  CPU each entry is one of 2¹⁶ equiprobable levels: the mean of N(0, 1) over each of 2¹⁶
  bins of probability 2⁻¹⁶, scaled so that ``E[v] = 0`` and ``E[v²] = 1`` hold exactly;
  kurtosis 2.9998 (3 for N(0, 1)), ``|v| ≤ 4.39`` (beyond it lies 1.2e-5 of N(0, 1)). Indices
  are 16-bit pieces of the words of numpy's ``PCG64DXSM`` bit generator, seeded per tensor;
  one table lookup per entry, 1.7–2.0× faster than torch's ``normal_`` on the CPU (see
  :class:`GaussianStream`). This stream differs from the one of releases that drew with
  ``torch.Generator.normal_``: a run is not bit-identical to one made with them. On other
  devices the device's own generator draws with ``normal_``.
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
- ``gaussian-table``: Gaussian entries read from a table drawn once per tensor, a window at
  an offset chosen from the step's seed (Salimans et al. 2017): a view, no random numbers
  drawn per step. A step's directions alone are distributed as fresh ones; for one table the
  expected estimate is ``M ∇L`` with ``M`` near ``I`` (not ``∇L``: see
  :mod:`forwardonly.autodiff.noise_table`); the memory of ``(factor + 1) · K`` times the
  parameters.

A tensor's direction can also be drawn in pieces, bit for bit the entries of the whole draw
(:meth:`DirectionSampler.chunks`, :meth:`~DirectionSampler.rows`,
:meth:`~DirectionSampler.add_to`): blocks of consecutive rows (its first dimension), so that
``θ += αv`` needs one block of ``v`` at a time instead of a tensor-sized one, and chosen rows
(an embedding's rows that a batch looks up). A Gaussian stream is sliced at whole 64-bit
words of 4 entries (:meth:`GaussianStream.skip`), a CPU ``torch.Generator``'s Rademacher signs
at multiples of 64 (``random_`` spends one word per element, so consecutive calls continue
one call), and factored directions are formed row by row from their factors. Elsewhere (a
device generator's draws, which cannot be sliced) a block is the whole tensor.

The same sampler draws *activity* tangents (activity perturbation, Ren et al. 2023): K
tangents ``(K, *shape)`` per layer ``index`` from the generator of that index
(:meth:`DirectionSampler.noise`); only ``gaussian`` and ``rademacher`` apply there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

from .. import gaussian
from ..gaussian import GAUSSIAN_LEVELS as GAUSSIAN_LEVELS
from ..seeding import mix_seed
from .noise_table import NoiseTable

#: Distributions whose directions are regenerated from the step's seed alone.
SEEDED_DISTRIBUTIONS = ("gaussian", "rademacher", "rank1", "lowrank")
#: ``gaussian-table`` reads Gaussian directions from a :class:`NoiseTable` (fg-w).
DISTRIBUTIONS = (*SEEDED_DISTRIBUTIONS, "gaussian-table")
#: Activity tangents (one per unit and example) have no weight matrix to factor: no rank1 or
#: lowrank.
ACTIVITY_DISTRIBUTIONS = ("gaussian", "rademacher")
#: Entries per block of :meth:`DirectionSampler.chunks` and :meth:`~DirectionSampler.add_to`
#: (1 MiB of float32).
CHUNK_ENTRIES = 1 << 18
#: Dtypes whose ``add_(v, alpha=c)`` block by block is bit for bit the whole one (tests check
#: it); in half precision torch rounds the tail of its vectorized loop differently, so moving
#: the block boundaries would change some roundings: those tensors are added in one piece.
_BLOCKWISE_ADD = (torch.float32, torch.float64)

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
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               out: Tensor | None = None) -> Tensor:
    """Independent ±1 entries of ``shape``, 64 of them from each random 64-bit word;
    written into ``out`` (same shape) if given."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if out is not None:
        dtype, device = out.dtype, out.device
    device = torch.device("cpu") if device is None else torch.device(device)
    n = math.prod(shape)
    words = torch.empty((n + 63) // 64, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)  # every bit uniform
    idx = words.view(torch.uint8).int()
    table = _sign_table(device, dtype)
    if out is not None and n % 8 == 0 and out.is_contiguous():  # straight into out
        torch.index_select(table, 0, idx[:n // 8], out=out.view(n // 8, 8))
        return out
    signs = torch.index_select(table, 0, idx)  # (8 · words, 8)
    signs = signs.view(-1)[:n].view(shape)
    return signs if out is None else out.copy_(signs)


# -- Gaussian entries: a table of 2¹⁶ levels indexed by random 16-bit numbers ------------

# entries per table-lookup chunk: the chunk's indices (int32) and output stay in L2 cache
_CHUNK = 1 << 16
# up to this many entries, numpy's lookup (less fixed overhead than torch's)
_SMALL = 1 << 12
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_LEVEL_TABLES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def gaussian_levels() -> Tensor:
    """The 2¹⁶ levels of the CPU Gaussian, ascending, float64 (:mod:`forwardonly.gaussian`).

    Level ``i`` is ``E[Z | Z in bin i]`` for ``Z ~ N(0, 1)`` and the bins cut at the
    quantiles ``Φ⁻¹(i / 2¹⁶)``: ``2¹⁶ (φ(z_i) − φ(z_{i+1}))``. Made exactly antisymmetric
    (mean 0) and scaled to a mean square of exactly 1, so a uniformly chosen level has
    ``E[v] = 0`` and ``E[v²] = 1``: the forward gradient stays unbiased.
    """
    return torch.from_numpy(gaussian.gaussian_levels().copy())


def _level_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (device, dtype)
    if key not in _LEVEL_TABLES:
        _LEVEL_TABLES[key] = gaussian_levels().to(device=device, dtype=dtype)
    return _LEVEL_TABLES[key]


class GaussianStream(gaussian.GaussianStream):
    """A seeded stream of Gaussian entries on the CPU, drawn into tensors: 16 random bits and
    one table lookup per entry (:class:`forwardonly.gaussian.GaussianStream`, whose
    :meth:`~forwardonly.gaussian.GaussianStream.array` gives the same entries as numpy
    arrays). Torch's ``normal_`` on the CPU spends a Mersenne-Twister number and a
    Box–Muller transform per entry and costs 1.7–2.0× as much (``python -m benchmarks
    core-step-time``, the *draw only* rows).

    Arguments:
        seed: an integer (e.g. ``mix_seed(step_seed, index)``).
    """

    def normal(self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32,
               out: Tensor | None = None) -> Tensor:
        """``shape`` Gaussian entries in ``dtype`` (CPU); written into ``out`` if given."""
        dtype = dtype if out is None else out.dtype
        n = math.prod(shape)
        if n <= _SMALL and dtype in _NUMPY_DTYPES:  # few entries: numpy's lookup, less overhead
            small = torch.from_numpy(self.array(shape, _NUMPY_DTYPES[dtype]))
            return small if out is None else out.copy_(small)
        bits = self._bits((n + 3) // 4)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        target = out if out.is_contiguous() else torch.empty(shape, dtype=dtype)
        flat = target.view(-1)
        table = _level_table(flat.device, dtype)
        full = n - n % _CHUNK
        # chunks of the same entries as one draw: each chunk's 16-bit indices are widened in
        # numpy straight into one int32 buffer (idx), looked up into the chunk's slice
        idx = torch.empty(min(_CHUNK, n), dtype=torch.int32)
        idx_np, raw = idx.numpy(), bits.random_raw
        for chunk in flat[:full].view(-1, _CHUNK):
            np.copyto(idx_np, raw(_CHUNK // 4).view(np.uint16))
            torch.index_select(table, 0, idx, out=chunk)
        if full < n:
            c = n - full
            np.copyto(idx_np[:c], raw((c + 3) // 4).view(np.uint16)[:c])
            torch.index_select(table, 0, idx[:c], out=flat[full:])
        return out if target is out else out.copy_(target)


#: What :meth:`DirectionSampler.generator` returns: a Gaussian stream on the CPU, else a
#: ``torch.Generator``.
Stream = torch.Generator | GaussianStream
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _eager(fn: _Fn) -> _Fn:
    """``fn`` runs eagerly inside a ``torch.compile``'d step (a graph break): seeds are integer
    hashes and Gaussian entries come from numpy's bit stream, neither of which may be traced.
    ``torch.compiler.disable`` is applied only when tracing (importing ``torch._dynamo`` at
    import time would cost every command about a second)."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return cast(_Fn, run)


@dataclass(frozen=True)
class Rank1:
    """A batch of K rank-one directions ``V_k = b_k a_kᵀ`` for a ``(q, p, ...)`` weight."""

    b: Tensor  # (K, q)
    a: Tensor  # (K, p) with p = prod(shape[1:])
    shape: torch.Size

    def row_block(self, rows: slice | Tensor) -> Tensor:
        """``(K, m, p)``: the rows ``rows`` (a slice, or m indices) of every direction, the
        trailing dimensions flattened; :meth:`materialize` is all rows."""
        return self.b[:, rows].unsqueeze(2) * self.a.unsqueeze(1)

    def materialize(self) -> Tensor:
        """(K, *shape) dense directions."""
        return self.row_block(slice(None)).reshape(self.b.shape[0], *self.shape)

    def combine(self, coeffs: Tensor, out: Tensor | None = None) -> Tensor:
        """``Σ_k coeffs[k] V_k`` as a dense ``shape`` tensor, without forming every V_k;
        written into ``out`` (contiguous) if given."""
        b = (self.b * coeffs.unsqueeze(1)).T  # (q, K)
        if out is not None:
            return torch.matmul(b, self.a, out=out.view(b.shape[0], -1)).view(self.shape)
        return (b @ self.a).reshape(self.shape)


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

    def row_block(self, rows: slice | Tensor) -> Tensor:
        """``(K, m, p)``: the rows ``rows`` (a slice, or m indices) of every direction, the
        trailing dimensions flattened; :meth:`materialize` is all rows. An entry is a sum of r
        products of signs — an integer, exact in any order of summation — times ``1/√r``, so
        a block is bit for bit the same rows of the whole product."""
        b = self.b[..., rows].transpose(1, 2)  # (K, m, r)
        return torch.matmul(b, self.a).mul_(self.scale)

    def materialize(self) -> Tensor:
        """(K, *shape) dense directions."""
        return self.row_block(slice(None)).reshape(self.b.shape[0], *self.shape)

    def combine(self, coeffs: Tensor, out: Tensor | None = None) -> Tensor:
        """``Σ_k coeffs[k] V_k`` as a dense ``shape`` tensor: one ``(q, Kr) @ (Kr, p)``;
        written into ``out`` (contiguous) if given."""
        k, r, q = self.b.shape
        b = (self.b * (coeffs * self.scale).view(k, 1, 1)).reshape(k * r, q)
        a = self.a.reshape(k * r, -1)
        if out is not None:
            return torch.matmul(b.T, a, out=out.view(q, -1)).view(self.shape)
        return (b.T @ a).reshape(self.shape)


#: Directions kept as their factors (weight matrices under ``rank1`` and ``lowrank``).
Factored = Rank1 | LowRank


@dataclass(frozen=True)
class Streamed:
    """One dense direction (K = 1) of tensor ``index``, drawn block by block of rows where it
    is used (:meth:`DirectionSampler.chunks`, bit for bit the whole draw) rather than all at
    once: a linear layer's ``x Vᵀ`` takes its output columns one block at a time, so a
    weight's direction never exists whole (the in-place step of an ``nn.Sequential``)."""

    sampler: DirectionSampler
    index: int
    like: Tensor
    max_entries: int = CHUNK_ENTRIES

    def blocks(self) -> Iterator[tuple[slice | EllipsisType, Tensor]]:
        """``(rows, V[rows])`` in order (:meth:`DirectionSampler.chunks`)."""
        return self.sampler.chunks(self.index, self.like, self.max_entries)

    def materialize(self) -> Tensor:
        """``(1, *shape)``: the whole direction."""
        return self.sampler.dense(self.index, self.like, 1)


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
        table: the :class:`NoiseTable` that ``gaussian-table`` directions are read from
            (kept by the estimator across steps; ignored by the other distributions).
    """

    def __init__(self, distribution: str, step_seed: int, *,
                 valid: tuple[str, ...] = DISTRIBUTIONS, rank: int = 4,
                 table: NoiseTable | None = None) -> None:
        self.distribution = check_distribution(distribution, valid)
        self.step_seed = step_seed
        self.rank = check_rank(rank)
        self.table = table

    @property
    def reads_table(self) -> bool:
        """Whether directions are views of a noise table (``gaussian-table``)."""
        return self.distribution == "gaussian-table"

    @_eager
    def _window(self, index: int, like: Tensor, k: int) -> Tensor:
        """Tensor ``index``'s K directions: a view of the noise table (drawn with numpy and
        offset by an integer hash of the seed: eager inside a compiled step)."""
        if self.table is None:
            raise ValueError("distribution 'gaussian-table' reads its directions from a noise "
                             "table: pass table=NoiseTable(seed) to the DirectionSampler")
        return self.table.window(self.step_seed, index, like, k)

    @_eager
    def generator(self, index: int, device: torch.device) -> Stream:
        """The generator of tensor (or layer) ``index``, seeded ``mix_seed(step_seed, index)``:
        a :class:`GaussianStream` for Gaussian entries on the CPU, else a ``torch.Generator``
        on ``device``."""
        seed = mix_seed(self.step_seed, index)
        device = torch.device(device)
        if self.distribution == "gaussian" and device.type == "cpu":
            return GaussianStream(seed)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen

    @_eager
    def draw(self, gen: Stream, shape: tuple[int, ...], like: Tensor,
             out: Tensor | None = None) -> Tensor:
        """Dense ``shape`` entries from ``gen`` (Gaussian, or ±1 for the other three), with
        the dtype and device of ``like``; written into ``out`` if given."""
        if isinstance(gen, GaussianStream):
            return gen.normal(shape, dtype=like.dtype, out=out)
        if self.distribution == "gaussian":
            if out is None:
                out = torch.empty(shape, dtype=like.dtype, device=like.device)
            return out.normal_(generator=gen)
        return rademacher(shape, gen, dtype=like.dtype, device=like.device, out=out)

    def is_rank1(self, shape: torch.Size) -> bool:
        return self.distribution == "rank1" and len(shape) >= 2

    def is_factored(self, shape: torch.Size) -> bool:
        """Whether a tensor of ``shape`` gets factored directions (≥2-D under ``rank1`` or
        ``lowrank``): :meth:`factors` draws them."""
        return self.distribution in ("rank1", "lowrank") and len(shape) >= 2

    def _signs(self, index: int, like: Tensor, k: int, r: int) -> tuple[Tensor, Tensor]:
        """``(b, a)``: ``(k, r, q)`` and ``(k, r, p)`` signs from the generator of ``index``."""
        gen = self.generator(index, like.device)
        assert isinstance(gen, torch.Generator)  # factored draws are never Gaussian streams
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
        """(k, *like.shape) directions of tensor ``index``; written into ``out`` if given
        (``gaussian-table``: a read-only view of the table unless ``out`` is given)."""
        if self.reads_table:
            v = self._window(index, like, k)
            return v if out is None else out.copy_(v)
        if self.is_factored(like.shape):
            v = self.factors(index, like, k).materialize()
            return v if out is None else out.copy_(v)
        return self.draw(self.generator(index, like.device), (k, *like.shape), like, out)

    @_eager
    def chunks(self, index: int, like: Tensor, max_entries: int = CHUNK_ENTRIES
               ) -> Iterator[tuple[slice | EllipsisType, Tensor]]:
        """The direction of tensor ``index`` (``dense(index, like, 1)[0]``, bit for bit) in
        blocks of consecutive rows: ``(rows, v[rows])`` with ``rows`` a slice of ``like``'s
        first dimension, in order, each block at most about ``max_entries`` entries (at
        least one row, and as many as the stream's slicing needs: 4 / gcd(row size, 4) rows
        for Gaussian entries, 64 / gcd(row size, 64) for Rademacher ones). A tensor of at
        most ``max_entries`` entries is one block; a 0-d one is one block with ``rows`` the
        ``...`` that indexes it. On a device whose Gaussians cannot be sliced (``normal_`` of
        a device generator) the block is the whole tensor."""
        n = like.numel()
        if like.dim() == 0 or n <= max_entries or n == 0:
            v = self.dense(index, like, 1)[0]
            yield (... if like.dim() == 0 else slice(0, like.shape[0])), v
            return
        q, row = like.shape[0], n // like.shape[0]
        step = max(1, max_entries // row)
        if self.reads_table:  # views of the table's window
            window = self.dense(index, like, 1)[0]
            for start in range(0, q, step):
                yield slice(start, min(start + step, q)), window[start:start + step]
            return
        if self.is_factored(like.shape):
            factors = self.factors(index, like, 1)
            for start in range(0, q, step):
                rows = slice(start, min(start + step, q))
                yield rows, factors.row_block(rows)[0].view(-1, *like.shape[1:])
            return
        gen = self.generator(index, like.device)
        if isinstance(gen, GaussianStream):
            unit = 4  # entries per word
        elif self.distribution != "gaussian" and like.device.type == "cpu":
            unit = 64  # signs per word, one word per element of random_
        else:
            yield slice(0, q), self.draw(gen, (1, *like.shape), like)[0]
            return
        multiple = unit // math.gcd(row, unit)  # rows per whole number of words
        step = max(multiple, step // multiple * multiple)
        for start in range(0, q, step):  # consecutive draws continue the stream
            c = min(step, q - start)
            yield slice(start, start + c), self.draw(gen, (c, *like.shape[1:]), like)

    @_eager
    def rows(self, index: int, like: Tensor, ids: Tensor) -> Tensor:
        """``dense(index, like, 1)[0][ids]`` bit for bit: rows ``ids`` (integers, any shape,
        negative ones counting from the end) of tensor ``index``'s direction, of shape
        ``(*ids.shape, *like.shape[1:])``. Factored directions come from their factors,
        Gaussian entries on the CPU from the stream at each run of consecutive ids; other
        draws go through :meth:`chunks` (a block at a time)."""
        if like.dim() == 0:
            return self.dense(index, like, 1)[0][ids]
        q, rest = like.shape[0], like.shape[1:]
        flat = ids.reshape(-1).long()
        if flat.numel() == 0:
            return like.new_empty((*ids.shape, *rest))
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -q or hi >= q:
            raise IndexError(f"row ids must lie in [-{q}, {q}), got {lo} .. {hi}")
        flat = flat.remainder(q)
        if self.reads_table:
            return self.dense(index, like, 1)[0][flat.to(like.device)].view((*ids.shape, *rest))
        if self.is_factored(like.shape):
            v = self.factors(index, like, 1).row_block(flat.to(like.device))[0]
            return v.view((*ids.shape, *rest))
        if self.distribution == "gaussian" and like.device.type == "cpu":
            return self._gaussian_rows(index, like, flat).view((*ids.shape, *rest))
        out = like.new_empty((flat.numel(), *rest))
        flat = flat.to(like.device)
        for block, v in self.chunks(index, like):
            assert isinstance(block, slice) and block.start is not None
            sel = ((flat >= block.start) & (flat < block.stop)).nonzero().squeeze(1)
            out[sel] = v[flat[sel] - block.start]
        return out.view((*ids.shape, *rest))

    def _gaussian_rows(self, index: int, like: Tensor, flat: Tensor) -> Tensor:
        """Rows ``flat`` (in ``[0, q)``) of a CPU Gaussian direction: one stream per run of
        consecutive ids, skipped to the run's first word."""
        row = like[0].numel()
        uniq, inverse = torch.unique(flat.cpu(), return_inverse=True)  # ascending
        ids = uniq.tolist()
        out = torch.empty((len(ids), row), dtype=like.dtype)
        first = 0
        while first < len(ids):
            last = first + 1
            while last < len(ids) and ids[last] == ids[last - 1] + 1:
                last += 1
            start = ids[first] * row  # entry offset of the run
            lead = start % 4  # entries of its first word that belong to earlier rows
            gen = self.generator(index, like.device)
            assert isinstance(gen, GaussianStream)
            run = gen.skip(start - lead).normal((lead + (last - first) * row,), dtype=like.dtype)
            out[first:last] = run[lead:].view(last - first, row)
            first = last
        return out[inverse]

    @_eager
    def add_to(self, index: int, param: Tensor, alpha: float, max_entries: int = CHUNK_ENTRIES,
               *, also: tuple[Tensor, float] | None = None) -> None:
        """``param += alpha·v`` in place, ``v`` the direction of tensor ``index`` drawn block
        by block (:meth:`chunks`): no tensor-sized temporary; with ``also = (t, beta)``
        (``t`` of ``param``'s shape and dtype), ``t += beta·v`` too from the same blocks. Bit
        for bit ``param.add_(dense(index, param, 1)[0], alpha=alpha)``; half-precision
        tensors (whose blockwise add would round differently) take one whole draw. Call it
        under ``torch.no_grad()`` for parameters."""
        targets = [(param, alpha)] if also is None else [(param, alpha), also]
        if any(t.dtype not in _BLOCKWISE_ADD for t, _ in targets):
            max_entries = param.numel()
        for rows, v in self.chunks(index, param, max_entries):
            for t, a in targets:
                t[rows].add_(v, alpha=a)

    def combine(self, index: int, like: Tensor, coeffs: Tensor,
                drawn: Tensor | Factored | None = None, out: Tensor | None = None) -> Tensor:
        """``Σ_k coeffs[k] v_k`` for tensor ``index``: from its K directions ``drawn`` when
        the caller kept them (dense ``(K, *like.shape)`` or factors), else redrawn; written
        into ``out`` (``like``'s shape, contiguous) if given."""
        k = coeffs.shape[0]
        coeffs = coeffs.to(like.dtype)
        if drawn is None:
            drawn = self.factors(index, like, k) if self.is_factored(like.shape) \
                else self.dense(index, like, k)
        if isinstance(drawn, (Rank1, LowRank)):
            if out is not None and out.is_contiguous():
                drawn.combine(coeffs, out=out)
                return out
            g = drawn.combine(coeffs)
            return g if out is None else out.copy_(g)
        if out is not None and out.is_contiguous() and k == 1:  # one direction: a scaled copy
            torch.mul(drawn.reshape(-1), coeffs[0], out=out.view(-1))
            return out
        if out is not None and out.is_contiguous():  # (n, K) @ (K,) -> (n,), no temporary
            torch.mv(drawn.reshape(k, -1).T, coeffs, out=out.view(-1))
            return out
        g = torch.tensordot(coeffs, drawn, dims=1)
        return g if out is None else out.copy_(g)

    def noise(self, k: int) -> NoiseFn:
        """Activity tangents: ``noise(index, shape, like)`` draws ``(k, *shape)`` from the
        generator of ``index``, so every tangent can be drawn again."""
        if self.distribution not in ACTIVITY_DISTRIBUTIONS:
            check_distribution(self.distribution, ACTIVITY_DISTRIBUTIONS)

        def draw(index: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
            return self.draw(self.generator(index, like.device), (k, *shape), like)

        return draw
