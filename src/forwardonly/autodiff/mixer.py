"""Forward mode through LocalMixer layers: primal + K tangents, no autograd graph.

A layer ``out = ReLU(LN_out(linear(LN_in(x))) + u + r)`` carries tangents ``ẋ`` of shape
``(K, *x.shape)`` (one per direction) next to its primal ``x``:

    ȧ = J_LN_in ẋ                     (LayerNorm Jacobian at x)
    ż = ȧ W  [+ a Ẇ + ḃ]               (linear; weight tangents only for weight perturbation)
    ẏ = J_LN_out ż + u                 (u: the activity tangent, injected after LN_out)
    ȯut = [out > 0] ⊙ (ẏ + ṙ)          (ReLU; r is the residual)

The LayerNorm Jacobian is symmetric, so its JVP and its VJP are the same map, ``ln_jvp``.
It is defined with the LayerNorm op itself in :mod:`forwardonly.models.local_norm` (the
model's backward pass needs it too, and models sit below this package); this package
exports it as the LayerNorm rule. Every layer keeps a :class:`LayerTrace` — its
normalized input ``a = LN_in(x)``, its pre-norm output ``z`` with the LN statistics, its ReLU
output and the injected tangent — which is all that :func:`activity_weight_grads` needs to
turn an estimate of ``∂L/∂y`` into weight gradients *inside the layer*:
``g_z = J_LN_out g_y``, ``g_W = aᵀ g_z``. Only one block's traces are alive at a time (for
local losses), so keeping ``a`` costs one activation per layer of one block; recomputing it
would cost a LayerNorm per layer and step.

Where a layer's only tangent is its own ``u`` (the first layer of a block under local
losses), its output tangent ``[out > 0] ⊙ u`` is the masked ``u`` the weight gradient needs:
the trace keeps that one tensor, marked ``u_masked`` (written into ``u``'s own memory when the
layer owns it, as under :func:`block_forward`). After the LayerNorms every tangent operation
is in place: ``u``, the residual's tangent and the ReLU mask go into the layer's own buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.local_mixer import MixerBlock, MixerLayer
from ..models.local_norm import ln_jvp, ln_stats
from .directions import NoiseFn
from .rules import relu_tangent

# weight_tangent(layer_index, layer) -> ((K, *W.shape), (K, *b.shape)) or None
WeightTangentFn = Callable[[int, MixerLayer], "tuple[Tensor, Tensor] | None"]


@dataclass
class LayerTrace:
    """What one layer keeps from the forward pass for its local weight gradient."""

    layer: MixerLayer
    a: Tensor          # (B, P, C_in)  LN_in(x), the input of the linear map
    z: Tensor          # (B, P, C_out) linear output, input of LN_out
    mean: Tensor       # LN_out statistics
    rstd: Tensor
    out: Tensor        # (B, P, C_out) ReLU output; the unit is active where out > 0
    u: Tensor | None   # (K, B, P, C_out) activity tangent injected after LN_out
    u_masked: bool = False  # u already holds [out > 0] ⊙ u


def layer_forward(layer: MixerLayer, x: Tensor, tx: Tensor | None, *, u: Tensor | None = None,
                  wdot: tuple[Tensor, Tensor] | None = None, residual: Tensor | None = None,
                  tresidual: Tensor | None = None, u_owned: bool = False
                  ) -> tuple[Tensor, Tensor | None, LayerTrace]:
    """Primal and tangents through one layer (see the module docstring).

    Arguments:
        x: ``(B, P, C_in)`` primal input; ``tx``: ``(K, B, P, C_in)`` tangents or None (zero).
        u: activity tangent ``(K, B, P, C_out)`` added after ``LN_out``, or None.
        wdot: weight tangents ``((K, *W.shape), (K, *b.shape))``, or None.
        residual, tresidual: the residual added before the ReLU and its tangents.
        u_owned: ``u`` is a buffer no one else reads, which this layer may overwrite: where
            ``u`` is the layer's only tangent, ``[out > 0] ⊙ u`` is written into it.

    Returns:
        ``(out, tout, trace)`` with ``tout`` None when every tangent is zero. Every tangent
        operation after the LayerNorms works in place on a buffer of this layer.
    """
    g = layer.norm_groups
    a, a_mean, a_rstd = ln_stats(x, g)
    ta = None if tx is None else ln_jvp(x, a_mean, a_rstd, tx, g)
    z = layer.linear(a)
    tz = None if ta is None else layer.linear(ta, layer.weight, None)
    del ta  # free each temporary as soon as it is used: one block's worth stays alive
    if wdot is not None:
        tw = layer.linear(a, *wdot)  # a Ẇ_k + ḃ_k for the K directions at once
        tz = tw if tz is None else tz.add_(tw)
        del tw
    y, mean, rstd = ln_stats(z, g)
    ty = None if tz is None else ln_jvp(z, mean, rstd, tz, g)
    del tz
    if residual is not None:
        y = y.add_(residual)
    out = y.relu_()
    if ty is None and tresidual is None:  # the layer's tangent is u alone
        if u is None:
            return out, None, LayerTrace(layer, a, z, mean, rstd, out, None)
        # tout = [out > 0] ⊙ u, which is also what the weight gradient needs: the trace keeps it
        tout = relu_tangent(u, out, inplace=u_owned)
        return out, tout, LayerTrace(layer, a, z, mean, rstd, out, tout, u_masked=True)
    if ty is None:  # no tangent through the layer itself: u and the residual's
        assert tresidual is not None
        ty, owned = (tresidual, False) if u is None else (u + tresidual, True)
    else:  # ty is this layer's own buffer: add u and the residual's tangent into it
        if u is not None:
            ty.add_(u)
        if tresidual is not None:
            ty.add_(tresidual)
        owned = True
    tout = relu_tangent(ty, out, inplace=owned)
    return out, tout, LayerTrace(layer, a, z, mean, rstd, out, u)


def block_forward(block: MixerBlock, x: Tensor, tx: Tensor | None, *, first_index: int,
                  noise: NoiseFn | None = None, weight_tangent: WeightTangentFn | None = None
                  ) -> tuple[Tensor, Tensor | None, list[LayerTrace]]:
    """Primal and tangents through a block; layer ``j`` of the block has global index
    ``first_index + j`` (the index its noise / weight tangents are drawn with). ``noise``
    returns a fresh tensor per call: the layers may write into it (``u_owned``)."""
    h, th = x, tx
    traces: list[LayerTrace] = []
    last = len(block.layers) - 1
    for j, layer in enumerate(block.layers):
        index = first_index + j
        res = block.residual and j == last
        u = None if noise is None else noise(index, (*h.shape[:-1], layer.n_out), h)
        wdot = None if weight_tangent is None else weight_tangent(index, layer)
        h, th, trace = layer_forward(layer, h, th, u=u, wdot=wdot,
                                     residual=x if res else None,
                                     tresidual=tx if res else None, u_owned=True)
        traces.append(trace)
    return h, th, traces


def activity_weight_grads(trace: LayerTrace, coef: Tensor) -> tuple[Tensor, Tensor]:
    """Weight gradients of one layer from its activity tangent: ``g_y = Σ_k coef_k ⊙ u_k``.

    Arguments:
        trace: the layer's :class:`LayerTrace` (with ``u``). Its ``u`` is consumed: the
            product ``coef ⊙ u`` is written into it and ``trace.u`` is set to None.
        coef: directional derivatives of the loss(es) that see each unit, broadcastable to
            the units grouped as ``(K, B, P, G', C_out / G')``: ``(K, B, P, G, 1)`` for
            per-(patch, group) local losses, ``(K, B, P, 1, 1)`` for units feeding every
            group of their patch, ``(K, B, 1, 1, 1)`` for a global per-example loss. It
            already carries the ``1/K`` average and the loss's own batch scaling.

    Returns:
        ``(g_W, g_b)``: ``g_y`` is masked by ReLU activity, sent through ``LN_out``'s VJP
        and multiplied by the layer's own input — no gradient crosses a layer boundary.
    """
    u = trace.u
    if u is None:
        raise ValueError("this layer has no activity tangent: it was run without one, or "
                         "its weight gradient was already taken (trace.u is consumed)")
    trace.u = None  # the product below is written into u's memory
    k, b, p, c = u.shape
    groups = coef.shape[-2]
    gy = u.view(k, b, p, groups, c // groups).mul_(coef)
    gy = (gy[0] if k == 1 else gy.sum(0)).view(b, p, c)
    if not trace.u_masked:  # in place: gy is u's memory (K = 1) or the sum's own buffer
        torch.ops.aten.threshold_backward.grad_input(gy, trace.out, 0.0, grad_input=gy)
    del u
    gz = ln_jvp(trace.z, trace.mean, trace.rstd, gy, trace.layer.norm_groups)
    del gy
    return trace.layer.weight_grad(trace.a, gz)
