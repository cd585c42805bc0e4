"""What a run writes besides its checkpoint: config, metrics (CSV + JSONL), learning curve."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path
from typing import Any

import torch
import yaml


def versions() -> dict[str, str]:
    from .. import __version__

    return {"forwardonly": __version__, "torch": str(torch.__version__),
            "python": platform.python_version(), "platform": platform.platform()}


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    doc = {"config": config, "versions": versions()}
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(run_dir / "config.yaml")


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml; is it a forwardonly run directory?")
    config: dict[str, Any] = yaml.safe_load(path.read_text())["config"]
    return config


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv and metrics.jsonl from all rows (both stay consistent on resume)."""
    if not rows:
        return
    keys = list(rows[0])
    for row in rows[1:]:
        keys += [k for k in row if k not in keys]
    with open(run_dir / "metrics.csv.tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "metrics.csv.tmp").replace(run_dir / "metrics.csv")
    (run_dir / "metrics.jsonl.tmp").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "metrics.jsonl.tmp").replace(run_dir / "metrics.jsonl")


def plot_curves(run_dir: Path, rows: list[dict[str, Any]], title: str,
                steps_per_epoch: int | None = None) -> None:
    """learning_curve.png: train loss, and train/validation/test error per row. With
    ``steps_per_epoch`` a row is placed at its ``step`` in epochs (a row of a ``max_steps``
    stop inside an epoch between two epochs); errors not measured (``None``, e.g. test with
    ``eval_test="end"``) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def at(r: dict[str, Any]) -> float:
        if steps_per_epoch and r.get("step") is not None:
            return float(r["step"]) / steps_per_epoch
        return float(r["epoch"])

    def curve(key: str) -> tuple[list[float], list[float]]:
        kept = [r for r in rows if r.get(key) is not None]
        return [at(r) for r in kept], [100 * float(r[key]) for r in kept]

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([at(r) for r in rows], [r["train_loss"] for r in rows], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss (mean over the epoch)", title="loss")
    for key, label in (("train_error", "train"), ("val_error", "validation"),
                       ("test_error", "test")):
        xs, ys = curve(key)
        if xs:
            ax_err.plot(xs, ys, marker="o", label=label)
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error")
    ax_err.legend()
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_dir / "learning_curve.png", dpi=100)
    plt.close(fig)
