"""A seeded stream of Gaussian numbers in numpy alone: 16 random bits and one table lookup per
entry.

The table holds 2¹⁶ levels: level ``i`` is ``E[Z | Z in bin i]`` for ``Z ~ N(0, 1)`` and
bins cut at the quantiles ``z_i = Φ⁻¹(i / 2¹⁶)``, i.e. ``2¹⁶ (φ(z_i) − φ(z_{i+1}))``, made
exactly antisymmetric (mean 0) and scaled to a mean square of exactly 1. A uniformly chosen
level therefore has ``E[v] = 0`` and ``E[v²] = 1`` (what keeps a forward gradient unbiased);
its fourth moment is 2.99983 (3 for N(0, 1)) and ``|v| ≤ 4.39``.

The bits are the 64-bit words of numpy's ``PCG64DXSM`` bit generator, whose 128-bit state and
increment are set from the seed by splitmix64, read as four little-endian 16-bit indices each.
A draw of ``n`` entries uses ``⌈n/4⌉`` words, so consecutive draws from one stream are
reproducible too. Numpy keeps a bit generator's stream fixed across releases.

This module imports no torch: :class:`forwardonly.autodiff.directions.GaussianStream` draws
the same entries into tensors (the training directions), and the dimension-curse experiment
uses the arrays directly.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterable, Iterator
from statistics import NormalDist
from typing import Any, TypeVar

import numpy as np

GAUSSIAN_LEVELS = 1 << 16
_MASK64 = (1 << 64) - 1
# one bit generator per thread, loaded with a stream's state for each draw: constructing a
# numpy bit generator costs ~12 µs, loading a state ~2 µs
_BITS = threading.local()
_Stream = TypeVar("_Stream", bound="GaussianStream")


@functools.cache
def gaussian_levels() -> np.ndarray:
    """The 2¹⁶ levels, ascending, float64 (read-only; see the module's docstring)."""
    m = GAUSSIAN_LEVELS
    inv_cdf = NormalDist().inv_cdf
    inner = np.array([inv_cdf(i / m) for i in range(1, m)])
    edges = np.concatenate(([-np.inf], inner, [np.inf]))
    pdf = np.exp(-0.5 * edges * edges) / math.sqrt(2 * math.pi)  # 0 at ±inf
    levels = (pdf[:-1] - pdf[1:]) * m  # (m,) bin means
    levels = (levels - levels[::-1]) / 2
    levels /= np.sqrt(np.mean(levels * levels))
    levels.flags.writeable = False
    return levels


@functools.cache
def _levels_as(dtype: np.dtype) -> np.ndarray:
    table = gaussian_levels().astype(dtype)
    table.flags.writeable = False
    return table


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class GaussianStream:
    """A seeded stream of Gaussian entries: entry ``j`` is ``gaussian_levels()[index j]``,
    the indices being the 16-bit pieces of the stream's words.

    Arguments:
        seed: an integer (e.g. ``mix_seed(step_seed, index)``).
    """

    def __init__(self, seed: int) -> None:
        z = [_splitmix64((int(seed) + i * 0x9E3779B97F4A7C15) & _MASK64) for i in range(4)]
        self._state: dict[str, object] = {
            "bit_generator": "PCG64DXSM", "has_uint32": 0, "uinteger": 0,
            "state": {"state": z[0] << 64 | z[1], "inc": z[2] << 64 | z[3] | 1}}
        self._used = 0  # words drawn so far

    def _seek(self, bits: Any) -> Any:
        """``bits`` (a ``PCG64DXSM``) moved to this stream's position."""
        bits.state = self._state
        if self._used:
            bits.advance(self._used)
        return bits

    def _bits(self, n: int) -> np.random.PCG64DXSM:
        """The thread's bit generator at this stream's position, ``n`` words reserved."""
        bits = getattr(_BITS, "pcg", None)
        if bits is None:
            bits = _BITS.pcg = np.random.PCG64DXSM(0)
        bits = self._seek(bits)
        self._used += n
        return bits

    def skip(self: _Stream, entries: int) -> _Stream:
        """Move on by ``entries`` entries (a multiple of 4: a word holds 4) without drawing
        them; returns the stream. The next draw starts at the entry it would have reached."""
        if entries < 0 or entries % 4:
            raise ValueError(f"a Gaussian stream skips a non-negative multiple of 4 entries, "
                             f"got {entries}")
        self._used += entries // 4
        return self

    def words(self, n: int) -> np.ndarray:
        """The next ``n`` 64-bit words of the stream (uint64)."""
        return self._bits(n).random_raw(n)

    def indices(self, n: int) -> np.ndarray:
        """The level indices of the next ``n`` entries (uint16), ``⌈n/4⌉`` words consumed."""
        return self.words((n + 3) // 4).view(np.uint16)[:n]

    def array(self, shape: int | tuple[int, ...], dtype: type | np.dtype = np.float32,
              out: np.ndarray | None = None) -> np.ndarray:
        """The next ``prod(shape)`` entries as an array of ``shape`` and ``dtype``
        (float32 or float64); written into ``out`` (C-contiguous, that shape) if given."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        table = _levels_as(np.dtype(dtype if out is None else out.dtype))
        idx = self.indices(math.prod(shape))
        if out is None:
            return table.take(idx, mode="clip").reshape(shape)  # clip: no index check
        if out.shape != shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous array of shape {shape}, got "
                             f"{out.shape}{'' if out.flags.c_contiguous else ' (strided)'}")
        table.take(idx, out=out.reshape(-1), mode="clip")
        return out

    def blocks(self, sizes: Iterable[int], dtype: type | np.dtype = np.float32
               ) -> Iterator[np.ndarray]:
        """Consecutive draws of ``sizes[i]`` entries each, as flat arrays: the entries
        :meth:`array` would give called once per size, with one bit generator of its own
        advancing through them instead of a state reload per draw. Each array lives in one
        reused buffer: it is valid until the next one is yielded."""
        sizes = list(sizes)
        table = _levels_as(np.dtype(dtype))
        bits = self._seek(np.random.PCG64DXSM(0))  # its own: no reload between draws
        buf = np.empty(max(sizes, default=0), dtype=table.dtype)
        for size in sizes:
            words = (size + 3) // 4
            self._used += words
            idx = bits.random_raw(words).view(np.uint16)[:size]
            yield table.take(idx, out=buf[:size], mode="clip")
