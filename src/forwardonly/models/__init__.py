"""Model builders, registered by name: ``build_model("mlp", in_shape, num_classes, ...)``.

A builder takes ``(in_shape, num_classes, **options)`` where ``in_shape = (C, H, W)`` of one
example, and returns a plain ``nn.Module`` mapping ``(B, C, H, W)`` inputs to
``(B, num_classes)`` scores. Options it does not know are an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(fn: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return wrap


def build_model(
    name: str, in_shape: tuple[int, int, int], num_classes: int, **options: Any
) -> nn.Module:
    if name not in MODELS:
        valid = ", ".join(repr(n) for n in sorted(MODELS))
        raise ValueError(f"model must be one of {valid}, got {name!r}")
    return MODELS[name](in_shape, num_classes, **options)


# the built-in models register themselves here; ff-mlp with forwardonly.ff (the estimators
# import it, and every public name of forwardonly imports the estimators first)
from . import cnn, local_mixer, mlp  # noqa: E402,F401
