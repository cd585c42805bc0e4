"""Learning-rate schedule: linear warmup, then cosine decay to zero, constant, or half-linear."""

from __future__ import annotations

import math

import torch


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  kind: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier ``s/w`` for step ``s < w``; then, with ``t`` going 0 → 1 over the remaining
    steps: ``½(1 + cos(π·t))`` (``kind="cosine"``), 1 (``"constant"``), or
    ``min(1, 2(1 − t))`` (``"half-linear"``: constant for the first half, then linear to zero,
    the schedule of Hinton's Forward-Forward code)."""
    if kind not in ("cosine", "constant", "half-linear"):
        raise ValueError(f"schedule must be cosine, constant or half-linear; got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "half-linear":
            return min(1.0, 2.0 * (1.0 - t))
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
