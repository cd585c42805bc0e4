"""Choosing the worker: one process, or one rank of a ``torchrun`` group.

The choice sits above both :mod:`forwardonly.train` (which knows nothing of distributed
training) and :mod:`forwardonly.distributed` (whose workers plug into the same ``fit``).
"""

from __future__ import annotations

from collections.abc import Callable

from .config import TrainConfig
from .train import RunResult, fit


def train(config: TrainConfig, *, resume: bool | str = False,
          log: Callable[[str], None] = print) -> RunResult:
    """:func:`~forwardonly.train.fit` with the worker ``config.distributed`` asks for:
    :class:`~forwardonly.train.LocalWorker` when unset, else this process's rank of the
    ``torchrun`` group (``data`` or ``stages``)."""
    if not config.distributed:
        return fit(config, resume=resume, log=log)
    from .distributed import make_worker

    config.validate()
    return fit(config, make_worker(config), resume=resume, log=log)
