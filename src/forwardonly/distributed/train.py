"""The training loop of one rank of a distributed run (``--distributed data|stages``).

The same loop as :func:`forwardonly.train.train` — the same shuffles from ``(seed, epoch)``,
the same learning-rate schedule, the same run directory — with the work of a step, the error
rates and the checkpoint state provided by a worker (:class:`DataParallelWorker` or
:class:`StageWorker`). Rank 0 alone writes the run directory, the config, the metrics, the
plot and the checkpoints, shows the progress bar and prints; a checkpoint holds the whole
model and optimizer in the single-process format (``forwardonly eval`` reads it), and
``--resume`` loads it on rank 0 and hands it to every rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TrainConfig
from ..data import load_dataset, standardize
from ..estimators import Estimator, make_estimator
from ..estimators.base import ESTIMATORS
from ..train import checkpoint, records
from ..train.loop import (
    CHECKPOINT,
    RunResult,
    TrainingDiverged,
    _diverged_message,
    build,
    make_optimizer,
    options_for,
    prepare_run_dir,
    run_epoch,
)
from ..train.schedule import lr_schedule
from .data import DataParallelWorker
from .runtime import LaunchEnv, Session
from .stages import StageWorker

Worker = DataParallelWorker | StageWorker


def train_distributed(config: TrainConfig, *, resume: bool = False,
                      log: Callable[[str], None] = print,
                      env: LaunchEnv | None = None) -> RunResult:
    """Train ``config`` as one rank of a torchrun group (``config.distributed`` set).

    Every rank must call this with the same settings (checked at start). ``env`` defaults to
    the torchrun environment. Returns this rank's :class:`RunResult`; its ``model`` is the
    whole model (``data``) or this rank's stage (``stages``).
    """
    config.validate()
    if config.distributed not in ("data", "stages"):
        raise ValueError(f"train_distributed needs config.distributed 'data' or 'stages', "
                         f"got {config.distributed!r}")
    session = Session(env or LaunchEnv.from_environ(), device=config.device,
                      timeout=config.dist_timeout)
    with session:
        return _train(session, config, resume, log if session.is_writer else _quiet)


def _quiet(message: str) -> None:
    pass


def _train(s: Session, config: TrainConfig, resume: bool, log: Callable[[str], None]
           ) -> RunResult:
    s.check_same_config(config.to_dict())
    resolved, run_dir = s.on_writer(lambda: prepare_run_dir(config, resume),
                                    "preparing the run directory")
    # rank 0 resolved the settings (a resume takes the run's); keep this rank's own device etc.
    config = dataclasses.replace(resolved, device=str(s.device), threads=config.threads,
                                 progress=config.progress and s.is_writer,
                                 data_dir=config.data_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_dataset(config.dataset, config.data_dir)
    if config.standardize:
        data = standardize(data)
    model, est = build(config, data)
    state: dict[str, Any] | None = None
    if resume:
        state = s.comm.broadcast_object(
            checkpoint.load(run_dir / CHECKPOINT) if s.is_writer else None, 0,
            "handing the checkpoint to every rank")
        model.load_state_dict(state["model"])  # the whole model, before any split
    worker = _make_worker(config, model, est, s)
    del model, est  # a stage rank keeps only its own layers
    opt = make_optimizer(config, worker.module)
    steps_per_epoch = math.ceil(len(data.train_x) / config.batch_size)
    sched = lr_schedule(opt, config.epochs * steps_per_epoch,
                          round(config.warmup_epochs * steps_per_epoch), config.schedule)
    rows: list[dict[str, Any]] = []
    start = 1
    if state is not None:
        worker.load_optimizer_state(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        worker.estimator.load_state_dict(state["estimator"])
        torch.set_rng_state(state["rng"])
        rows, start = list(state["rows"]), int(state["epoch"]) + 1
        log(f"resuming {run_dir} after epoch {start - 1} on {s.world_size} ranks")
    else:
        mode = {"data": "data-parallel", "stages": "stage-sharded"}[config.distributed]
        log(f"{mode} {config.method} on {s.world_size} ranks "
            f"({s.backend})" + ("".join(f"\n  {d}" for d in worker.describe)
                                if isinstance(worker, StageWorker) else ""))
    if s.is_writer:
        records.write_config(run_dir, config.to_dict())
    on_gpu = s.device.type == "cuda"
    train_x, train_y = (data.train_x.to(s.device), data.train_y.to(s.device)) if on_gpu \
        else (data.train_x, data.train_y)

    n_eval = config.train_eval_size or len(data.train_x)
    for epoch in range(start, config.epochs + 1):
        if config.stop_after is not None and epoch - start >= config.stop_after:
            log(f"stopping after {config.stop_after} epoch(s) (--stop-after); continue with "
                f"--resume --out {run_dir}")
            break
        row = _train_epoch(config, s, worker, opt, sched, train_x, train_y, epoch, run_dir)
        row["train_error"] = worker.error_rate(data.train_x[:n_eval], data.train_y[:n_eval],
                                               config.eval_batch_size,
                                               f"train error, epoch {epoch}")
        row["test_error"] = worker.error_rate(data.test_x, data.test_y, config.eval_batch_size,
                                              f"test error, epoch {epoch}")
        rows.append(row)
        if not worker.all_finite(f"finiteness check, epoch {epoch}"):
            raise TrainingDiverged(_diverged_message(run_dir, epoch, "a parameter"))
        worker.check_in_sync(f"epoch {epoch}")
        model_state = worker.model_state()
        opt_state = worker.optimizer_state(opt)
        if s.is_writer:
            checkpoint.save({"model": model_state, "optimizer": opt_state,
                             "scheduler": sched.state_dict(),
                             "estimator": worker.estimator.state_dict(),
                             "rng": torch.get_rng_state(), "epoch": epoch, "rows": rows,
                             "world_size": s.world_size}, run_dir / CHECKPOINT)
            records.write_metrics(run_dir, rows)
            records.plot_curves(run_dir, rows, f"{config.method} on {config.dataset} "
                                f"({config.model}, {config.distributed} × {s.world_size})")
        log(f"epoch {epoch}/{config.epochs}  loss {row['train_loss']:.4f}  "
            f"train err {100 * row['train_error']:.2f}%  test err {100 * row['test_error']:.2f}%  "
            f"({row['seconds']:.1f}s, {row['samples_per_s']:.0f} samples/s)")
    return RunResult(run_dir, rows, worker.module, worker.estimator)


def _make_worker(config: TrainConfig, model: nn.Module, est: Estimator, s: Session) -> Worker:
    if config.distributed == "data":
        return DataParallelWorker(est, s)
    cls = ESTIMATORS[config.method]
    options = options_for(cls.__init__, config, {"self", "model", "loss_fn"})
    return StageWorker(model, lambda m: make_estimator(config.method, m, F.cross_entropy,
                                                      **options), s)


def _train_epoch(config: TrainConfig, s: Session, worker: Worker, opt: torch.optim.Optimizer,
                 sched: Any, x: Tensor, y: Tensor, epoch: int, run_dir: Any) -> dict[str, Any]:
    worker.module.train()

    def train_step(idx: Tensor) -> dict[str, float]:
        opt.zero_grad(set_to_none=False)
        stats = worker.step(x, y, idx)  # the global batch's stats, the same on every rank
        if math.isfinite(stats["loss"]):
            if config.clip_grad is not None:
                worker.clip_grad(config.clip_grad)
            opt.step()
        return stats

    return run_epoch(config, epoch, len(x), x.device, train_step, opt, sched, run_dir)
