"""How many CPU threads a run uses: ``--threads N``, or ``auto`` (the default).

Threads cost more than they save on small operations and on busy cores: on a shared 2-core
machine the quickstart epoch took 0.46 s with one thread and 3.5 s with torch's default of
two. ``auto`` picks one thread for small steps and otherwise torch's default, capped at the
cores the load average leaves idle.
"""

from __future__ import annotations

import os

import torch

#: torch's own thread count (it honours OMP_NUM_THREADS), before anything here changes it
TORCH_THREADS = torch.get_num_threads()
#: ``threads: auto`` runs a step below this many multiply-adds (batch × parameters) on one
#: thread: its operations are too small for threads to pay for their synchronisation
AUTO_THREADS_MIN_WORK = 1 << 22


def auto_threads(work: int | None = None) -> int:
    """The thread count of ``threads: auto``: one when ``work`` (batch size × parameters) is
    under ``AUTO_THREADS_MIN_WORK``; else torch's default, capped at the cores the 1-minute
    load average leaves idle (rounded, at least one) divided among the processes of this
    machine (``LOCAL_WORLD_SIZE``). Busy cores make threads wait on each other: on a shared
    2-core machine one thread was 5–50× faster than two for every step size measured."""
    if work is not None and work < AUTO_THREADS_MIN_WORK:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    idle = round(cores - os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(TORCH_THREADS, idle // local))


def set_threads(threads: int | str | None) -> None:
    """Apply the ``threads`` setting: a count, ``"auto"`` (:func:`auto_threads`, refined once
    the model is built), or ``None`` (torch's own choice)."""
    if threads == "auto":
        torch.set_num_threads(auto_threads())
    elif threads is not None:
        torch.set_num_threads(int(threads))
