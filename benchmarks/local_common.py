"""Shared pieces of the LocalMixer benchmarks: data, a resumable training loop, CSV output.

The loop follows Ren et al.'s supervised recipe: SGD with momentum 0.9, linear warmup then
cosine decay (``forwardonly.train.schedule.warmup_cosine``), weight decay 1e-4 on the weights
only (not on biases, as in the paper's code), optional per-batch augmentation. One row per
epoch is appended to a CSV as soon as the epoch ends, and a checkpoint is written after every
epoch, so a stopped run resumes where it was and partial results are usable at any time.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import forwardonly.estimators  # noqa: F401  (registers bp, fg-w, ...)
import forwardonly.estimators.activity  # noqa: F401  (fg-a, lg-fg-a)
import forwardonly.estimators.local_bp  # noqa: F401  (l-bp, lg-bp)
import forwardonly.estimators.local_fg  # noqa: F401  (lg-fg-w)
from forwardonly.data import Dataset, load_dataset, standardize
from forwardonly.estimators.base import Estimator, make_estimator, mix_seed
from forwardonly.models.local_mixer import LocalMixer, local_mixer
from forwardonly.train.schedule import warmup_cosine

DATA_DIR = os.environ.get("FORWARDONLY_DATA", str(Path(__file__).resolve().parents[2] / "shared"
                                                   / "data"))
OUT = Path(__file__).resolve().parent / "out" / "local"
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


def load(name: str) -> Dataset:
    """The data set, standardized per channel with training-split statistics."""
    return standardize(load_dataset(name, DATA_DIR))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD momentum 0.9; weight decay on weight matrices only (the paper's choice)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    plain = [p for n, p in model.named_parameters() if p.requires_grad
             and not n.endswith("weight")]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": plain, "weight_decay": 0.0}], lr=lr, momentum=0.9)


@torch.no_grad()
def error_rate(est: Estimator, x: Tensor, y: Tensor, device: str, batch: int = 1000) -> float:
    wrong = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        wrong += int((est.predict(xb).argmax(-1) != yb).sum())
    return wrong / len(x)


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def build(preset: str, method: str, data: Dataset, *, seed: int, directions: int,
          distribution: str, device: str) -> tuple[LocalMixer, Estimator]:
    model = local_mixer(data.in_shape, data.classes, preset, seed=seed).to(device)
    options: dict[str, Any] = {"seed": seed}
    if method in ("fg-w", "fg-w-mixer", "fg-a", "lg-fg-w", "lg-fg-a"):
        options["directions"] = directions
    if method in ("fg-a", "lg-fg-a"):
        options["distribution"] = distribution
    if method == "heads-only":
        return model, make_estimator("l-bp", model, F.cross_entropy, freeze_backbone=True,
                                     seed=seed)
    return model, make_estimator(method, model, F.cross_entropy, **options)


def train_run(*, preset: str, method: str, data: Dataset, epochs: int, lr: float,
              batch_size: int = 128, warmup_epochs: float = 1.0, weight_decay: float = 1e-4,
              seed: int = 0, directions: int = 1, distribution: str = "gaussian",
              device: str = "cpu", csv_path: Path, ckpt_path: Path | None = None,
              train_eval: int = 10_000, stop_after: int | None = None,
              augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
              extra: dict[str, Any] | None = None, log=print) -> list[dict[str, Any]]:
    """Train one (preset, method) run; append one CSV row per epoch; resume from ckpt_path.

    ``train_eval``: the train error is measured on this many fixed training examples (the
    first ones) to save time; ``stop_after``: stop after this many epochs *of this call*
    (chunked runs), the schedule still spanning ``epochs``; ``augment(x, generator)``
    transforms each training batch (its generator is seeded per epoch).
    """
    model, est = build(preset, method, data, seed=seed, directions=directions,
                       distribution=distribution, device=device)
    opt = make_optimizer(model, lr, weight_decay)
    steps = math.ceil(len(data.train_x) / batch_size)
    sched = warmup_cosine(opt, epochs * steps, round(warmup_epochs * steps))
    start = 1
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        est.load_state_dict(state["estimator"])
        start = int(state["epoch"]) + 1
        log(f"resuming {preset} {method} after epoch {start - 1}")
    rows = []
    done = 0
    if device != "cpu":  # keep the data set on the accelerator: no copy per batch
        data = dataclasses.replace(data, train_x=data.train_x.to(device),
                                   train_y=data.train_y.to(device),
                                   test_x=data.test_x.to(device), test_y=data.test_y.to(device))
    for epoch in range(start, epochs + 1):
        if stop_after is not None and done >= stop_after:
            break
        gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(len(data.train_x), generator=gen).to(data.train_x.device)
        aug_gen = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
        t0 = time.perf_counter()
        loss_sum, local_sum, n = 0.0, 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = data.train_x[idx], data.train_y[idx]
            if augment is not None:
                xb = augment(xb, aug_gen)
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=False)
            stats = est.step(xb, yb)
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"{preset} {method}: the loss became {stats['loss']} "
                                         f"in epoch {epoch}; lower the learning rate")
            opt.step()
            sched.step()
            loss_sum += stats["loss"] * len(idx)
            local_sum += stats.get("local_loss", float("nan")) * len(idx)
            n += len(idx)
        seconds = time.perf_counter() - t0
        row = {"preset": preset, "method": method, "epoch": epoch, "epochs": epochs, "lr": lr,
               "directions": directions, "train_loss": loss_sum / n,
               "local_loss": local_sum / n,
               "train_error": 100 * error_rate(est, data.train_x[:train_eval],
                                               data.train_y[:train_eval], device),
               "test_error": 100 * error_rate(est, data.test_x, data.test_y, device),
               "epoch_seconds": round(seconds, 1), **(extra or {})}
        append_row(csv_path, row)
        rows.append(row)
        log(f"{preset} {method} epoch {epoch}/{epochs}: loss {row['train_loss']:.4f} "
            f"train err {row['train_error']:.2f}% test err {row['test_error']:.2f}% "
            f"({seconds:.0f}s)")
        if ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "estimator": est.state_dict(),
                        "epoch": epoch}, tmp)
            os.replace(tmp, ckpt_path)
        done += 1
    return rows
