"""Exact directional derivatives ``d_k = ∇_θ L · v_k`` of a loss by forward-mode AD.

One forward pass carries, next to every activation ``h``, its tangents ``ḣ_k`` for K
directions at once (shape ``(K, *h.shape)``); nothing is stored for a backward pass.

Two paths give the same numbers:

- **Layer by layer**, for ``nn.Sequential`` models (nested ones are flattened): the rules
  of :mod:`.rules` (hand-written for Linear and activations, ``torch.func.jvp`` for any
  other layer). A layer's parameter tangents are drawn just before the layer runs and
  dropped right after, so no model-sized tangent buffer exists.
- **Whole model**, for any other ``nn.Module``: ``torch.func.jvp`` over
  ``functional_call``, vmapped over K, with the tangents of all parameters drawn up front.

A module whose operations have no forward-mode rule raises :class:`ForwardModeError`
naming the module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .rules import (
    ForwardModeError,
    LossFn,
    TangentFn,
    batched_jvp,
    dense,
    failure_message,
    loss_and_derivatives,
    run_layers,
    sequential_layers,
)


def directional_derivatives(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
    tangent: TangentFn, k: int,
) -> tuple[Tensor, Tensor]:
    """Loss and its K directional derivatives along the directions ``tangent`` returns.

    Returns:
        ``(loss, d)``: the scalar loss and ``d`` of shape ``(K,)``.
    """
    layers = sequential_layers(model)
    with torch.no_grad():
        if layers is not None:
            return _layer_by_layer(layers, loss_fn, inputs, targets, tangent, k)
        return _whole_model(model, loss_fn, inputs, targets, tangent, k)


def _layer_by_layer(layers: list[tuple[str, nn.Module]], loss_fn: LossFn, x: Tensor, y: Tensor,
                    tangent: TangentFn, k: int) -> tuple[Tensor, Tensor]:
    h, h_dot = run_layers(layers, x, None, tangent, k)
    return loss_and_derivatives(loss_fn, h, h_dot, y, k)


# -- whole model ------------------------------------------------------------------------

def _whole_model(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, tangent: TangentFn,
                 k: int) -> tuple[Tensor, Tensor]:
    named = dict(model.named_parameters())
    trainable = {n: p.detach() for n, p in named.items() if named[n].requires_grad}
    frozen: dict[str, Tensor] = {n: p for n, p in named.items() if n not in trainable}
    frozen.update(dict(model.named_buffers()))
    tangents = {n: dense(tangent(named[n])) for n in trainable}

    def f(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, {**frozen, **params}, (x,)), y)

    current: list[str] = []
    hooks = _track_modules(model, current)
    try:
        return batched_jvp(f, trainable, tangents, k)
    except (RuntimeError, NotImplementedError) as exc:
        where = current[-1] if current else "the model's forward"
        raise ForwardModeError(failure_message(where, exc)) from exc
    finally:
        for hook in hooks:
            hook.remove()


def _track_modules(model: nn.Module, current: list[str]) -> list[Any]:
    """Hooks that keep ``current`` = the stack of modules whose forward is running."""

    def enter(label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            current.append(label)
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        current.pop()

    hooks = []
    for name, module in model.named_modules():
        label = f"'{name or '<root>'}' ({type(module).__name__})"
        hooks.append(module.register_forward_pre_hook(enter(label)))
        hooks.append(module.register_forward_hook(leave))
    return hooks
