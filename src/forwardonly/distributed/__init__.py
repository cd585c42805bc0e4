"""Distributed forward-gradient training on ``torch.distributed`` (launched with torchrun).

- ``--distributed data`` (:class:`DataParallelWorker`): every rank takes a shard of each batch,
  draws the same directions from the shared seed, and one all-gather of the K directional
  derivatives (+ the loss) per step keeps the parameters bit-identical on every rank; backprop
  runs through ``DistributedDataParallel`` as the baseline.
- ``--distributed stages`` (:class:`StageWorker`): the layers split into pipeline stages, one
  per rank; activations and their tangents flow forward, the last stage broadcasts the K + 1
  scalars, every stage updates its own shard from directions it regenerates.
- Faults (:class:`Watchdog`): a rank that dies or hangs, or fails, makes the others stop with
  a :class:`RankFailure` naming it; mismatched settings are caught at start.

Launch::

    torchrun --nproc-per-node 2 -m forwardonly train --distributed data --method fg-w
"""

from .comm import Comm, Traffic
from .data import DataParallelWorker, ShardReducer, shard_bounds, shard_sizes
from .runtime import LaunchEnv, Session, config_digest
from .stages import STAGE_METHODS, Phase, StageWorker, split_stages
from .train import train_distributed
from .watchdog import EXIT_CODE, RankFailure, Watchdog

__all__ = [
    "EXIT_CODE", "STAGE_METHODS", "Comm", "DataParallelWorker", "LaunchEnv", "Phase",
    "RankFailure", "Session", "ShardReducer", "StageWorker", "Traffic", "Watchdog",
    "config_digest", "shard_bounds", "shard_sizes", "split_stages", "train_distributed",
]
