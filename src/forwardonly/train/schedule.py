"""Learning-rate schedule: linear warmup, then cosine decay to zero (or constant)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  kind: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier ``s/w`` for step ``s < w``; then ``½(1 + cos(π·t))`` with ``t`` going 0 → 1
    over the remaining steps (``kind="cosine"``), or 1 (``kind="constant"``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
