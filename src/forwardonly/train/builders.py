"""What a config builds: the model, its estimator, the optimizer and the learning-rate schedule.

Options reach the model builder and the estimator through :meth:`TrainConfig.model_options`
and :meth:`TrainConfig.method_options`: each takes exactly the settings its signature names
(the config has already rejected the ones it does not take).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, TrainConfig
from ..data import Dataset
from ..estimators import Estimator, make_estimator
from ..models import build_model
from ..seeding import mix_seed
from .schedule import lr_schedule


def build_model_for(config: TrainConfig, data: Dataset) -> nn.Module:
    """The config's model for ``data``'s shapes, initialized from ``config.seed``, on
    ``config.device``."""
    torch.manual_seed(config.seed)
    try:
        model = build_model(config.model, data.in_shape, data.classes, **config.model_options())
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot build --model {config.model} for {data.name} "
                          f"{data.in_shape}: {exc}") from exc
    freeze_except(model, config.train_params)
    return model.to(config.device)


def init_from(model: nn.Module, source: str | Path) -> None:
    """Load the model weights of the run directory (or checkpoint file) ``source`` into
    ``model``; a :class:`ConfigError` that says what differs when the shapes do not match."""
    from . import checkpoint

    path = Path(source)
    path = path / "checkpoint.pt" if path.is_dir() else path
    try:
        state = checkpoint.load(path)["model"]
    except (checkpoint.CheckpointError, KeyError, TypeError) as exc:
        raise ConfigError(f"--init-from {source}: {exc}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"--init-from {source}: its model has another shape than this "
                          f"run's ({checkpoint.shape_mismatch(exc)}); start from a run of "
                          f"the same --model and dataset") from exc


def estimator_for(config: TrainConfig, model: nn.Module) -> Estimator:
    """The config's estimator (``--method``) over ``model`` with the cross-entropy loss."""
    try:
        return make_estimator(config.method, model, F.cross_entropy, **config.method_options())
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot train --model {config.model} with --method "
                          f"{config.method}: {exc}") from exc


def build(config: TrainConfig, data: Dataset) -> tuple[nn.Module, Estimator]:
    """Model and estimator for ``config`` (on ``config.device``)."""
    model = build_model_for(config, data)
    return model, estimator_for(config, model)


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
    """``adam`` (AdamW: decoupled weight decay), ``sgd`` (with momentum), or, for
    ``sgd-inplace``, a plain SGD that only carries the schedule's learning rates (the
    estimator applies the update itself; stepping it is a no-op)."""
    groups = param_groups(config, model)
    if config.optimizer == "sgd-inplace":
        return torch.optim.SGD(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return adamw(groups, lr=config.lr, weight_decay=config.weight_decay)


def adamw(params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (one pass over each parameter instead of about six
    elementwise kernels: 3–4× faster on the CPU for a few million parameters), where the
    parameters' device and dtype have it; else the plain implementation."""
    params = list(params)  # a generator would be spent by the first attempt
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_schedule(config: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over ``warmup_epochs``, then ``schedule`` over the rest of the run: ``epochs``
    of ``steps_per_epoch`` steps, or ``max_steps`` when that comes first."""
    return lr_schedule(opt, total_steps(config, steps_per_epoch),
                       round(config.warmup_epochs * steps_per_epoch), config.schedule)


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer steps the whole run takes: ``epochs`` epochs, or ``max_steps`` when
    that comes first."""
    total = config.epochs * steps_per_epoch
    return total if config.max_steps is None else min(total, config.max_steps)


def freeze_except(model: nn.Module, patterns: list[str]) -> None:
    """Keep ``requires_grad`` only on parameters whose names match one of ``patterns``
    (``fnmatch`` globs); every estimator perturbs and updates only those. A pattern that
    matches nothing is an error naming the parameters there are."""
    if not patterns:
        return
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ConfigError(f"--train-params {' '.join(repr(p) for p in unmatched)} matches no "
                          f"parameter of --model; its parameters are named {shown}")
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))


def class_subset(y: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices of ``per_class`` examples of every class of ``y``, drawn from ``seed`` (all of
    a class that has fewer), in their original order."""
    gen = torch.Generator().manual_seed(mix_seed(seed, 2))
    keep = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(keep).sort().values


def load_data(config: TrainConfig) -> Dataset:
    """The config's data as training sees it: loaded (text tokenized with the model's
    tokenizer), cut to ``train_subset`` examples per class, images standardized."""
    from ..data import load_dataset, standardize

    data = load_dataset(config.dataset, config.data_dir, **text_options(config))
    if config.train_subset is not None:
        keep = class_subset(data.train_y, config.train_subset, config.seed)
        data = dataclasses.replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])
    if config.standardize and data.train_x.is_floating_point():  # images, not token ids
        data = standardize(data)
    return data


def text_options(config: TrainConfig) -> dict[str, Any]:
    """What a text dataset needs to tokenize: the model's tokenizer and the length limit."""
    from ..data import TEXT_DATASETS

    if config.dataset not in TEXT_DATASETS:
        return {}
    from ..models.text import load_tokenizer

    return {"tokenizer": load_tokenizer(config.model, config.model_path),
            "max_length": config.max_length}
