"""The training loop: one ``fit`` for every way of training, a run directory you can resume.

``fit(config, worker)`` runs ``config`` with a :class:`~.worker.Worker` that says how this
process takes part (:class:`~.worker.LocalWorker`: the whole model here; the workers of
:mod:`forwardonly.distributed` for several processes). Run directory layout::

    config.yaml          resolved config + seed + package/torch/python versions
    metrics.csv/.jsonl   one row per epoch (and one at a --max-steps stop inside an epoch):
                         epoch, cumulative step, train loss, train/val/test error, seconds,
                         samples/s, ...
    learning_curve.png   loss and error per epoch
    checkpoint.pt        model, optimizer, schedule, estimator and RNG state, the step count
                         and the position inside the epoch (atomic; each epoch, at a
                         --max-steps stop, and every --checkpoint-every steps)

Determinism: the shuffle of epoch ``e`` is drawn from ``(seed, e)``, its augmentation from
``(seed, e, 1)`` and the estimator's directions from ``(seed, step)``; a checkpoint inside an
epoch keeps the augmentation generator's state and the batch reached. So stopping after any
step and resuming gives the same parameters as an uninterrupted run (with the same schedule:
a larger ``max_steps`` or ``epochs`` on resume lengthens a decaying one).

Metrics rows: a row's train loss, estimator metrics, seconds and samples/s cover the steps
since the previous row (one epoch, unless a ``max_steps`` stop cut it); its ``step`` is the
run's optimizer steps so far.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ConfigError, TrainConfig
from ..data import resolve_data_dir
from ..data.augment import augmenter
from ..estimators import Estimator
from ..seeding import mix_seed, restore_rng_state, rng_state
from . import checkpoint, records
from .builders import (
    build_model_for,
    estimator_for,
    init_from,
    load_data,
    make_optimizer,
    make_schedule,
    total_steps,
)
from .run_dir import CHECKPOINT, load_model_state, plan_run
from .threads import auto_threads, set_threads
from .worker import LocalWorker, Worker, speed_up

Log = Callable[[str], None]
# An epoch whose mean loss exceeds the run's first loss this many times is diverging.
EXPLODING = 100.0
#: The checkpoint format :func:`fit` writes. 1 (no ``format`` key): epoch ends only; 2 adds
#: ``step``, ``steps_per_epoch`` and, inside an epoch, ``since`` (the metrics accumulated
#: since the last row) and ``augment_rng``; ``cuda_rng`` when CUDA was in use. Format 1
#: checkpoints still load.
CHECKPOINT_FORMAT = 2


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
        """The last row's test error; NaN when it has none (no rows, or ``eval_test="end"``
        and the run's last row was not the end of a call)."""
        value = self.rows[-1].get("test_error") if self.rows else None
        return math.nan if value is None else float(value)


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
    steps_per_epoch = math.ceil(per_epoch / config.batch_size)
    _check_budget(config, steps_per_epoch, log)
    sched = make_schedule(config, opt, steps_per_epoch)
    rows: list[dict[str, Any]] = []
    step, since, augment_state = 0, _Since(), None
    if state is not None:
        step, since, augment_state = _restore(config, worker, opt, sched, state, run_dir,
                                              steps_per_epoch, log)
        rows = with_steps(state["rows"], steps_per_epoch)
        del state  # the model and optimizer hold their copies now
    else:
        log(f"{worker.describe()}; run directory {run_dir}")
    saver = _Saver(worker, opt, sched, run_dir, steps_per_epoch, rows,
                   kept=step if resuming else None)
    if worker.is_writer:
        with _writing(run_dir, saver.kept):
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
    total = total_steps(config, steps_per_epoch)
    first_step, epochs_here = step, 0  # of this call
    while step < total:
        if config.stop_after is not None and epochs_here >= config.stop_after:
            log(f"stopping after {config.stop_after} epoch(s) (--stop-after); continue with "
                f"forwardonly train --out {run_dir} --resume")
            break
        epoch, batch = step // steps_per_epoch + 1, step % steps_per_epoch
        stop = min(steps_per_epoch, batch + total - step)  # the batch this call stops at
        epochs_here += 1
        # the end of this call: test is measured here whatever --eval-test says
        last = stop - batch == total - step or epochs_here == config.stop_after
        generator = None
        if config.augment:  # drawn from (seed, epoch) on the data's device: a resumed run alike
            generator = torch.Generator(device=device).manual_seed(
                mix_seed(config.seed, epoch, 1))
            if augment_state is not None:  # resumed inside the epoch
                generator.set_state(augment_state)
        augment_state = None
        with _memory_errors(config):
            after_step = saver.every(config.checkpoint_every, step - batch, stop, since,
                                     generator)
            row = run_epoch(config, worker, opt, sched, train_x, train_y, epoch, run_dir, watch,
                            start=batch, stop=stop, since=since, generator=generator,
                            after_step=after_step, kept=lambda: saver.kept)
            step = (epoch - 1) * steps_per_epoch + stop
            inside = stop < steps_per_epoch  # a --max-steps stop inside the epoch
            rng = rng_state()  # before evaluating, which the run would not do here
            row = {"epoch": epoch, "step": step, **row}
            row["train_error"] = worker.error_rate(train_ex, train_ey, config.eval_batch_size)
            if val_x is not None and val_y is not None:
                row["val_error"] = worker.error_rate(val_x, val_y, config.eval_batch_size)
            row["test_error"] = (worker.error_rate(test_x, test_y, config.eval_batch_size)
                                 if config.eval_test == "every" or last else None)
        rows.append(row)
        since = _Since()  # the next row covers the steps after this one
        if not worker.all_finite():
            raise TrainingDiverged(diverged_message(run_dir, epoch, "a parameter",
                                                    saver.kept))
        watch.check_epoch(epoch, row["train_loss"])
        worker.end_epoch(epoch)
        if inside:
            saver.save(step, since, rng, generator)
        else:
            saver.save(step, since, rng_state(), None)
        if worker.is_writer:
            with _writing(run_dir, saver.kept):
                records.write_metrics(run_dir, rows)
                records.plot_curves(run_dir, rows,
                                    f"{config.method} on {config.dataset} ({config.model})",
                                    steps_per_epoch)
        log(_row_line(config, row, stop, steps_per_epoch))
    if (config.max_steps is not None and step == config.max_steps > first_step
            and step < config.epochs * steps_per_epoch):
        log(f"stopped at step {step} (--max-steps); continue with forwardonly train --out "
            f"{run_dir} --resume --max-steps N (N > {step})")
    return RunResult(run_dir, rows, worker.module, worker.estimator)


def _row_line(config: TrainConfig, row: dict[str, Any], stop: int, steps_per_epoch: int
              ) -> str:
    """The log line of a metrics row."""
    where = f"epoch {row['epoch']}/{config.epochs}"
    if stop < steps_per_epoch:
        where += f" (to batch {stop} of {steps_per_epoch})"
    val_err = f"val err {100 * row['val_error']:.2f}%  " if "val_error" in row else ""
    test_err = (f"test err {100 * row['test_error']:.2f}%  "
                if row.get("test_error") is not None else "")
    return (f"{where}  step {row['step']}  loss {row['train_loss']:.4f}  "
            f"train err {100 * row['train_error']:.2f}%  {val_err}{test_err}"
            f"({row['seconds']:.1f}s, {row['samples_per_s']:.0f} samples/s)")


def with_steps(rows: list[dict[str, Any]], steps_per_epoch: int) -> list[dict[str, Any]]:
    """``rows`` with a ``step`` column: rows of format-1 checkpoints (whole epochs only)
    lack it, and had taken ``epoch × steps_per_epoch`` steps."""
    return [r if "step" in r else {"epoch": r["epoch"], "step": r["epoch"] * steps_per_epoch,
                                   **r} for r in rows]


def _check_budget(config: TrainConfig, steps_per_epoch: int, log: Log) -> None:
    """Refuse a warmup longer than ``max_steps``; say when ``epochs`` ends the run first."""
    if config.max_steps is None:
        return
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if warmup > config.max_steps:
        raise ConfigError(f"--warmup-epochs {config.warmup_epochs} is {warmup} steps here "
                          f"({steps_per_epoch} per epoch), more than --max-steps "
                          f"{config.max_steps}: the learning rate would never reach --lr. "
                          f"Shorten the warmup (fractions of an epoch are allowed)")
    if config.epochs * steps_per_epoch < config.max_steps:
        log(f"note: --epochs {config.epochs} ends the run after "
            f"{config.epochs * steps_per_epoch} steps ({steps_per_epoch} per epoch), before "
            f"--max-steps {config.max_steps}; give --epochs "
            f"{math.ceil(config.max_steps / steps_per_epoch)} or more to reach it")


def by_length(x: Tensor, y: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id examples ``x`` (right-padded with ``pad_id``) and their labels, ordered by
    length: evaluation batches then hold sentences of similar length, and a model that trims
    each batch to its longest sentence computes on little padding."""
    order = torch.argsort((x != pad_id).sum(dim=1), stable=True)
    return x[order], y[order]


def _restore(config: TrainConfig, worker: Worker, opt: torch.optim.Optimizer, sched: Any,
             state: dict[str, Any], run_dir: Path, steps_per_epoch: int, log: Log
             ) -> tuple[int, _Since, Tensor | None]:
    """Load a checkpoint's optimizer, schedule, estimator and RNG state; the optimizer steps
    it had taken, the metrics accumulated since its last row and, inside an epoch, the
    augmentation generator's state."""
    path = run_dir / CHECKPOINT
    version = int(state.get("format", 1))
    if version > CHECKPOINT_FORMAT:
        raise checkpoint.CheckpointError(
            f"{path} has checkpoint format {version}, newer than this forwardonly reads "
            f"({CHECKPOINT_FORMAT}); resume it with the version that wrote it")
    saved_per_epoch = int(state.get("steps_per_epoch", steps_per_epoch))
    if saved_per_epoch != steps_per_epoch:
        raise ConfigError(f"{path} was written with {saved_per_epoch} steps per epoch, but the "
                          f"training data now gives {steps_per_epoch}: the dataset's files "
                          f"changed since the run started (--data-dir); point --data-dir at "
                          f"the run's own data")
    step = int(state.get("step", int(state["epoch"]) * steps_per_epoch))
    done, batch = divmod(step, steps_per_epoch)
    begun = done + (batch > 0)  # epochs begun, the last one perhaps in part
    if begun > config.epochs:
        raise ConfigError(f"--epochs {config.epochs} is fewer than the {begun} epochs {run_dir} "
                          f"has already trained{' (the last in part)' if batch else ''}; give "
                          f"--epochs {begun} or more")
    if config.max_steps is not None and step > config.max_steps:
        raise ConfigError(f"--max-steps {config.max_steps} is fewer than the {step} steps "
                          f"{run_dir} has already trained; give --max-steps {step} or more")
    worker.load_optimizer_state(opt, state["optimizer"])
    saved_lr = opt.param_groups[0]["lr"]
    sched.load_state_dict(state["scheduler"])
    worker.estimator.load_state_dict(state["estimator"])
    restore_rng_state(state, log)
    if step == config.epochs * steps_per_epoch:
        log(f"{run_dir} has already trained all {done} epochs; nothing to do (give --epochs N "
            f"with N > {done} to train it further)")
    elif step == config.max_steps:
        log(f"{run_dir} has already trained its {step} steps (--max-steps); nothing to do "
            f"(give --max-steps N with N > {step} to train it further)")
    else:
        log(f"resuming {run_dir} after epoch {done} of {config.epochs}" if not batch else
            f"resuming {run_dir} after step {step}: epoch {done + 1} of {config.epochs} from "
            f"batch {batch + 1} of {steps_per_epoch}")
        lr_now = sched.lr_lambdas[0](sched.last_epoch) * sched.base_lrs[0]
        if saved_lr == 0.0 and lr_now > 0.0:
            log(f"note: the run's {config.schedule} schedule had brought the learning rate to "
                f"0; spread over {total_steps(config, steps_per_epoch)} steps it is "
                f"{lr_now:.3g} again from here")
    since = _Since.from_state(state.get("since")) if batch else _Since()
    return step, since, state.get("augment_rng") if batch else None


@dataclass
class _Since:
    """The training metrics accumulated since the last metrics row: sums weighted by batch
    size, examples seen, seconds."""

    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    seconds: float = 0.0

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "seen": self.seen, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> _Since:
        if not state:
            return cls()
        return cls({k: float(v) for k, v in state["sums"].items()}, int(state["seen"]),
                   float(state["seconds"]))


class _Saver:
    """Writes the run's checkpoints (on the writer; every process takes part in gathering the
    state) and remembers which one is on disk, for the messages of a failed run."""

    def __init__(self, worker: Worker, opt: torch.optim.Optimizer, sched: Any, run_dir: Path,
                 steps_per_epoch: int, rows: list[dict[str, Any]], kept: int | None) -> None:
        self.worker, self.opt, self.sched, self.run_dir = worker, opt, sched, run_dir
        self.steps_per_epoch, self.rows = steps_per_epoch, rows
        self.kept_step = kept

    @property
    def kept(self) -> str | None:
        """The checkpoint on disk, in words ("the checkpoint of epoch 3"); None before the
        first."""
        if self.kept_step is None:
            return None
        done, batch = divmod(self.kept_step, self.steps_per_epoch)
        if not batch:
            return f"the checkpoint of epoch {done}"
        return (f"the checkpoint of step {self.kept_step} (epoch {done + 1}, batch {batch} of "
                f"{self.steps_per_epoch})")

    def save(self, step: int, since: _Since, rng: dict[str, Any],
             generator: torch.Generator | None) -> None:
        """The checkpoint after ``step`` optimizer steps; inside an epoch with ``since``'s
        metrics and the augmentation ``generator``'s state."""
        worker = self.worker
        model_state, opt_state = worker.model_state(), worker.optimizer_state(self.opt)
        if worker.is_writer:
            done, batch = divmod(step, self.steps_per_epoch)
            state: dict[str, Any] = {
                "format": CHECKPOINT_FORMAT, "model": model_state, "optimizer": opt_state,
                "scheduler": self.sched.state_dict(),
                "estimator": worker.estimator.state_dict(), **rng,
                "epoch": done, "step": step, "steps_per_epoch": self.steps_per_epoch,
                "rows": self.rows}
            if batch:
                state["since"] = since.state()
                if generator is not None:
                    state["augment_rng"] = generator.get_state()
            with _writing(self.run_dir, self.kept):
                checkpoint.save(state, self.run_dir / CHECKPOINT)
        self.kept_step = step

    def every(self, n: int | None, epoch_start: int, stop: int, since: _Since,
              generator: torch.Generator | None) -> Callable[[int], None] | None:
        """``run_epoch``'s ``after_step`` for ``--checkpoint-every n`` in an epoch whose first
        step is ``epoch_start + 1``: a checkpoint whenever the run's step count reaches a
        multiple of ``n`` before the epoch's ``stop`` (which saves anyway)."""
        if n is None:
            return None

        def after_step(batches_done: int) -> None:
            step = epoch_start + batches_done
            if step % n == 0 and batches_done < stop:
                self.save(step, since, rng_state(), generator)
        return after_step


def run_epoch(config: TrainConfig, worker: Worker, opt: torch.optim.Optimizer, sched: Any,
              x: Tensor, y: Tensor, epoch: int, run_dir: Path,
              watch: _LossWatch | None = None, *, start: int = 0, stop: int | None = None,
              since: _Since | None = None, generator: torch.Generator | None = None,
              after_step: Callable[[int], None] | None = None,
              kept: Callable[[], str | None] | None = None) -> dict[str, Any]:
    """One pass over ``(x, y)`` in the order drawn from ``(seed, epoch)`` (over its first
    ``epoch_size`` examples, when set), or its batches ``start`` to ``stop`` (a resume inside
    the epoch, a ``max_steps`` stop); the metrics row of the steps since the last row (means
    weighted by batch size, seconds, samples/s, lr), which ``since`` has gathered so far.

    ``generator`` draws the augmentations (``_fit`` seeds it from ``(seed, epoch, 1)``, or
    restores it inside an epoch; required when ``config.augment`` is set);
    ``after_step(batches_done)`` runs after each step (e.g. to write a checkpoint);
    ``kept()`` names the checkpoint on disk for the message of a diverged run."""
    worker.module.train()
    augment = None
    if config.augment:
        if generator is None:
            raise ValueError("run_epoch needs the epoch's augmentation generator when "
                             "config.augment is set")
        augment = augmenter(config.augment, generator)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(
        mix_seed(config.seed, epoch)))[:config.epoch_size].to(x.device)  # --epoch-size
    n_batches = math.ceil(len(order) / config.batch_size)
    stop = n_batches if stop is None else stop
    since = _Since() if since is None else since
    t0 = time.perf_counter()
    bar = tqdm(range(start, stop), desc=f"epoch {epoch}/{config.epochs}",
               disable=not config.progress, leave=False, unit="batch",
               initial=start, total=n_batches)
    for b in bar:
        idx = order[b * config.batch_size:(b + 1) * config.batch_size]
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb)
        stats = _train_step(config, worker, opt, xb, yb)
        if not math.isfinite(stats["loss"]):
            on_disk = (kept() if kept is not None
                       else f"the checkpoint of epoch {epoch - 1}" if epoch > 1 else None)
            raise TrainingDiverged(diverged_message(run_dir, epoch,
                                                    f"the loss ({stats['loss']})", on_disk))
        if watch is not None:
            watch.first(stats["loss"])
        sched.step()
        for key, value in stats.items():
            since.sums[key] = since.sums.get(key, 0.0) + value * len(idx)
        since.seen += len(idx)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
        if after_step is not None:
            now = time.perf_counter()  # the time of writing a checkpoint is not training
            since.seconds += now - t0
            after_step(b + 1)
            t0 = time.perf_counter()
    since.seconds += time.perf_counter() - t0
    sums = dict(since.sums)
    row: dict[str, Any] = {"epoch": epoch, "train_loss": sums.pop("loss") / since.seen}
    row.update({key: value / since.seen for key, value in sums.items()})
    row.update({"seconds": since.seconds, "samples_per_s": since.seen / since.seconds,
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


def diverged_message(run_dir: Path, epoch: int, what: str, kept: str | None) -> str:
    """What to say when ``what`` turned NaN in ``epoch``; ``kept``: the checkpoint on disk
    in words (``"the checkpoint of epoch 3"``), None if none was written yet."""
    kept = (f"{kept} in {run_dir / CHECKPOINT} is kept" if kept is not None
            else "no checkpoint had been written yet")
    return (f"training diverged: {what} became NaN/inf during epoch {epoch}; {kept}. "
            f"Lower --lr, add --clip-grad, or use more --directions.")


@contextmanager
def _writing(run_dir: Path, kept: str | None) -> Iterator[None]:
    """Turn a failed write (disk full, permissions) into a :class:`RunWriteError` that says
    what the run directory still holds (``kept``: the checkpoint on disk, in words)."""
    try:
        yield
    except OSError as exc:
        kept = (f"{kept} in {run_dir / CHECKPOINT} is intact (it is replaced only by a "
                f"complete new one); continue with --resume once there is room"
                if kept is not None else "no checkpoint had been written yet")
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
