"""Shared pieces of the LocalMixer benchmarks: the paper's figures, training runs, CSV rows.

Runs go through the library's loop (:data:`benchmarks.common.fit`) with Ren et al.'s
supervised recipe: SGD with momentum 0.9, linear warmup then cosine decay, weight decay 1e-4
on the weight matrices only (not on biases, as in the paper's code), optional augmentation.
Each run has its run directory (config, metrics, checkpoint after every epoch), so a stopped
run resumes where it was; one row per finished epoch is also appended to the benchmark's CSV,
so partial results are usable at any time.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import fit
from forwardonly.config import from_dict
from forwardonly.data import Dataset, load_dataset, standardize

METHODS = ("bp", "l-bp", "lg-bp", "fg-w", "fg-w-mixer", "fg-a", "lg-fg-w", "lg-fg-a")

# The paper's test / train error (%), Table 3 (OpenReview version).
PAPER = {
    ("S/1/1", "bp"): (2.66, 0.00), ("M/1/16", "bp"): (2.41, 0.00),
    ("S/1/1", "l-bp"): (2.38, 0.00), ("M/1/16", "l-bp"): (2.16, 0.00),
    ("S/1/1", "lg-bp"): (2.43, 0.00), ("M/1/16", "lg-bp"): (2.81, 0.00),
    ("S/1/1", "fg-w"): (9.25, 8.93), ("M/1/16", "fg-w"): (8.56, 8.64),
    ("S/1/1", "fg-w-mixer"): (9.25, 8.93), ("M/1/16", "fg-w-mixer"): (8.56, 8.64),
    ("S/1/1", "fg-a"): (3.24, 1.53), ("M/1/16", "fg-a"): (3.76, 1.75),
    ("S/1/1", "lg-fg-w"): (9.25, 8.93), ("M/1/16", "lg-fg-w"): (5.66, 4.59),
    ("S/1/1", "lg-fg-a"): (3.24, 1.53), ("M/1/16", "lg-fg-a"): (2.55, 0.00),
    ("M/8/16", "bp"): (33.62, 0.00), ("M/8/16", "l-bp"): (30.75, 0.00),
    ("M/8/16", "lg-bp"): (33.84, 0.05), ("M/8/16", "fg-w"): (55.95, 54.28),
    ("M/8/16", "fg-a"): (59.72, 41.29), ("M/8/16", "lg-fg-w"): (52.70, 51.71),
    ("M/8/16", "lg-fg-a"): (30.68, 19.39),
}


def load(name: str, data_dir: str | None) -> Dataset:
    """The data set (found by the library's rule), standardized per channel with
    training-split statistics."""
    return standardize(load_dataset(name, data_dir))


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def train_run(*, preset: str, method: str, dataset: str, data_dir: str | None, epochs: int,
              lr: float,
              batch_size: int = 128, warmup_epochs: float = 1.0, weight_decay: float = 1e-4,
              seed: int = 0, directions: int = 1, distribution: str = "gaussian",
              device: str = "cpu", csv_path: Path, run_dir: Path, train_eval: int = 10_000,
              stop_after: int | None = None, augment: Sequence[str] = (),
              extra: dict[str, Any] | None = None, log=print) -> list[dict[str, Any]]:
    """Train one (preset, method) run with the library's loop in ``run_dir`` (resumed when
    it holds a checkpoint) and append one CSV row per newly finished epoch to ``csv_path``.

    The recipe above as trainer settings: ``optimizer sgd``, ``momentum 0.9``,
    ``--no-decay-biases``, ``warmup_epochs`` then cosine, standardized inputs. ``train_eval``:
    the train error is measured on the first this-many training examples; ``stop_after``:
    stop after this many epochs of this call (chunked runs), the schedule still spanning
    ``epochs``; ``augment``: the trainer's ``--augment`` names.
    """
    method_options: dict[str, Any] = {"method": method}
    if method == "heads-only":  # the backbone frozen at initialisation, heads trained
        method_options = {"method": "l-bp", "freeze_backbone": True}
    config = from_dict({
        "dataset": dataset, "data_dir": data_dir, "model": "local-mixer", "preset": preset,
        **method_options, "directions": directions, "distribution": distribution,
        "optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": weight_decay,
        "decay_biases": False, "warmup_epochs": warmup_epochs, "schedule": "cosine",
        "batch_size": batch_size, "epochs": epochs, "augment": list(augment), "seed": seed,
        "device": device, "train_eval_size": train_eval, "stop_after": stop_after,
        "out": str(run_dir), "progress": False,
    })
    key = {"preset": preset, "method": method, "epochs": epochs, **(extra or {})}
    finished = [int(r["epoch"]) for r in _rows_of(csv_path, key)]
    resume = (run_dir / "checkpoint.pt").is_file()
    if not resume and finished and max(finished) >= epochs:
        log(f"{preset} {method}: all {epochs} epochs are in {csv_path.name} already")
        return []
    if not resume:  # rows of an earlier run that left no checkpoint cannot be continued
        _drop_rows(csv_path, key)
    metrics = run_dir / "metrics.csv"
    done = max(finished) if resume and finished else 0  # last epoch already in the CSV
    rows: list[dict[str, Any]] = []

    def sync() -> None:  # the trainer's new metrics rows -> the benchmark's CSV
        nonlocal done
        if not metrics.is_file():
            return
        new = [r for r in csv.DictReader(metrics.open()) if int(r["epoch"]) > done]
        for r in new:
            row = {"preset": preset, "method": method, "epoch": int(r["epoch"]),
                   "epochs": epochs, "lr": lr, "directions": directions,
                   "train_loss": float(r["train_loss"]),
                   "local_loss": float(r.get("local_loss") or "nan"),
                   "train_error": 100 * float(r["train_error"]),
                   "test_error": 100 * float(r["test_error"]),
                   "epoch_seconds": round(float(r["seconds"]), 1), **(extra or {})}
            append_row(csv_path, row)
            rows.append(row)
            done = row["epoch"]

    def on_epoch(message: str) -> None:  # called once per finished epoch (and on resume)
        sync()
        log(f"{preset} {method}: {message}")

    fit(config, resume=resume, log=on_epoch)
    sync()
    return rows


def _matches(row: dict[str, str], key: dict[str, Any]) -> bool:
    return all(str(row.get(k)) == str(v) for k, v in key.items())


def _rows_of(path: Path, key: dict[str, Any]) -> list[dict[str, str]]:
    """The CSV rows of one run (``key``: preset, method, schedule length, extra fields)."""
    if not path.is_file():
        return []
    with path.open() as fh:
        return [r for r in csv.DictReader(fh) if _matches(r, key)]


def _drop_rows(path: Path, key: dict[str, Any]) -> None:
    """Rewrite the CSV without the rows of one run (atomically)."""
    if not _rows_of(path, key):
        return
    with path.open() as fh:
        reader = csv.DictReader(fh)
        fields, keep = reader.fieldnames, [r for r in reader if not _matches(r, key)]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)
