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
- **Streamed** (:func:`streamed_directional_derivative`, K = 1, any ``nn.Module``): dual
  tensors of ``torch.autograd.forward_ad``; a module's own parameters become dual just
  before the module runs and plain again right after, so at most one module's parameter
  tangents exist at a time, and an ``nn.Embedding`` gets a tangent only for the rows the
  batch looks up. The in-place (MeZO-style) forward-gradient step uses it: its memory is
  that of inference plus the activations' tangents.

A module whose operations have no forward-mode rule raises :class:`ForwardModeError`
naming the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
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

    with _naming_failures(model):
        return batched_jvp(f, trainable, tangents, k)


@contextmanager
def _naming_failures(model: nn.Module) -> Iterator[None]:
    """Turn a forward-mode failure into a :class:`ForwardModeError` that names the innermost
    module running when it happened."""
    current: list[str] = []
    hooks = _track_modules(model, current)
    try:
        yield
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


# -- streamed (K = 1) ------------------------------------------------------------------------

#: ``rows(param, ids)``: the rows ``ids`` of ``param``'s (single) direction, ``(*ids.shape,
#: *param.shape[1:])``, drawn without the rest of it.
RowsFn = Callable[[Tensor, Tensor], Tensor]


def streamed_directional_derivative(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
    tangent: TangentFn, rows: RowsFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss and its directional derivative along one direction (K = 1), each parameter's
    tangent drawn only while the module that owns it runs (:func:`streamed_jvp`).

    Returns:
        ``(loss, d)``: the scalar loss and ``d`` of shape ``(1,)``.
    """
    loss, d = streamed_jvp(model, lambda: loss_fn(model(inputs), targets), tangent, rows)
    return loss, d.reshape(1)


def streamed_jvp(model: nn.Module, run: Callable[[], Tensor], tangent: TangentFn,
                 rows: RowsFn | None = None, params: list[nn.Parameter] | None = None
                 ) -> tuple[Tensor, Tensor]:
    """``out = run()`` (a forward through ``model``) and its tangent along one direction of
    ``params`` (by default ``model``'s trainable parameters; the others held fixed), with
    dual tensors.

    ``tangent(p)`` (``(1, *p.shape)``) is called when ``p``'s module starts (again on every
    call of a module that runs twice: it must return the same direction each time); an
    ``nn.Embedding``'s weight (without ``max_norm``) instead gets ``rows(weight, ids)`` for
    the looked-up rows, when ``rows`` is given. Exact for every parameter that is used
    through its own module's forward (all of ``torch.nn``'s layers and Hugging Face models);
    a trainable parameter whose module never ran (unused, or read directly by another module)
    raises :class:`ForwardModeError` rather than silently getting no derivative.

    Returns:
        ``(out, ȯut)``, detached; ``ȯut`` is zeros when no parameter is trainable.
    """
    moving = {id(p) for p in (params if params is not None else model.parameters())
              if p.requires_grad}
    owned = {m: {n: p for n, p in m.named_parameters(recurse=False) if id(p) in moving}
             for m in model.modules()}
    owned = {m: ps for m, ps in owned.items() if ps}
    reached: set[int] = set()

    def by_rows(module: nn.Module) -> bool:
        return rows is not None and isinstance(module, nn.Embedding) \
            and module.max_norm is None

    def enter(module: nn.Module, args: Any) -> None:
        for name, p in owned[module].items():
            if name == "weight" and by_rows(module):
                continue
            module._parameters[name] = fwAD.make_dual(p.detach(), dense(tangent(p))[0])
            reached.add(id(p))

    def leave(module: nn.Module, args: Any, output: Any) -> Any:
        module._parameters.update(owned[module])  # the plain parameters back
        weight = owned[module].get("weight")
        if weight is None or not by_rows(module):
            return None
        assert rows is not None
        reached.add(id(weight))
        primal, out_dot = fwAD.unpack_dual(output)
        t = rows(weight, args[0])
        return fwAD.make_dual(primal, t if out_dot is None else out_dot + t)

    hooks = [h for m in owned for h in (m.register_forward_pre_hook(enter),
                                        m.register_forward_hook(leave))]
    try:
        with _naming_failures(model), torch.no_grad(), fwAD.dual_level():
            primal, out_dot = fwAD.unpack_dual(run())
            primal = primal.clone()  # outlives the dual level
            out_dot = torch.zeros_like(primal) if out_dot is None else out_dot.clone()
    finally:
        for hook in hooks:
            hook.remove()
        for module, plain in owned.items():
            module._parameters.update(plain)
    missed = [n for n, p in model.named_parameters() if id(p) in moving - reached]
    if missed:
        raise ForwardModeError(
            f"the streamed forward-mode pass never ran the module that owns {missed[:5]}"
            f"{' ...' if len(missed) > 5 else ''}: a parameter must be used through its own "
            f"module's forward to get its tangent. Freeze unused parameters (--train-params), "
            f"or use a gradient buffer (--optimizer sgd or adam), which takes the whole-model "
            f"path")
    return primal, out_dot
