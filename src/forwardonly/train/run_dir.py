"""Run directories: where a run goes, what a resume may change, and reading a finished run.

A resumed run takes every setting from the run itself (its ``config.yaml``); only settings
that cannot change its trajectory may be given anew (:data:`RESUMABLE_CHANGES`: more epochs
or steps, a new data location, the device, what is evaluated and checkpointed when,
cosmetics). So ``forwardonly train --out X --resume`` is
always enough, and gives bit-identically the run that never stopped.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, TrainConfig, from_dict
from . import checkpoint, records

CHECKPOINT = "checkpoint.pt"
# Settings a resume may change: epochs and max_steps lengthen the run (and its schedule);
# train_eval_size and eval_test change only what is measured, checkpoint_every only when the
# state is saved; the rest say where and how the same computation runs.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "progress", "device", "threads",
                               "eval_batch_size", "data_dir", "dist_timeout", "stop_after",
                               "train_eval_size", "eval_test", "checkpoint_every", "compile",
                               "out", "init_from"})


def default_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(f"runs/{config.dataset}-{config.method}-s{config.seed}-{stamp}")


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).is_file()


def saved_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory recorded; a clear :class:`ConfigError` if it is missing,
    unreadable or no longer valid."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: it is not a forwardonly run "
                          f"directory (forwardonly train --out DIR writes one)")
    try:
        values = records.read_config(run_dir)
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} is corrupt ({first}); it must be the YAML file forwardonly "
                          f"wrote, with a 'config' mapping. Restore it from a copy, or start "
                          f"a new run") from exc
    try:
        return from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path} does not hold a valid configuration: {exc}") from exc


def resume_config(out: str | Path, changes: dict[str, Any] | None = None) -> TrainConfig:
    """The run in ``out`` with ``changes`` (the settings a user gave explicitly) on top;
    any change outside :data:`RESUMABLE_CHANGES` is refused by :func:`plan_run`."""
    saved = dataclasses.replace(saved_config(out), stop_after=None)  # a limit of one call
    config = from_dict({k: v for k, v in (changes or {}).items() if k != "out"}, base=saved,
                       validate=False)
    return dataclasses.replace(config, out=str(out))


def plan_run(config: TrainConfig, resume: bool | str) -> tuple[TrainConfig, Path, bool]:
    """Where ``config`` runs and whether it continues a stopped run: ``(config, run_dir,
    resuming)``. ``resume`` is ``False``, ``True`` or ``"auto"`` (continue if the directory
    holds a checkpoint, else start). Creates nothing."""
    if resume not in (False, True, "auto"):
        raise ConfigError(f"resume must be False, True or 'auto'; got {resume!r}")
    if resume and not config.out:
        raise ConfigError("--resume needs --out: the run directory to continue")
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    resuming = bool(resume) and (resume is True or has_checkpoint(run_dir))
    if not resuming:
        if has_checkpoint(run_dir):
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume (or "
                              f"--resume auto), or choose another --out directory")
        return dataclasses.replace(config, out=str(run_dir)), run_dir, False
    if not has_checkpoint(run_dir):
        raise ConfigError(f"--resume: {run_dir} holds no {CHECKPOINT} to continue from "
                          f"(--resume auto starts a new run when there is none)")
    saved = saved_config(run_dir).to_dict()
    given = config.to_dict()
    if given["data_dir"] is None:  # where the run found its data, unless told otherwise
        given["data_dir"] = saved["data_dir"]
    changed = sorted(k for k in given if k not in RESUMABLE_CHANGES and given[k] != saved[k])
    if changed:
        diffs = "; ".join(f"--{k.replace('_', '-')}: the run has {saved[k]!r}, given "
                          f"{given[k]!r}" for k in changed)
        may = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUMABLE_CHANGES - {"out"}))
        raise ConfigError(f"--resume continues {run_dir} with its own settings, and these "
                          f"would change its trajectory: {diffs}. Drop them (only {may} may "
                          f"change), or start a new run in another --out directory")
    return from_dict({**given, "out": str(run_dir)}), run_dir, True


def load_run(run_dir: str | Path, *, data_dir: str | None = None, device: str = "cpu"
             ) -> tuple[TrainConfig, Any, Any, Any, dict[str, Any]]:
    """A finished (or stopped) run: ``(config, data, model, estimator, checkpoint state)``,
    its data as the run saw it (standardized if it was), its model with the checkpoint's
    weights."""
    from .builders import build, load_data

    run_dir = Path(run_dir)
    config = saved_config(run_dir)
    config = dataclasses.replace(config, device=device, data_dir=data_dir or config.data_dir)
    config.validate()
    data = load_data(config)
    model, est = build(config, data)
    state = checkpoint.load(run_dir / CHECKPOINT, map_location=device)
    load_model_state(model, state["model"], run_dir / CHECKPOINT)
    return config, data, model, est, state


def load_model_state(model: Any, state: dict[str, Any], path: Path) -> None:
    """``model.load_state_dict(state)`` with a message that says what to do on a mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise checkpoint.CheckpointError(
            f"{path} holds a model of another shape than its run's config.yaml builds "
            f"({checkpoint.shape_mismatch(exc)}); the config or the checkpoint was replaced. "
            f"Restore the matching pair, or start a new run") from exc
