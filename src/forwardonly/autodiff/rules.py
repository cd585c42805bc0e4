"""Forward-mode rules, one per layer type: a layer's output and its K output tangents.

Tangents are carried next to every activation ``h`` as ``ḣ`` of shape ``(K, *h.shape)``,
one per direction; ``None`` stands for an all-zero tangent (nothing before the layer
depends on a perturbed quantity yet). Hand-written rules:

- Linear ``y = x Wᵀ + b``: ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``; for a rank-one ``Ẇ = b aᵀ`` the middle
  term is the outer product ``(x a) bᵀ``, for a rank-r ``Ẇ = B Aᵀ/√r`` it is
  ``((x A) Bᵀ)/√r``: ``r(p + q)`` per example instead of ``pq`` (:func:`linear_jvp`).
- ReLU: ``ẏ = [y > 0] ⊙ ẋ`` (:func:`relu_tangent`).
- Other elementwise activations: ``ẏ = σ'(x) ⊙ ẋ``, the slope from one JVP with a ones
  tangent (:func:`activation_jvp`).
- Flatten and Identity reshape or pass the tangents.

:func:`run_layers` walks a list of layers with the rule table; any layer without a rule
goes through ``torch.func.jvp`` (vmapped over K). Parameter tangents come from a
:data:`TangentFn`, called just before the layer runs, so no model-sized tangent buffer
exists. :func:`sequential_layers` flattens a (nested) ``nn.Sequential``. A module whose
operations have no forward-mode rule raises :class:`ForwardModeError` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from .directions import Factored, LowRank, Rank1, Streamed

#: ``loss_fn(outputs, targets) -> scalar`` (a mean over the batch)
LossFn = Callable[[Tensor, Tensor], Tensor]
#: tangent(param) -> (K, *param.shape) dense directions, their rank-one / rank-r factors, or
#: (K = 1) a direction drawn block by block where it is used
TangentFn = Callable[[nn.Parameter], "Tensor | Factored | Streamed"]
Rule = Callable[[Any, Tensor, "Tensor | None", TangentFn, int], "tuple[Tensor, Tensor | None]"]

#: Parameter-free elementwise activations: their tangent is the input tangent times a slope.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.Identity,
)


class ForwardModeError(RuntimeError):
    """A module of the model cannot be differentiated in forward mode."""


# -- the rules --------------------------------------------------------------------------

def linear_jvp(h: Tensor, h_dot: Tensor | None, weight: Tensor, bias: Tensor | None,
               w_dot: Tensor | Factored | Streamed | None = None, b_dot: Tensor | None = None
               ) -> tuple[Tensor, Tensor | None]:
    """``y = h Wᵀ + b`` and ``ẏ = ḣ Wᵀ + h Ẇᵀ + ḃ``.

    Arguments:
        h: ``(..., p)`` input; ``h_dot``: ``(K, ..., p)`` tangents or None (zero).
        weight, bias: ``(q, p)`` and ``(q,)`` (bias may be None).
        w_dot: ``(K, q, p)`` weight tangents, their :class:`Rank1` or :class:`LowRank`
            factors, a :class:`Streamed` direction (K = 1: ``h Vᵀ`` one block of output
            columns at a time, from one block of rows of ``V``), or None.
        b_dot: ``(K, q)`` bias tangents or None.

    Returns:
        ``(y, ẏ)``: ``(..., q)`` and ``(K, ..., q)`` (None when every tangent is zero).
        ``ẏ`` is a new buffer the caller owns.
    """
    out = F.linear(h, weight, bias)
    if h.dim() == 2 and not isinstance(w_dot, (LowRank, Streamed)) \
            and _one_direction(h_dot, w_dot, b_dot):
        return out, _linear_jvp_one(h, h_dot, weight, w_dot, b_dot)
    y_dot = None if h_dot is None else h_dot @ weight.T  # (K, ..., q)
    if w_dot is not None:
        if isinstance(w_dot, Rank1):
            proj = h @ w_dot.a.T  # (..., K)
            term = proj.movedim(-1, 0).unsqueeze(-1) * _lift(w_dot.b, h.dim())  # (K, ..., q)
        elif isinstance(w_dot, LowRank):
            k, r, q = w_dot.b.shape
            proj = (h @ w_dot.a.reshape(k * r, -1).T).mul_(w_dot.scale)  # (..., K r)
            proj = proj.reshape(-1, k, r).transpose(0, 1)  # (K, N, r), N = prod(...)
            term = torch.bmm(proj, w_dot.b).view(k, *h.shape[:-1], q)  # (K, ..., q)
        elif isinstance(w_dot, Streamed):  # columns of ẏ from blocks of rows of V, in place
            q = weight.shape[0]
            beta = 1.0
            if y_dot is None:
                y_dot, beta = torch.empty(1, *out.shape, dtype=out.dtype, device=out.device), 0.0
            flat_h, flat_y = h.reshape(-1, h.shape[-1]), y_dot[0].view(-1, q)
            for rows, block in w_dot.blocks():
                flat_y[:, rows].addmm_(flat_h, block.T, beta=beta)  # beta 0: ignore empty
            term = None
        elif h.dim() == 1:  # (K, q, p) @ (p,) -> (K, q)
            term = w_dot @ h
        else:  # (1, ..., p) @ (K, 1.., p, q) -> (K, ..., q)
            w_t = w_dot.transpose(1, 2)
            term = torch.matmul(h.unsqueeze(0), w_t.view(w_t.shape[0], *[1] * (h.dim() - 2),
                                                         *w_t.shape[1:]))
        if term is not None:
            y_dot = term if y_dot is None else y_dot.add_(term)
    if b_dot is not None:
        tb = _lift(b_dot, h.dim())  # (K, 1.., q)
        y_dot = tb.expand(b_dot.shape[0], *out.shape).clone() if y_dot is None \
            else y_dot.add_(tb)
    return out, y_dot


def _one_direction(h_dot: Tensor | None, w_dot: Tensor | Rank1 | None,
                   b_dot: Tensor | None) -> bool:
    """Whether the tangents given (at least one) are a single direction (K = 1)."""
    w = w_dot.b if isinstance(w_dot, Rank1) else w_dot
    ks = [t.shape[0] for t in (h_dot, w, b_dot) if t is not None]
    return bool(ks) and all(k == 1 for k in ks)


def _linear_jvp_one(h: Tensor, h_dot: Tensor | None, weight: Tensor,
                    w_dot: Tensor | Rank1 | None, b_dot: Tensor | None) -> Tensor | None:
    """``ẏ`` of :func:`linear_jvp` for one direction (K = 1) and a ``(B, p)`` input, with
    2-D products that add the bias tangent and accumulate into one ``(B, q)`` buffer:
    ``ẏ = ḃ + ḣ Wᵀ`` (addmm), then ``+= h Vᵀ`` (addmm_) or ``+= (h a) bᵀ`` (addr_)."""
    bias = None if b_dot is None else b_dot[0]
    if h_dot is None and w_dot is None:  # only the bias moves, or nothing
        return None if bias is None else bias.expand(h.shape[0], -1).clone().unsqueeze(0)
    if h_dot is None:  # the weight's tangent product starts the buffer
        assert w_dot is not None
        if isinstance(w_dot, Rank1):
            u, b = h @ w_dot.a[0], w_dot.b[0]
            y = torch.outer(u, b) if bias is None else torch.addr(bias, u, b)
        else:
            y = h @ w_dot[0].T if bias is None else torch.addmm(bias, h, w_dot[0].T)
        return y.unsqueeze(0)
    y = h_dot[0] @ weight.T if bias is None else torch.addmm(bias, h_dot[0], weight.T)
    if isinstance(w_dot, Rank1):
        y.addr_(h @ w_dot.a[0], w_dot.b[0])
    elif w_dot is not None:
        y.addmm_(h, w_dot[0].T)
    return y.unsqueeze(0)


def _lift(v: Tensor, dims: int) -> Tensor:
    """(K, q) -> (K, 1, ..., 1, q) to broadcast against (K, *batch, q) of ``dims`` dims."""
    return v.view(v.shape[0], *([1] * (dims - 1)), v.shape[-1])


def relu_tangent(t: Tensor, out: Tensor, *, inplace: bool = False) -> Tensor:
    """``[out > 0] ⊙ t`` for ``(K, *out.shape)`` tangents of ``out = relu(x)``.

    The fused ReLU-backward kernel, one direction at a time (broadcasting over K would take
    its slow path); ``inplace`` overwrites ``t`` (only for a buffer no one else holds).
    """
    if inplace:
        for tk in t:
            torch.ops.aten.threshold_backward.grad_input(tk, out, 0.0, grad_input=tk)
        return t
    if t.shape[0] == 1:
        one: Tensor = torch.ops.aten.threshold_backward(t[0], out, 0.0)
        return one.unsqueeze(0)
    return torch.stack([torch.ops.aten.threshold_backward(tk, out, 0.0) for tk in t])


def activation_jvp(act: nn.Module, h: Tensor, h_dot: Tensor | None, *, inplace: bool = False
                   ) -> tuple[Tensor, Tensor | None]:
    """An elementwise activation ``y = σ(h)`` and ``ẏ = σ'(h) ⊙ ḣ`` (``ḣ`` ``(K, *h.shape)``)."""
    if isinstance(act, nn.Identity):
        return h, h_dot
    if isinstance(act, nn.ReLU):
        out = F.relu(h)
        return out, None if h_dot is None else relu_tangent(h_dot, out, inplace=inplace)
    if h_dot is None:
        return act(h), None
    out, slope = jvp(act, (h,), (torch.ones_like(h),))[:2]
    return out, h_dot.mul_(slope) if inplace else h_dot * slope


# Rules as the table calls them: (layer, h, ḣ, tangent, K) -> (y, ẏ). The walk owns ḣ.

def _linear(layer: nn.Linear, h: Tensor, h_dot: Tensor | None, tangent: TangentFn, k: int
            ) -> tuple[Tensor, Tensor | None]:
    w, b = layer.weight, layer.bias  # nn.Parameters (the weight is typed Tensor by torch)
    w_dot = tangent(cast(nn.Parameter, w)) if w.requires_grad else None
    b_dot = dense(tangent(b)) if b is not None and b.requires_grad else None
    return linear_jvp(h, h_dot, w, b, w_dot, b_dot)


def _activation(layer: nn.Module, h: Tensor, h_dot: Tensor | None, tangent: TangentFn, k: int
                ) -> tuple[Tensor, Tensor | None]:
    return activation_jvp(layer, h, h_dot, inplace=True)


def _flatten(layer: nn.Flatten, h: Tensor, h_dot: Tensor | None, tangent: TangentFn, k: int
             ) -> tuple[Tensor, Tensor | None]:
    out = layer(h)
    return out, (None if h_dot is None else h_dot.reshape(k, *out.shape))


def _generic_layer(layer: nn.Module, h: Tensor, h_dot: Tensor | None, tangent: TangentFn,
                   k: int) -> tuple[Tensor, Tensor | None]:
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    if not trainable and h_dot is None:
        return layer(h), None
    frozen: dict[str, Tensor] = {n: p for n, p in layer.named_parameters()
                                 if not p.requires_grad}
    frozen.update(dict(layer.named_buffers()))
    primals = {n: p.detach() for n, p in trainable.items()}
    tangents = {n: dense(tangent(p)) for n, p in trainable.items()}
    if h_dot is None:
        h_dot = torch.zeros(k, *h.shape, dtype=h.dtype, device=h.device)

    def f(params: dict[str, Tensor], inp: Tensor) -> Tensor:
        out: Tensor = functional_call(layer, {**frozen, **params}, (inp,))
        return out

    return batched_jvp(f, (primals, h), (tangents, h_dot), k, multi=True)


def dense(t: Tensor | Factored | Streamed) -> Tensor:
    """Dense ``(K, *shape)`` directions from any form."""
    return t.materialize() if isinstance(t, (Rank1, LowRank, Streamed)) else t


RULES: dict[type, Rule] = {
    nn.Linear: _linear,
    nn.Flatten: _flatten,
    **{act: _activation for act in ACTIVATIONS},
}


# -- walking layers ---------------------------------------------------------------------

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


def run_layers(layers: list[tuple[str, nn.Module]], h: Tensor, h_dot: Tensor | None,
               tangent: TangentFn, k: int) -> tuple[Tensor, Tensor | None]:
    """Carry ``(h, ḣ)`` through ``layers``; ``ḣ`` is ``(K, *h.shape)``, or ``None`` while
    nothing depends on the parameters. ``ḣ`` is overwritten: pass a buffer you own. No
    autograd graph is built. Used by :func:`directional_derivatives`, each pipeline stage
    and the latency experiment."""
    with torch.no_grad():
        for name, layer in layers:
            rule = RULES.get(type(layer), _generic_layer)
            with naming(name, layer):
                h, h_dot = rule(layer, h, h_dot, tangent, k)
    return h, h_dot


def loss_and_derivatives(loss_fn: LossFn, h: Tensor, h_dot: Tensor | None, y: Tensor, k: int
                         ) -> tuple[Tensor, Tensor]:
    """The loss and its K directional derivatives ``(K,)`` from the last activation and
    tangents (``F.cross_entropy`` on class indices by :func:`cross_entropy_derivatives`,
    any other loss by ``torch.func.jvp``)."""
    with naming("loss_fn", loss_fn):
        if h_dot is None:
            return loss_fn(h, y), torch.zeros(k, dtype=h.dtype, device=h.device)
        if loss_fn is F.cross_entropy and h.dim() == 2 and y.dim() == 1 \
                and not y.is_floating_point() and h.is_floating_point() \
                and bool((y >= 0).all()):  # no ignore_index (-100) labels
            return cross_entropy_derivatives(h, h_dot, y)
        return batched_jvp(lambda z: loss_fn(z, y), h, h_dot, k)


def cross_entropy_derivatives(z: Tensor, z_dot: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``L = −mean_b log softmax(z_b)[y_b]`` (``F.cross_entropy``, mean over the batch) and
    its K directional derivatives

        d_k = mean_b ( Σ_c softmax(z_b)_c ż_kbc − ż_kb[y_b] )

    for logits ``z`` ``(B, C)``, tangents ``ż`` ``(K, B, C)`` and class indices ``y`` ``(B,)``:
    one ``(B, C)`` buffer (the log-probabilities, then the probabilities in place) where
    ``torch.func.jvp`` of the loss keeps several."""
    logp = F.log_softmax(z, dim=1)
    loss = F.nll_loss(logp, y)
    probs = logp.exp_()
    k, b = z_dot.shape[0], z.shape[0]
    expected = z_dot.reshape(k, -1) @ probs.reshape(-1)  # (K,): Σ_b Σ_c p ż
    picked = z_dot.gather(2, y.view(1, b, 1).expand(k, b, 1)).sum((1, 2))  # (K,): Σ_b ż[y]
    return loss, (expected - picked) / b


def batched_jvp(f: Callable[..., Tensor], primals: Any, tangents: Any, k: int,
                multi: bool = False) -> tuple[Tensor, Tensor]:
    """``jvp`` of ``f`` along K stacked tangents: returns ``(f(primals), (K, ...) tangent)``."""
    primals_t = primals if multi else (primals,)
    tangents_t = tangents if multi else (tangents,)
    if k == 1:
        first = torch.utils._pytree.tree_map(lambda t: t[0], tangents_t)
        out, out_dot = jvp(f, primals_t, first)[:2]
        return out, out_dot.unsqueeze(0)
    out_dims: Any = (None, 0)  # (primal: shared, tangent: batched); torch's stub says int
    out, out_dot = vmap(
        lambda *t: jvp(f, primals_t, t)[:2], in_dims=tuple(0 for _ in tangents_t),
        out_dims=out_dims, randomness="same",
    )(*tangents_t)
    return out, out_dot


@contextmanager
def naming(name: str, module: object) -> Iterator[None]:
    """Turn a forward-mode failure inside ``module`` into a :class:`ForwardModeError`."""
    try:
        yield
    except ForwardModeError:
        raise
    except (RuntimeError, NotImplementedError) as exc:
        raise ForwardModeError(failure_message(f"'{name}' ({type(module).__name__})", exc)
                               ) from exc


def failure_message(where: str, exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"forward-mode AD failed in module {where}: {first_line}. Forward-gradient methods "
        f"need every operation of the model to support forward-mode AD (a custom "
        f"autograd.Function must define jvp and vmap support); replace that module, or train "
        f"it with --method bp or zo (zeroth order needs only forward passes)."
    )
