"""What the benchmarks share: the library's training loop, and the data and thread options."""

from __future__ import annotations

import argparse

import torch

from forwardonly.train import fit  # the library's one loop

__all__ = ["add_data_dir", "add_threads", "fit", "set_threads"]


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="data root or data set folder (default: $FORWARDONLY_DATA; the "
                        "library's load_dataset resolves it)")


def add_threads(p: argparse.ArgumentParser, default: int | None = 1) -> None:
    p.add_argument("--threads", type=int, default=default,
                   help=f"torch threads (default: {default or 'torch default'})")


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
