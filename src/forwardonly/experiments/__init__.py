"""The essay's experiments, one module each, run as ``forwardonly experiment NAME``.

Every module provides the same two functions, which the CLI wires into a subcommand::

    add_arguments(parser: argparse.ArgumentParser) -> None   # its own flags (incl. --out, --seed)
    run(args: argparse.Namespace) -> dict                    # compute, write CSV + PNG, summarize

and plain functions (tensors / arrays in and out) for the computations themselves, so the
numbers can be reproduced from Python without argparse.

Plots are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot, so
running an experiment does not touch the caller's matplotlib backend.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

EXPERIMENTS: dict[str, str] = {
    "dimension-curse": "forwardonly.experiments.dimension_curse",
    "estimator-quality": "forwardonly.experiments.estimator_quality",
    "latency": "forwardonly.experiments.latency",
}


def load_experiment(name: str) -> ModuleType:
    """Import the module that implements experiment ``name`` (e.g. ``"latency"``)."""
    if name not in EXPERIMENTS:
        valid = ", ".join(repr(n) for n in sorted(EXPERIMENTS))
        raise ValueError(f"experiment must be one of {valid}, got {name!r}")
    return importlib.import_module(EXPERIMENTS[name])


def at_least(low: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer of at least ``low``, else a clear usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts sharing the first row's keys) as a CSV with a header line."""
    if not rows:
        raise ValueError(f"refusing to write {path}: there are no rows to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row[k]) for k in fields})
    return path


def _fmt(value: Any) -> Any:
    # Floats with 6 significant digits keep the CSVs readable and diff-friendly.
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous setting.

    Many small element-wise kernels (100,000-element tensors) run far faster on one thread
    than on several when the cores are shared with other work.
    """
    import torch  # here, so that an experiment without torch does not pay for its import

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def available_threads() -> int:
    """Threads for work split by hand (numpy, thread pools): ``$OMP_NUM_THREADS`` when it is
    a positive integer, else the cores this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
