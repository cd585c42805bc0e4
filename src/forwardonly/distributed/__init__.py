"""Distributed training: workers that plug into :func:`forwardonly.train.fit`.

``--distributed data`` (:class:`DataParallelWorker`): every rank a shard of each batch, only
the K directional derivatives travel (DDP for backprop). ``--distributed stages``
(:class:`StageWorker`): the layers split into pipeline stages, one per rank. Faults are
torchrun's and torch.distributed's (:mod:`.group`); ``--resume auto`` lets
``torchrun --max-restarts N`` continue a run by itself. Launch::

    torchrun --nproc-per-node 2 -m forwardonly train --distributed data --method fg-w
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

from ..config import TrainConfig
from .data import DataParallelWorker, shard_bounds, shard_sizes
from .group import Group, RankFailure, Traffic, config_digest, launch_ranks, tensor_digest
from .stages import STAGE_METHODS, StageWorker, split_stages

F = TypeVar("F", bound=Callable[..., object])

__all__ = [
    "STAGE_METHODS", "DataParallelWorker", "Group", "RankFailure",
    "StageWorker", "Traffic", "config_digest", "launch_ranks", "make_worker", "record_errors",
    "shard_bounds", "shard_sizes", "split_stages", "tensor_digest",
]


def make_worker(config: TrainConfig) -> DataParallelWorker | StageWorker:
    """This process's worker for ``config.distributed`` (``"data"`` or ``"stages"``), its
    rank read from torchrun's environment; ``fit``'s ``start`` joins the group."""
    if config.distributed not in ("data", "stages"):
        raise ValueError(f"distributed must be 'data' or 'stages', got {config.distributed!r}")
    cls = DataParallelWorker if config.distributed == "data" else StageWorker
    return cls(config.device, config.dist_timeout)


def record_errors(fn: F) -> F:
    """``fn`` under torchrun's ``@record``: an exception that escapes it is written to the
    error file torchrun's summary shows (rank, time, message, traceback); outside torchrun it
    changes nothing. For an entry point, e.g. ``sys.exit(record_errors(main)())``."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return cast(F, record(fn))  # record wraps fn with functools.wraps: the same signature
