"""Checkpoints written atomically and read without executing pickled code.

``save`` writes to a temporary file in the same directory, flushes it to disk, then renames
it over the old checkpoint (``os.replace`` is atomic on POSIX and Windows): a crash leaves
either the old or the new checkpoint, never a torn one. ``load`` uses
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable."""


def save(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shape_mismatch(exc: BaseException) -> str:
    """The first lines of ``load_state_dict``'s error (which tensors differ), joined."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:4]
    return "; ".join(lines) or str(exc)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; train first (forwardonly train --out {path.parent}) "
            f"or point to an existing run directory"
        )
    try:
        state: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
        return state
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(
            f"checkpoint {path} could not be read safely ({type(exc).__name__}: {exc}); "
            f"it may be corrupt or not a forwardonly checkpoint"
        ) from exc
