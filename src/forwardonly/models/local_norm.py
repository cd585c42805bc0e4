"""LocalMixer's LayerNorm: no scale or shift, over the channels of one patch or of one
channel group of one patch, with its statistics and its Jacobian.

For a row ``x`` of ``D`` values, ``LN(x) = (x − μ) · r`` with ``μ = mean(x)``,
``r = 1 / sqrt(mean((x − μ)²) + ε)``, and the Jacobian

    J = r (I − 11ᵀ/D − x̂x̂ᵀ/D),    x̂ = LN(x),

is symmetric, so the JVP ``J t`` and the VJP ``Jᵀ g`` are the same map; both run as
PyTorch's fused LayerNorm-backward kernel (:func:`ln_jvp`).

On CPU, :func:`ln_stats` computes the statistics with two reductions (the mean, then the
norm of the centred rows) instead of the fused LayerNorm kernel: the same two-pass maths,
and on short rows — a 512-channel layer in 16 groups normalizes rows of 32 — about twice
as fast. :func:`local_layer_norm` is that forward with the fused backward, for autograd
(backprop and every local-backprop method use it, so the comparisons with forward-gradient
methods share the same LayerNorm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5

_LOOP_NUMEL = 1 << 16  # above this many primal elements, ln_jvp loops over the directions


def layer_norm(x: Tensor, groups: int = 1) -> Tensor:
    """Reference LayerNorm (``F.layer_norm``) over the last dim split into ``groups``."""
    if groups == 1:
        return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
    d = x.shape[-1] // groups
    return F.layer_norm(x.unflatten(-1, (groups, d)), (d,), eps=LN_EPS).flatten(-2)


def ln_stats(x: Tensor, groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """``(LN(x), mean, rstd)`` over the last dim split into ``groups`` groups.

    ``mean`` and ``rstd`` have the shape ``torch.native_layer_norm`` gives them,
    ``(..., groups, 1)``, so they feed :func:`ln_jvp` directly.
    """
    d = x.shape[-1] // groups
    xg = x.reshape(*x.shape[:-1], groups, d)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        y, mean, rstd = torch.native_layer_norm(xg, (d,), None, None, LN_EPS)
        return y.reshape(x.shape), mean, rstd
    mean = xg.sum(-1, keepdim=True).div_(d)
    y = xg - mean
    var = torch.linalg.vector_norm(y, dim=-1, keepdim=True).square().div_(d)
    rstd = var.add_(LN_EPS).rsqrt_()
    return y.mul_(rstd).reshape(x.shape), mean, rstd


def ln_jvp(x: Tensor, mean: Tensor, rstd: Tensor, t: Tensor, groups: int) -> Tensor:
    """``J_LN(x) t`` for ``t`` shaped like ``x`` or ``(K, *x.shape)``; also the VJP (J = Jᵀ)."""
    d = x.shape[-1] // groups
    xg = x.reshape(*x.shape[:-1], groups, d)
    if t.dim() == x.dim():
        tg = t.reshape(xg.shape)
        out: Tensor = torch.ops.aten.native_layer_norm_backward(
            tg, xg, (d,), mean, rstd, None, None, [True, False, False])[0]
        return out.reshape(x.shape)
    k = t.shape[0]
    if k == 1:
        return ln_jvp(x, mean, rstd, t[0], groups).unsqueeze(0)
    if x.numel() >= _LOOP_NUMEL:  # large layers: one fused call per direction, no copies
        return torch.stack([ln_jvp(x, mean, rstd, tk, groups) for tk in t])
    # small layers, many directions: one call on K stacked copies of the primal
    xs = xg.expand(k, *xg.shape).reshape(k * xg.shape[0], *xg.shape[1:])
    ms = mean.expand(k, *mean.shape).reshape(k * mean.shape[0], *mean.shape[1:])
    rs = rstd.expand(k, *rstd.shape).reshape(k * rstd.shape[0], *rstd.shape[1:])
    out_k: Tensor = torch.ops.aten.native_layer_norm_backward(
        t.reshape(xs.shape), xs, (d,), ms, rs, None, None, [True, False, False])[0]
    return out_k.reshape(t.shape)


class _LocalLayerNorm(torch.autograd.Function):
    """:func:`ln_stats` forward; backward and forward-mode both through :func:`ln_jvp`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
        return ln_stats(x, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, groups = inputs
        _, mean, rstd = output
        ctx.groups = groups
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd)
        ctx.save_for_forward(x, mean, rstd)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_unused: Tensor) -> tuple[Tensor, None]:
        x, mean, rstd = ctx.saved_tensors
        return ln_jvp(x, mean, rstd, grad.contiguous(), ctx.groups), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _groups: None) -> tuple[Tensor, None, None]:
        x, mean, rstd = ctx.saved_tensors
        return ln_jvp(x, mean, rstd, tangent.contiguous(), ctx.groups), None, None


def local_layer_norm(x: Tensor, groups: int = 1) -> Tensor:
    """LayerNorm of the LocalMixer layers: :func:`layer_norm`'s values, faster on CPU."""
    y: Tensor = _LocalLayerNorm.apply(x, groups)[0]  # type: ignore[no-untyped-call]
    return y
