"""The training loop: one ``fit`` for every way of training, a run directory you can resume.

``fit(config, worker)`` runs ``config`` with a :class:`~.worker.Worker` that says how this
process takes part (:class:`~.worker.LocalWorker`: the whole model here; the workers of
:mod:`forwardonly.distributed` for several processes). Run directory layout::

    config.yaml          resolved config + seed + package/torch/python versions
    metrics.csv/.jsonl   one row per epoch: train loss, train/test error, seconds, samples/s, ...
    learning_curve.png   loss and error per epoch
    checkpoint.pt        model, optimizer, schedule, estimator and RNG state (atomic, each epoch)

Determinism: the shuffle of epoch ``e`` is drawn from ``(seed, e)``, its augmentation from
``(seed, e, 1)`` and the estimator's directions from ``(seed, step)``, so stopping after any
epoch and resuming gives the same parameters as an uninterrupted run.

Device: the data are moved to ``config.device`` once; batches are cut, augmented (with a
generator on that device) and evaluated there, with no per-batch host copy. The shuffle is
drawn on the CPU, so every device visits the examples in the same order; augmentations and
directions are drawn by the device's own generator (CUDA's Philox on a GPU): a run is
reproducible on the GPU as on the CPU, but not bit-equal across the two.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ConfigError, TrainConfig
from ..data import resolve_data_dir
from ..data.augment import augmenter
from ..estimators import Estimator
from ..seeding import mix_seed
from . import checkpoint, records
from .builders import (
    build_model_for,
    estimator_for,
    init_from,
    load_data,
    make_optimizer,
    make_schedule,
)
from .run_dir import CHECKPOINT, load_model_state, plan_run
from .threads import auto_threads, set_threads
from .worker import LocalWorker, Worker, speed_up

Log = Callable[[str], None]
# An epoch whose mean loss exceeds the run's first loss this many times is diverging.
EXPLODING = 100.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunWriteError(RuntimeError):
    """A run directory could not be written (disk full, permissions); says what was kept."""


class OutOfMemory(RuntimeError):
    """The model or a batch does not fit in memory."""


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    model: nn.Module
    estimator: Estimator

    @property
    def test_error(self) -> float:
        return float(self.rows[-1]["test_error"]) if self.rows else math.nan


def fit(config: TrainConfig, worker: Worker | None = None, *, resume: bool | str = False,
        log: Log = print) -> RunResult:
    """Train ``config`` and write its run directory.

    Arguments:
        config: the run's settings.
        worker: how this process takes part; default :class:`LocalWorker` (one process).
        resume: ``True`` continues the stopped run in ``config.out`` (its settings must be
            the run's, except :data:`~.run_dir.RESUMABLE_CHANGES`); ``"auto"`` continues it
            when ``config.out`` holds a checkpoint and starts it otherwise.
        log: where progress lines go (the writer's only).

    Returns:
        the run directory, the per-epoch metrics, and this process's model and estimator.
    """
    config.validate()
    worker = worker or LocalWorker()
    worker.start({**config.to_dict(), "resume": resume})
    try:
        result = _fit(config, worker, resume, log if worker.is_writer else _quiet)
    except BaseException as exc:
        worker.finish(exc)
        raise
    worker.finish(None)
    return result


def _quiet(message: str) -> None:
    pass


def _fit(config: TrainConfig, worker: Worker, resume: bool | str, log: Log) -> RunResult:
    planned, run_dir, resuming = worker.share(lambda: plan_run(config, resume),
                                              "planning the run directory")
    # the writer resolved the settings (a resume takes the run's); each process keeps its own
    # device, threads and data location
    config = dataclasses.replace(planned, device=config.device, threads=config.threads,
                                 progress=config.progress and worker.is_writer,
                                 data_dir=config.data_dir or planned.data_dir)
    set_threads(config.threads)
    data = load_data(config)
    config = dataclasses.replace(config, data_dir=resolve_data_dir(config.dataset,
                                                                   config.data_dir))
    if config.init_from is not None:  # recorded resolved, like the data
        config = dataclasses.replace(config, init_from=str(Path(config.init_from).resolve()))
    with _memory_errors(config):
        model = build_model_for(config, data)
        state: dict[str, Any] | None = None
        if resuming:
            state = worker.share(lambda: checkpoint.load(run_dir / CHECKPOINT),
                                 "reading the checkpoint")
            load_model_state(model, state["model"], run_dir / CHECKPOINT)
        elif config.init_from is not None:
            init_from(model, config.init_from)
        worker.attach(model, lambda part: estimator_for(config, part))
    del model  # a stage holds only its own layers
    speed_up(worker.estimator, compile=config.compile, precision=config.precision,
             device=config.device)
    if config.threads == "auto":  # now that a step's size is known
        size = sum(p.numel() for p in worker.module.parameters())
        torch.set_num_threads(auto_threads(config.batch_size * size))
    opt = make_optimizer(config, worker.module)
    per_epoch = min(config.epoch_size or len(data.train_x), len(data.train_x))
    sched = make_schedule(config, opt, math.ceil(per_epoch / config.batch_size))
    rows: list[dict[str, Any]] = []
    start = 1
    if state is not None:
        start = _restore(config, worker, opt, sched, state, run_dir, log) + 1
        rows = list(state["rows"])
        del state  # the model and optimizer hold their copies now
    else:
        log(f"{worker.describe()}; run directory {run_dir}")
    if worker.is_writer:
        with _writing(run_dir, start - 1):
            run_dir.mkdir(parents=True, exist_ok=True)
            records.write_config(run_dir, config.to_dict())

    device = torch.device(config.device)
    # resident on the device for the whole run: no per-batch host copies
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    val_x, val_y = None, None  # the split to choose settings on, if the data has one
    if data.val_x is not None and data.val_y is not None:
        val_x, val_y = data.val_x.to(device), data.val_y.to(device)
    n_eval = config.train_eval_size or len(data.train_x)
    train_ex, train_ey = train_x[:n_eval], train_y[:n_eval]
    if data.pad_id is not None:  # text: evaluated shortest first, less padding, same errors
        train_ex, train_ey = by_length(train_ex, train_ey, data.pad_id)
        test_x, test_y = by_length(test_x, test_y, data.pad_id)
        if val_x is not None and val_y is not None:
            val_x, val_y = by_length(val_x, val_y, data.pad_id)
    watch = _LossWatch(log)
    for epoch in range(start, config.epochs + 1):
        if config.stop_after is not None and epoch - start >= config.stop_after:
            log(f"stopping after {config.stop_after} epoch(s) (--stop-after); continue with "
                f"forwardonly train --out {run_dir} --resume")
            break
        with _memory_errors(config):
            row = run_epoch(config, worker, opt, sched, train_x, train_y, epoch, run_dir, watch)
            row["train_error"] = worker.error_rate(train_ex, train_ey, config.eval_batch_size)
            if val_x is not None and val_y is not None:
                row["val_error"] = worker.error_rate(val_x, val_y, config.eval_batch_size)
            row["test_error"] = worker.error_rate(test_x, test_y, config.eval_batch_size)
        rows.append(row)
        if not worker.all_finite():
            raise TrainingDiverged(diverged_message(run_dir, epoch, "a parameter"))
        watch.check_epoch(epoch, row["train_loss"])
        worker.end_epoch(epoch)
        model_state, opt_state = worker.model_state(), worker.optimizer_state(opt)
        if worker.is_writer:
            with _writing(run_dir, epoch - 1):
                checkpoint.save({"model": model_state, "optimizer": opt_state,
                                 "scheduler": sched.state_dict(),
                                 "estimator": worker.estimator.state_dict(),
                                 "rng": torch.get_rng_state(), "epoch": epoch, "rows": rows},
                                run_dir / CHECKPOINT)
            with _writing(run_dir, epoch):
                records.write_metrics(run_dir, rows)
                records.plot_curves(run_dir, rows,
                                    f"{config.method} on {config.dataset} ({config.model})")
        val_err = f"val err {100 * row['val_error']:.2f}%  " if "val_error" in row else ""
        log(f"epoch {epoch}/{config.epochs}  loss {row['train_loss']:.4f}  "
            f"train err {100 * row['train_error']:.2f}%  {val_err}"
            f"test err {100 * row['test_error']:.2f}%  "
            f"({row['seconds']:.1f}s, {row['samples_per_s']:.0f} samples/s)")
    return RunResult(run_dir, rows, worker.module, worker.estimator)


def by_length(x: Tensor, y: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id examples ``x`` (right-padded with ``pad_id``) and their labels, ordered by
    length: evaluation batches then hold sentences of similar length, and a model that trims
    each batch to its longest sentence computes on little padding."""
    order = torch.argsort((x != pad_id).sum(dim=1), stable=True)
    return x[order], y[order]


def _restore(config: TrainConfig, worker: Worker, opt: torch.optim.Optimizer, sched: Any,
             state: dict[str, Any], run_dir: Path, log: Log) -> int:
    """Load a checkpoint's optimizer, schedule, estimator and RNG state; its epoch."""
    done = int(state["epoch"])
    if done > config.epochs:
        raise ConfigError(f"--epochs {config.epochs} is fewer than the {done} epochs {run_dir} "
                          f"has already trained; give --epochs {done} or more")
    worker.load_optimizer_state(opt, state["optimizer"])
    saved_lr = opt.param_groups[0]["lr"]
    sched.load_state_dict(state["scheduler"])
    worker.estimator.load_state_dict(state["estimator"])
    torch.set_rng_state(state["rng"])
    if done == config.epochs:
        log(f"{run_dir} has already trained all {done} epochs; nothing to do (give --epochs N "
            f"with N > {done} to train it further)")
    else:
        log(f"resuming {run_dir} after epoch {done} of {config.epochs}")
        lr_now = sched.lr_lambdas[0](sched.last_epoch) * sched.base_lrs[0]
        if saved_lr == 0.0 and lr_now > 0.0:
            log(f"note: the run's {config.schedule} schedule had brought the learning rate to "
                f"0; spread over {config.epochs} epochs it is {lr_now:.3g} again from here")
    return done


def run_epoch(config: TrainConfig, worker: Worker, opt: torch.optim.Optimizer, sched: Any,
              x: Tensor, y: Tensor, epoch: int, run_dir: Path,
              watch: _LossWatch | None = None) -> dict[str, Any]:
    """One pass over ``(x, y)`` in the order drawn from ``(seed, epoch)`` (over its first
    ``epoch_size`` examples, when set); the epoch's metrics row (means weighted by batch size,
    seconds, samples/s, lr)."""
    worker.module.train()
    augment = None
    if config.augment:  # drawn from (seed, epoch) on the data's device: a resumed run alike
        gen = torch.Generator(device=x.device).manual_seed(mix_seed(config.seed, epoch, 1))
        augment = augmenter(config.augment, gen)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(
        mix_seed(config.seed, epoch)))[:config.epoch_size].to(x.device)  # --epoch-size
    sums: dict[str, float] = {}
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch}/{config.epochs}",
               disable=not config.progress, leave=False, unit="batch")
    for i in bar:
        idx = order[i:i + config.batch_size]
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb)
        stats = _train_step(config, worker, opt, xb, yb)
        if not math.isfinite(stats["loss"]):
            raise TrainingDiverged(diverged_message(run_dir, epoch,
                                                    f"the loss ({stats['loss']})"))
        if watch is not None:
            watch.first(stats["loss"])
        sched.step()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"epoch": epoch, "train_loss": sums.pop("loss") / seen}
    row.update({key: value / seen for key, value in sums.items()})
    row.update({"seconds": seconds, "samples_per_s": seen / seconds,
                "lr": opt.param_groups[0]["lr"]})
    return row


def _train_step(config: TrainConfig, worker: Worker, opt: torch.optim.Optimizer,
                xb: Tensor, yb: Tensor) -> dict[str, float]:
    if config.optimizer == "sgd-inplace":  # no gradient buffer (MeZO-style)
        lrs = [group["lr"] for group in opt.param_groups]  # the body's, the head's if apart
        stats = worker.sgd_step(xb, yb, lrs[0], config.weight_decay, lrs[-1])
        opt.step()  # no parameter has a .grad, so a no-op; it keeps the schedule in order
        return stats
    opt.zero_grad(set_to_none=False)
    stats = worker.step(xb, yb)
    if math.isfinite(stats["loss"]):
        if config.clip_grad is not None:
            worker.clip_grad(config.clip_grad)
        opt.step()
    return stats


class _LossWatch:
    """Warns once when the loss explodes without becoming NaN (e.g. Adam at --lr 1e6)."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.reference: float | None = None
        self.warned = False

    def first(self, loss: float) -> None:
        if self.reference is None:
            self.reference = abs(loss)

    def check_epoch(self, epoch: int, loss: float) -> None:
        ref = self.reference
        if self.warned or ref is None or not abs(loss) > EXPLODING * max(ref, 1e-8):
            return
        self.warned = True
        self.log(f"warning: the training loss grew from {ref:.4g} (first step) to {loss:.4g} "
                 f"(epoch {epoch}): training is diverging; lower --lr or add --clip-grad")


def diverged_message(run_dir: Path, epoch: int, what: str) -> str:
    kept = (f"the checkpoint of epoch {epoch - 1} in {run_dir / CHECKPOINT} is kept"
            if epoch > 1 else "no checkpoint had been written yet")
    return (f"training diverged: {what} became NaN/inf during epoch {epoch}; {kept}. "
            f"Lower --lr, add --clip-grad, or use more --directions.")


@contextmanager
def _writing(run_dir: Path, kept_epoch: int) -> Iterator[None]:
    """Turn a failed write (disk full, permissions) into a :class:`RunWriteError` that says
    what the run directory still holds."""
    try:
        yield
    except OSError as exc:
        kept = (f"the checkpoint of epoch {kept_epoch} in {run_dir / CHECKPOINT} is intact "
                f"(it is replaced only by a complete new one); continue with --resume once "
                f"there is room" if kept_epoch > 0 else "no checkpoint had been written yet")
        why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise RunWriteError(f"could not write to {run_dir}: {why} ({exc.filename or run_dir}); "
                            f"{kept}") from exc


@contextmanager
def _memory_errors(config: TrainConfig) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError (CUDA) subclasses RuntimeError
        text = str(exc)
        if not (isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text
                or "out of memory" in text.lower()):
            raise
        first = text.strip().splitlines()[0][:200]
        raise OutOfMemory(f"--model {config.model} with --batch-size {config.batch_size} does "
                          f"not fit in the memory of {config.device} ({first}); use a smaller "
                          f"model or batch") from exc
