"""Model builders, registered by name: ``build_model("mlp", in_shape, num_classes, ...)``.

A builder takes ``(in_shape, num_classes, **options)`` where ``in_shape = (C, H, W)`` of one
example, and returns a plain ``nn.Module`` mapping ``(B, C, H, W)`` inputs to
``(B, num_classes)`` scores. Options it does not know are an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
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
    name: str, in_shape: tuple[int, ...], num_classes: int, **options: Any
) -> nn.Module:
    """The model ``name`` of :data:`MODELS` for examples of shape ``in_shape``.

    Raises ``ValueError`` naming the valid values for an unknown model or option.
    """
    if name not in MODELS:
        valid = ", ".join(repr(n) for n in sorted(MODELS))
        raise ValueError(f"model must be one of {valid}, got {name!r}")
    builder = MODELS[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [n for n in params if n not in ("in_shape", "num_classes")]
        unknown = [n for n in options if n not in known]
        if unknown:
            raise ValueError(
                f"model {name!r} takes the options {', '.join(known) or 'none'}; "
                f"got unknown {', '.join(unknown)}"
            )
    return builder(in_shape, num_classes, **options)


def check_sizes(in_shape: Sequence[int], num_classes: int, *, image: bool) -> tuple[int, ...]:
    """``in_shape`` as ints, once it and ``num_classes`` are valid sizes.

    ``image=True`` asks for ``(C, H, W)``; otherwise any non-empty shape (it is flattened).
    """
    shape = tuple(int(s) for s in in_shape)
    if image and len(shape) != 3:
        raise ValueError(f"in_shape must be (C, H, W) of one image, got {tuple(in_shape)}")
    if not shape or min(shape) < 1:
        raise ValueError(f"in_shape must be positive sizes, got {tuple(in_shape)}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    return shape


# the built-in models register themselves here; ff-mlp with forwardonly.ff (the estimators
# import it, and every public name of forwardonly imports the estimators first)
from . import cnn, local_mixer, mlp, text  # noqa: E402,F401
