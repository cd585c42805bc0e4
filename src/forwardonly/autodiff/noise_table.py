"""Gaussian directions read from a table of noise instead of drawn afresh each step.

A shared noise table (Salimans, Ho, Chen, Sidor, Sutskever — *Evolution Strategies as a
Scalable Alternative to Reinforcement Learning*, 2017, arXiv 1703.03864): Gaussian numbers are
drawn once, and a step's direction is a window of the table at an offset chosen from the step's
seed — a view, so a direction costs no random numbers and no copy.

Here every tensor has its own table. For a tensor of ``n`` entries and K directions per step the
table holds ``L = factor · K · n`` entries ``t_0 … t_{L−1}`` of the library's Gaussian
(:class:`~forwardonly.autodiff.directions.GaussianStream`, seeded from the estimator's seed
and the tensor's index), followed by a copy of its first ``K · n`` so that a window starting at
any offset ``o ∈ [0, L)`` is contiguous. The K directions of a step are the ``K · n`` entries
from ``o = mix_seed(step seed, index) mod L`` on, cut into K tensors.

What this keeps and what it changes:

- A window covers ``K · n ≤ L`` distinct table positions, whose entries are independent with
  mean 0 and variance 1: over the table's draw, one step's directions alone are distributed
  as a fresh draw (``E[v] = 0``, ``E[v vᵀ] = I``). So the first step's estimate is unbiased;
  later steps are not, in general: the parameters they start from depend on the table through
  the windows used before.
- What holds at every step is the fixed-table statement: over the step's offset, ``E[v vᵀ]``
  is ``M = (1/L) Σ_o w_o w_oᵀ`` (the windows ``w_o``), so the expected estimate is ``M ∇L``: a
  descent direction (``M`` is positive semi-definite) with the same stationary points where
  ``M`` is positive definite, as if preconditioned by a fixed random matrix. ``M`` is a block of
  the circulant matrix of the table's circular autocorrelation; its eigenvalues have mean 1
  and a spread of about ``1/√factor`` (for 3,000-entry tensors: standard deviation 0.50 at
  factor 4 and 0.25 at factor 16; at factor 4, 98% of them in about [0.26, 2.5], the extremes
  depending on the draw, a smallest of 0.12–0.19 and a largest of about 3.3, widening slowly
  with the size). At factor 1 every offset is used and ``M`` is the whole circulant, whose
  eigenvalues spread like an exponential distribution, some near 0: a factor of at least 4 is
  the useful range. A larger factor brings ``M`` closer to ``I``.
- Steps reuse table entries, so directions of different steps are dependent (two windows that
  overlap are shifts of each other).
- Memory: ``(factor + 1) · K`` times the perturbed parameters, for the whole run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..seeding import mix_seed

#: Default ``factor``: a tensor's table holds this many times the entries of its K directions.
TABLE_FACTOR = 4
# mixed into the estimator's seed for the tables' contents (the steps' seeds mix in the step)
_TABLE_SALT = 0x7AB1E


class NoiseTable:
    """The noise tables of one estimator, one per perturbed tensor, made on first use.

    Arguments:
        seed: the estimator's seed (the tables' contents are drawn from it).
        factor: a positive integer, table entries per direction entry (see the module).
    """

    def __init__(self, seed: int, factor: int = TABLE_FACTOR) -> None:
        if isinstance(factor, bool) or int(factor) != factor or factor < 1:
            raise ValueError(f"table_factor must be a positive integer (table entries per "
                             f"direction entry), got {factor!r}")
        self.seed = int(seed)
        self.factor = int(factor)
        self._tables: dict[int, Tensor] = {}  # tensor index -> its table (L + K·n entries)

    def table(self, index: int, size: int, like: Tensor) -> Tensor:
        """The table of tensor ``index`` for windows of ``size`` entries (``K · n``): made (or
        made again, if the size, dtype or device changed) on first use."""
        from .directions import GaussianStream

        t = self._tables.get(index)
        length = self.factor * size
        if t is None or t.numel() != length + size or t.dtype != like.dtype \
                or t.device != like.device:
            entries = GaussianStream(mix_seed(self.seed, _TABLE_SALT, index)).normal(
                (length,), dtype=like.dtype)
            t = torch.cat([entries, entries[:size]]).to(like.device)
            self._tables[index] = t
        return t

    def window(self, step_seed: int, index: int, like: Tensor, k: int) -> Tensor:
        """``(k, *like.shape)``: the step's K directions of tensor ``index``, a view of its
        table from the offset ``mix_seed(step_seed, index) mod L``. Read-only: writing into
        it would change the table."""
        size = k * like.numel()
        if size == 0:
            return like.new_empty((k, *like.shape))
        t = self.table(index, size, like)
        offset = mix_seed(step_seed, index) % (self.factor * size)
        return t[offset:offset + size].view(k, *like.shape)

    def nbytes(self) -> int:
        """Bytes the tables hold now."""
        return sum(t.numel() * t.element_size() for t in self._tables.values())
