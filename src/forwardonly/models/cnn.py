"""A small convolutional network: two conv blocks and a linear classifier."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import check_sizes, register_model
from .mlp import make_activation


@register_model("cnn")
def cnn(in_shape: tuple[int, int, int], num_classes: int, *,
        channels: Sequence[int] = (16, 32), activation: str = "relu") -> nn.Sequential:
    """``(Conv3×3 → act → MaxPool2) × len(channels) → Flatten → Linear``.

    Arguments:
        in_shape: ``(C, H, W)`` of one example; ``H`` and ``W`` must survive the pooling
            (each block halves them, rounding down).
        channels: output channels of each conv block.
    """
    c, h, w = check_sizes(in_shape, num_classes, image=True)
    channels = list(channels)
    if not channels or any(int(ch) < 1 for ch in channels):
        raise ValueError(f"channels must be a non-empty list of positive integers, got {channels}")
    if min(h, w) >> len(channels) < 1:
        raise ValueError(
            f"input {h}×{w} is too small for {len(channels)} pooling blocks; "
            f"use fewer channels entries or a larger input"
        )
    layers: list[nn.Module] = []
    for ch in channels:
        layers += [nn.Conv2d(c, int(ch), 3, padding=1), make_activation(activation),
                   nn.MaxPool2d(2)]
        c, h, w = int(ch), h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    return nn.Sequential(*layers)
