"""Activity perturbation for plain ``nn.Sequential`` MLPs (the global-loss FG-A).

For ``Flatten → (Linear → activation) × L → Linear`` (the ``mlp`` model): a tangent ``u`` is
added to every hidden pre-activation ``z = x Wᵀ + b``; one forward pass carrying K tangents
gives each example's directional derivative ``d[k, b]`` of the loss through the last Linear
layer (the head), and inside each hidden layer

    g_z = (1/K) Σ_k d_k u_k [⊙ (z > 0) for ReLU],   g_W = g_zᵀ x,   g_b = Σ_b g_z.

The head (last Linear) trains on its exact gradient, as LocalMixer's heads do. Only
Flatten, Linear, Identity and elementwise activations are supported; anything else is an
error that names the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp

from ..estimators.base import set_grad

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.Identity)
LossFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[int, tuple[int, ...], Tensor], Tensor]


def flat_layers(model: nn.Module) -> list[nn.Module]:
    """The leaves of a (nested) ``nn.Sequential``."""
    out: list[nn.Module] = []
    for child in model.children():
        out += flat_layers(child) if isinstance(child, nn.Sequential) else [child]
    return out


def check_sequential(model: nn.Module) -> str | None:
    """``None`` when ``model`` is a supported MLP, else the reason it is not."""
    if not isinstance(model, nn.Sequential):
        return f"{type(model).__name__} is not an nn.Sequential"
    layers = flat_layers(model)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if not linears or not isinstance(layers[-1], nn.Linear):
        return "the last layer must be an nn.Linear (the head)"
    for m in layers:
        if not isinstance(m, (nn.Flatten, nn.Linear, *ACTIVATIONS)):
            return f"layer {type(m).__name__} has no activity-perturbation rule"
    return None


@dataclass
class _Trace:
    linear: nn.Linear
    x: Tensor             # (B, n_in) the layer's input
    mask: Tensor | None   # (B, n_out) ReLU activity, None for other activations
    u: Tensor             # (K, B, n_out)


def sequential_step(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                    noise: NoiseFn, k: int, *, freeze_backbone: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """Fill ``.grad`` of every parameter of the MLP; return ``(loss, d)`` with ``d`` (K, B)."""
    layers = flat_layers(model)
    head = layers[-1]
    h, th = inputs, None
    traces: list[_Trace] = []
    for m in layers[:-1]:
        if isinstance(m, nn.Flatten):
            h = m(h)
            th = None if th is None else th.flatten(start_dim=2)
        elif isinstance(m, nn.Linear):
            z = F.linear(h, m.weight, m.bias)
            u = noise(len(traces), tuple(z.shape), z)
            th = u if th is None else torch.matmul(th, m.weight.t()).add_(u)
            traces.append(_Trace(m, h, None, u))
            h = z
        elif isinstance(m, nn.ReLU):
            h = torch.relu(h)
            th = torch.ops.aten.threshold_backward(th, h, 0.0) if th is not None else None
            if traces:  # ∂L/∂z is zero wherever a later ReLU is off: mask those units
                mask = h > 0
                traces[-1].mask = mask if traces[-1].mask is None else traces[-1].mask & mask
        elif not isinstance(m, nn.Identity):  # other elementwise activations
            h, slope = jvp(m, (h,), (torch.ones_like(h),))
            th = None if th is None else th * slope
    logits = F.linear(h, head.weight, head.bias)
    with torch.enable_grad():
        lg = logits.detach().requires_grad_()
        loss = loss_fn(lg, targets)
        (dlogits,) = torch.autograd.grad(loss, lg)  # (B, classes), the batch mean's
    if head.weight.requires_grad:
        set_grad(head.weight, dlogits.t() @ h)
    if head.bias is not None and head.bias.requires_grad:
        set_grad(head.bias, dlogits.sum(0))
    if th is None:
        d = torch.zeros(k, inputs.shape[0], dtype=logits.dtype, device=logits.device)
    else:
        d = (torch.matmul(th, head.weight.t()) * dlogits).sum(-1).div_(k)  # (K, B)
    for t in traces:
        w, b = t.linear.weight, t.linear.bias
        if freeze_backbone:
            gz = torch.zeros(t.x.shape[0], w.shape[0], dtype=w.dtype, device=w.device)
        else:
            gz = (t.u * d.unsqueeze(-1)).sum(0)
            if t.mask is not None:
                gz = gz * t.mask
        if w.requires_grad:
            set_grad(w, gz.t() @ t.x)
        if b is not None and b.requires_grad:
            set_grad(b, gz.sum(0))
    return loss.detach(), d
