"""What a config builds: the model, its estimator, the optimizer and the learning-rate schedule.

Options reach the model builder and the estimator through :meth:`TrainConfig.model_options`
and :meth:`TrainConfig.method_options`: each takes exactly the settings its signature names
(the config has already rejected the ones it does not take).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, TrainConfig
from ..data import Dataset
from ..estimators import Estimator, make_estimator
from ..models import build_model
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
    return model.to(config.device)


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
    ``sgd-inplace``, a plain SGD that only carries the schedule's learning rate (the
    estimator applies the update itself; stepping it is a no-op)."""
    if config.optimizer == "sgd-inplace":
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    groups = param_groups(config, model)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(config: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over ``warmup_epochs``, then ``schedule`` over the rest of ``epochs``."""
    return lr_schedule(opt, config.epochs * steps_per_epoch,
                       round(config.warmup_epochs * steps_per_epoch), config.schedule)
