"""The training loop: one function, any estimator, a run directory you can resume.

Run directory layout::

    config.yaml          resolved config + seed + package/torch/python versions
    metrics.csv/.jsonl   one row per epoch: train loss, train/test error, seconds, samples/s, ...
    learning_curve.png   loss and error per epoch
    checkpoint.pt        model, optimizer, schedule, estimator and RNG state (atomic, each epoch)

Determinism: the shuffle of epoch ``e`` is drawn from ``(seed, e)`` and the estimator's
directions from ``(seed, step)``, so stopping after any epoch and resuming gives the same
parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ConfigError, TrainConfig, from_dict
from ..data import Dataset, load_dataset, standardize
from ..data.augment import augmenter
from ..estimators import Estimator, make_estimator
from ..estimators.base import ESTIMATORS, mix_seed
from ..models import MODELS, build_model
from . import checkpoint, records

CHECKPOINT = "checkpoint.pt"
# Fields that may differ when resuming: they do not change the trained weights (epochs
# lengthens or shortens the schedule; train_eval_size changes only the recorded train error).
RESUMABLE_CHANGES = {"epochs", "progress", "device", "threads", "eval_batch_size", "data_dir",
                     "dist_timeout", "stop_after", "train_eval_size"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    model: nn.Module
    estimator: Estimator

    @property
    def test_error(self) -> float:
        return self.rows[-1]["test_error"]


def options_for(fn: Callable[..., Any], config: TrainConfig, skip: set[str]) -> dict[str, Any]:
    """The config fields whose names are keyword parameters of ``fn``."""
    params = inspect.signature(fn).parameters
    values = config.to_dict()
    return {n: values[n] for n in params if n in values and n not in skip}


def build(config: TrainConfig, data: Dataset) -> tuple[nn.Module, Estimator]:
    """Model and estimator for ``config`` (on ``config.device``)."""
    torch.manual_seed(config.seed)
    builder = MODELS[config.model]
    cls = ESTIMATORS[config.method]
    try:
        model = build_model(config.model, data.in_shape, data.classes,
                            **options_for(builder, config, {"in_shape", "num_classes"}))
        model = model.to(config.device)
        est = make_estimator(config.method, model, F.cross_entropy,
                             **options_for(cls.__init__, config, {"self", "model", "loss_fn"}))
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot train --model {config.model} with --method "
                          f"{config.method}: {exc}") from exc
    return model, est


def param_groups(config: TrainConfig, model: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: weights apart from biases and other 1-D
    parameters (``decay_biases=False``), or the body and the model's readout ``head`` when
    ``head_lr_scale`` / ``head_weight_decay`` give it its own settings."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not config.decay_biases:  # (TrainConfig.validate rules out the head settings here)
        plain = {id(p) for name, p in model.named_parameters()
                 if p.dim() <= 1 or name.rsplit(".", 1)[-1] == "bias"}
        return [{"params": [p for p in params if id(p) not in plain]},
                {"params": [p for p in params if id(p) in plain], "weight_decay": 0.0}]
    if config.head_lr_scale == 1.0 and config.head_weight_decay is None:
        return [{"params": params}]
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"--head-lr-scale / --head-weight-decay set the readout `head` "
                          f"apart, but model {config.model} has no `head` submodule; drop "
                          f"them (or use a model with a head, such as ff-mlp)")
    in_head = {id(p) for p in head.parameters()}
    decay = config.weight_decay if config.head_weight_decay is None else config.head_weight_decay
    return [{"params": [p for p in params if id(p) not in in_head]},
            {"params": [p for p in params if id(p) in in_head],
             "lr": config.lr * config.head_lr_scale, "weight_decay": decay}]


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd-inplace":  # carries the schedule's lr; stepping it is a no-op
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    groups = param_groups(config, model)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@torch.no_grad()
def error_rate(est: Estimator, x: Tensor, y: Tensor, batch_size: int, device: str) -> float:
    """Fraction of examples whose top-scoring class is wrong."""
    was_training = est.model.training
    est.model.eval()
    wrong = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        wrong += (est.predict(xb).argmax(-1) != yb).sum().item()
    est.model.train(was_training)
    return wrong / max(1, len(x))


def load_run(run_dir: Path, *, data_dir: str | None = None, device: str = "cpu"
             ) -> tuple[TrainConfig, Dataset, nn.Module, Estimator, dict[str, Any]]:
    """A finished (or stopped) run: its config, its data as the run saw it (standardized if
    it was), its model and estimator with the checkpoint's weights, and the checkpoint."""
    config = from_dict(records.read_config(run_dir))
    config = dataclasses.replace(config, device=device, data_dir=data_dir or config.data_dir)
    data = load_dataset(config.dataset, config.data_dir)
    if config.standardize:
        data = standardize(data)
    model, est = build(config, data)
    state = checkpoint.load(run_dir / CHECKPOINT, map_location=device)
    model.load_state_dict(state["model"])
    return config, data, model, est, state


def prepare_run_dir(config: TrainConfig, resume: bool) -> tuple[TrainConfig, Path]:
    if resume and not config.out:
        raise ConfigError("--resume needs --out: the run directory to continue")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.out or f"runs/{config.dataset}-{config.method}-s{config.seed}-{stamp}")
    ckpt = run_dir / CHECKPOINT
    if resume:
        if not ckpt.is_file():
            raise ConfigError(f"--resume: {run_dir} holds no {CHECKPOINT} to resume from")
        saved = from_dict(records.read_config(run_dir))
        changed = {k for k, v in config.to_dict().items() if saved.to_dict()[k] != v}
        changed -= RESUMABLE_CHANGES | {"out"}
        if changed:
            diffs = ", ".join(f"{k}: run has {saved.to_dict()[k]!r}, given {config.to_dict()[k]!r}"
                              for k in sorted(changed))
            raise ConfigError(f"--resume: the given settings differ from the run's ({diffs}); "
                              f"drop them or start a new --out directory")
        keep = {k: getattr(config, k) for k in RESUMABLE_CHANGES}
        config = dataclasses.replace(saved, **keep, out=str(run_dir))
    elif ckpt.exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or "
                          f"choose another --out directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(config, out=str(run_dir)), run_dir


def train(config: TrainConfig, *, resume: bool = False,
          log: Callable[[str], None] = print) -> RunResult:
    """Train ``config`` and write its run directory; ``resume`` continues a stopped run."""
    config.validate()
    if config.distributed:  # this process is one rank of a torchrun group
        from ..distributed.train import train_distributed

        return train_distributed(config, resume=resume, log=log)
    config, run_dir = prepare_run_dir(config, resume)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_dataset(config.dataset, config.data_dir)
    if config.standardize:
        data = standardize(data)
    model, est = build(config, data)
    opt = make_optimizer(config, model)
    steps_per_epoch = math.ceil(len(data.train_x) / config.batch_size)
    from .schedule import lr_schedule

    sched = lr_schedule(opt, config.epochs * steps_per_epoch,
                          round(config.warmup_epochs * steps_per_epoch), config.schedule)
    rows: list[dict[str, Any]] = []
    start = 1
    if resume:
        state = checkpoint.load(run_dir / CHECKPOINT, map_location=config.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        est.load_state_dict(state["estimator"])
        torch.set_rng_state(state["rng"])
        rows, start = list(state["rows"]), int(state["epoch"]) + 1
        log(f"resuming {run_dir} after epoch {start - 1}")
    records.write_config(run_dir, config.to_dict())
    on_gpu = config.device.startswith("cuda")
    train_x, train_y = (data.train_x.to(config.device), data.train_y.to(config.device)) \
        if on_gpu else (data.train_x, data.train_y)

    n_eval = config.train_eval_size or len(data.train_x)
    for epoch in range(start, config.epochs + 1):
        if config.stop_after is not None and epoch - start >= config.stop_after:
            log(f"stopping after {config.stop_after} epoch(s) (--stop-after); continue with "
                f"--resume --out {run_dir}")
            break
        row = _train_epoch(config, est, opt, sched, train_x, train_y, epoch, run_dir)
        row["train_error"] = error_rate(est, data.train_x[:n_eval], data.train_y[:n_eval],
                                        config.eval_batch_size, config.device)
        row["test_error"] = error_rate(est, data.test_x, data.test_y,
                                       config.eval_batch_size, config.device)
        rows.append(row)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDiverged(_diverged_message(run_dir, epoch, "a parameter"))
        checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "estimator": est.state_dict(),
                         "rng": torch.get_rng_state(), "epoch": epoch, "rows": rows},
                        run_dir / CHECKPOINT)
        records.write_metrics(run_dir, rows)
        records.plot_curves(run_dir, rows, f"{config.method} on {config.dataset} ({config.model})")
        log(f"epoch {epoch}/{config.epochs}  loss {row['train_loss']:.4f}  "
            f"train err {100 * row['train_error']:.2f}%  test err {100 * row['test_error']:.2f}%  "
            f"({row['seconds']:.1f}s, {row['samples_per_s']:.0f} samples/s)")
    return RunResult(run_dir, rows, model, est)


def _train_epoch(config, est, opt, sched, x, y, epoch, run_dir) -> dict[str, Any]:
    est.model.train()
    augment = None
    if config.augment:  # drawn from (seed, epoch): a resumed run augments alike
        gen = torch.Generator().manual_seed(mix_seed(config.seed, epoch, 1))
        augment = augmenter(config.augment, gen)

    def train_step(idx: Tensor) -> dict[str, float]:
        xb, yb = x[idx].to(config.device), y[idx].to(config.device)
        if augment is not None:
            xb = augment(xb)
        if config.optimizer == "sgd-inplace":  # no gradient buffer (MeZO-style)
            stats = est.sgd_step(xb, yb, lr=opt.param_groups[0]["lr"],
                                 weight_decay=config.weight_decay)
            opt.step()  # no parameter has a .grad, so a no-op; it keeps the schedule in order
            return stats
        opt.zero_grad(set_to_none=False)
        stats = est.step(xb, yb)
        if math.isfinite(stats["loss"]):
            if config.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(est.model.parameters(), config.clip_grad)
            opt.step()
        return stats

    return run_epoch(config, epoch, len(x), x.device, train_step, opt, sched, run_dir)


def run_epoch(config: TrainConfig, epoch: int, n: int, device: torch.device,
              train_step: Callable[[Tensor], dict[str, float]], opt: torch.optim.Optimizer,
              sched: Any, run_dir: Path) -> dict[str, Any]:
    """One pass over ``n`` examples in the order drawn from ``(seed, epoch)``.

    ``train_step(indices)`` updates the model on that mini-batch and returns its stats;
    returns the epoch's metrics row (means weighted by batch size, seconds, samples/s, lr).
    """
    gen = torch.Generator().manual_seed(mix_seed(config.seed, epoch))
    order = torch.randperm(n, generator=gen).to(device)
    sums: dict[str, float] = {}
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(range(0, n, config.batch_size), desc=f"epoch {epoch}/{config.epochs}",
               disable=not config.progress, leave=False, unit="batch")
    for i in bar:
        idx = order[i:i + config.batch_size]
        stats = train_step(idx)
        if not math.isfinite(stats["loss"]):
            raise TrainingDiverged(_diverged_message(run_dir, epoch, f"the loss ({stats['loss']})"))
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


def _diverged_message(run_dir: Path, epoch: int, what: str) -> str:
    kept = (f"the checkpoint of epoch {epoch - 1} in {run_dir / CHECKPOINT} is kept"
            if epoch > 1 else "no checkpoint had been written yet")
    return (f"training diverged: {what} became NaN/inf during epoch {epoch}; {kept}. "
            f"Lower --lr, add --clip-grad, or use more --directions.")
