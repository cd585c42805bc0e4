"""Exact directional derivatives ``d_k = ∇_θ L · v_k`` of a loss by forward-mode AD.

One forward pass carries, next to every activation ``h``, its tangents ``ḣ_k`` for K
directions at once (shape ``(K, *h.shape)``); nothing is stored for a backward pass.

Two paths give the same numbers:

- **Layer by layer**, for ``nn.Sequential`` models (nested ones are flattened). A layer's
  parameter tangents are drawn just before the layer runs and dropped right after, so no
  model-sized tangent buffer exists. ``nn.Linear`` and ``nn.ReLU`` have hand-written rules;
  every other layer goes through ``torch.func.jvp`` (vmapped over K).
  Linear ``y = x Wᵀ + b``: ``ẏ = x Ẇᵀ + ẋ Wᵀ + ḃ``; for a rank-one ``Ẇ = b aᵀ`` the first
  term is the outer product ``(x a) bᵀ``. ReLU: ``ẏ = ẋ ⊙ [x > 0]``.
- **Whole model**, for any other ``nn.Module``: ``torch.func.jvp`` over
  ``functional_call``, vmapped over K, with the tangents of all parameters drawn up front.

A module whose operations have no forward-mode rule raises :class:`ForwardModeError`
naming the module.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from .directions import Rank1

# tangent(param) -> (K, *param.shape) dense directions, or their rank-one factors
TangentFn = Callable[[nn.Parameter], "Tensor | Rank1"]
LossFn = Callable[[Tensor, Tensor], Tensor]


class ForwardModeError(RuntimeError):
    """A module of the model cannot be differentiated in forward mode."""


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


def sequential_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaves of a (nested) ``nn.Sequential`` as ``(name, module)``, else ``None``."""
    if not isinstance(model, nn.Sequential):
        return None
    leaves: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        inner = sequential_layers(child)
        if inner is None:
            leaves.append((name, child))
        else:
            leaves.extend((f"{name}.{n}", m) for n, m in inner)
    return leaves


# -- layer by layer ---------------------------------------------------------------------

def _layer_by_layer(layers, loss_fn, x, y, tangent, k):
    h, h_dot = run_layers(layers, x, None, tangent, k)
    return loss_and_derivatives(loss_fn, h, h_dot, y, k)


def run_layers(layers: list[tuple[str, nn.Module]], h: Tensor, h_dot: Tensor | None,
               tangent: TangentFn, k: int) -> tuple[Tensor, Tensor | None]:
    """Carry ``(h, ḣ)`` through ``layers``; ``ḣ`` is ``(K, *h.shape)``, or ``None`` while
    nothing depends on the parameters. Also used by each pipeline stage of
    :mod:`forwardonly.distributed`."""
    for name, layer in layers:
        rule = _RULES.get(type(layer), _generic_layer)
        with _naming(name, layer):
            h, h_dot = rule(layer, h, h_dot, tangent, k)
    return h, h_dot


def loss_and_derivatives(loss_fn: LossFn, h: Tensor, h_dot: Tensor | None, y: Tensor, k: int
                         ) -> tuple[Tensor, Tensor]:
    """The loss and its K directional derivatives from the last activation and tangents."""
    with _naming("loss_fn", loss_fn):
        if h_dot is None:
            return loss_fn(h, y), torch.zeros(k, dtype=h.dtype, device=h.device)
        return _batched_jvp(lambda z: loss_fn(z, y), h, h_dot, k)


def _linear(layer: nn.Linear, h, h_dot, tangent, k):
    w, b = layer.weight, layer.bias
    out = F.linear(h, w, b)
    y_dot = h_dot @ w.T if h_dot is not None else None  # (K, ..., q)
    if w.requires_grad:
        tw = tangent(w)
        if isinstance(tw, Rank1):
            proj = h @ tw.a.T  # (..., K)
            term = proj.movedim(-1, 0).unsqueeze(-1) * _lift(tw.b, h.dim())  # (K, ..., q)
        elif k == 1 and h.dim() == 2:  # accumulate in place: no separate (B, q) buffer
            if y_dot is None:
                y_dot = (h @ tw[0].T).unsqueeze(0)
            else:
                y_dot[0].addmm_(h, tw[0].T)
            term = None
        else:
            term = torch.matmul(h.unsqueeze(0), tw.transpose(1, 2))  # (K, ..., q)
        if term is not None:
            y_dot = term if y_dot is None else y_dot.add_(term)
    if b is not None and b.requires_grad:
        tb = _lift(tangent(b), h.dim())  # (K, 1.., q)
        y_dot = tb.expand(k, *out.shape).clone() if y_dot is None else y_dot.add_(tb)
    return out, y_dot


def _lift(v: Tensor, dims: int) -> Tensor:
    """(K, q) -> (K, 1, ..., 1, q) to broadcast against (K, *batch, q) of ``dims`` dims."""
    return v.view(v.shape[0], *([1] * (dims - 1)), v.shape[-1])


def _relu(layer: nn.ReLU, h, h_dot, tangent, k):
    out = F.relu(h)
    # h_dot is this walk's own buffer (no caller keeps it): mask it in place
    return out, (None if h_dot is None else h_dot.mul_(h > 0))


def _flatten(layer: nn.Flatten, h, h_dot, tangent, k):
    out = layer(h)
    return out, (None if h_dot is None else h_dot.reshape(k, *out.shape))


def _generic_layer(layer: nn.Module, h, h_dot, tangent, k):
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    if not trainable and h_dot is None:
        return layer(h), None
    frozen = {n: p for n, p in layer.named_parameters() if not p.requires_grad}
    frozen.update(dict(layer.named_buffers()))
    primals = {n: p.detach() for n, p in trainable.items()}
    tangents = {n: _dense(tangent(p)) for n, p in trainable.items()}
    if h_dot is None:
        h_dot = torch.zeros(k, *h.shape, dtype=h.dtype, device=h.device)

    def f(params: dict[str, Tensor], inp: Tensor) -> Tensor:
        return functional_call(layer, {**frozen, **params}, (inp,))

    return _batched_jvp(f, (primals, h), (tangents, h_dot), k, multi=True)


def _dense(t: Tensor | Rank1) -> Tensor:
    return t.materialize() if isinstance(t, Rank1) else t


_RULES: dict[type, Callable[..., tuple[Tensor, Tensor | None]]] = {
    nn.Linear: _linear,
    nn.ReLU: _relu,
    nn.Flatten: _flatten,
    nn.Identity: lambda layer, h, h_dot, tangent, k: (h, h_dot),
}


# -- whole model ------------------------------------------------------------------------

def _whole_model(model, loss_fn, x, y, tangent, k):
    named = dict(model.named_parameters())
    trainable = {n: p.detach() for n, p in named.items() if named[n].requires_grad}
    frozen: dict[str, Tensor] = {n: p for n, p in named.items() if n not in trainable}
    frozen.update(dict(model.named_buffers()))
    tangents = {n: _dense(tangent(named[n])) for n in trainable}

    def f(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, {**frozen, **params}, (x,)), y)

    current: list[str] = []
    hooks = _track_modules(model, current)
    try:
        return _batched_jvp(f, trainable, tangents, k)
    except (RuntimeError, NotImplementedError) as exc:
        where = current[-1] if current else "the model's forward"
        raise ForwardModeError(_message(where, exc)) from exc
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


# -- shared -----------------------------------------------------------------------------

def _batched_jvp(f, primals, tangents, k, multi: bool = False):
    """``jvp`` of ``f`` along K stacked tangents: returns ``(f(primals), (K, ...) tangent)``."""
    primals_t = primals if multi else (primals,)
    tangents_t = tangents if multi else (tangents,)
    if k == 1:
        first = torch.utils._pytree.tree_map(lambda t: t[0], tangents_t)
        out, out_dot = jvp(f, primals_t, first)
        return out, out_dot.unsqueeze(0)
    out, out_dot = vmap(
        lambda *t: jvp(f, primals_t, t), in_dims=tuple(0 for _ in tangents_t),
        out_dims=(None, 0), randomness="same",
    )(*tangents_t)
    return out, out_dot


@contextmanager
def _naming(name: str, module: object):
    try:
        yield
    except ForwardModeError:
        raise
    except (RuntimeError, NotImplementedError) as exc:
        raise ForwardModeError(_message(f"'{name}' ({type(module).__name__})", exc)) from exc


def _message(where: str, exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"forward-mode AD failed in module {where}: {first_line}. Forward-gradient methods "
        f"need every operation of the model to support forward-mode AD (a custom "
        f"autograd.Function must define jvp and vmap support); replace that module, or train "
        f"it with --method bp or zo (zeroth order needs only forward passes)."
    )
