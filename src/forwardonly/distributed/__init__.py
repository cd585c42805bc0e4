"""Distributed forward-gradient training: workers that plug into :func:`forwardonly.train.fit`.

- ``--distributed data`` (:class:`DataParallelWorker`): every rank takes a shard of each batch,
  draws the same directions from the shared seed, and one all-gather of the K directional
  derivatives (+ the loss) per step keeps the parameters bit-identical on every rank; backprop
  runs through ``DistributedDataParallel`` as the baseline.
- ``--distributed stages`` (:class:`StageWorker`): the layers split into pipeline stages, one
  per rank; activations and their tangents flow forward, the last stage broadcasts the K + 1
  scalars, every stage updates its own shard from directions it regenerates.
- Faults are torchrun's and torch.distributed's (see :mod:`.group`); a failed collective on
  gloo ends in a :class:`RankFailure` naming the rank at fault. ``--resume auto`` lets
  ``torchrun --max-restarts N`` continue a run from its last checkpoint by itself.

Launch::

    torchrun --nproc-per-node 2 -m forwardonly train --distributed data --method fg-w
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..config import TrainConfig
from .data import DataParallelWorker, ShardReducer, shard_bounds, shard_sizes
from .group import Group, RankFailure, Traffic, config_digest, launch_ranks, tensor_digest
from .stages import STAGE_METHODS, Phase, StageWorker, split_stages

F = TypeVar("F", bound=Callable[..., object])

__all__ = [
    "STAGE_METHODS", "DataParallelWorker", "Group", "Phase", "RankFailure", "ShardReducer",
    "StageWorker", "Traffic", "config_digest", "launch_ranks", "make_worker", "record_errors",
    "shard_bounds", "shard_sizes", "split_stages", "tensor_digest",
]


def make_worker(config: TrainConfig) -> DataParallelWorker | StageWorker:
    """This process's worker for ``config.distributed`` (``"data"`` or ``"stages"``), its
    rank read from torchrun's environment; the group is joined by ``fit``'s ``start``."""
    if config.distributed not in ("data", "stages"):
        raise ValueError(f"distributed must be 'data' or 'stages', got {config.distributed!r}")
    group = Group(config.device, config.dist_timeout)
    return DataParallelWorker(group) if config.distributed == "data" else StageWorker(group)


def record_errors(fn: F) -> F:
    """``fn`` under torchrun's ``@record``: an exception that escapes it is written to the
    error file torchrun's summary shows (rank, time, message, traceback); outside torchrun it
    changes nothing. For an entry point, e.g. ``sys.exit(record_errors(main)())``."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)
