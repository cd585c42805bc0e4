"""Activity tangents through a plain ``nn.Sequential`` MLP (the forward part of FG-A).

For ``Flatten → (Linear → activation) × L → Linear`` (the ``mlp`` model): a tangent ``u``
``(K, B, n)`` is added to every hidden pre-activation ``z = x Wᵀ + b``, and the tangents are
carried with the rules of :mod:`.rules` up to the input of the last Linear layer (the head):

    ż = ẋ Wᵀ + u,      ẏ = σ'(z) ⊙ ż.

Each hidden Linear layer keeps an :class:`ActivityTrace` (its input ``x``, its ``u`` and the
ReLU activity of its output), all that its weight gradient ``g_W = g_zᵀ x`` needs once the
directional derivatives are known (:class:`forwardonly.ActivityPerturbation`). Only Flatten,
Linear and elementwise activations have rules here; :func:`activity_rule_error` names any
other layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .directions import NoiseFn
from .rules import ACTIVATIONS, activation_jvp, linear_jvp, sequential_layers


def activity_rule_error(model: nn.Module) -> str | None:
    """``None`` when ``model`` is a supported MLP, else the reason it is not."""
    named = sequential_layers(model)
    if named is None:
        return f"{type(model).__name__} is not an nn.Sequential"
    layers = [m for _, m in named]
    if not layers or not isinstance(layers[-1], nn.Linear):
        return "the last layer must be an nn.Linear (the head)"
    for m in layers:
        if not isinstance(m, (nn.Flatten, nn.Linear, *ACTIVATIONS)):
            return f"layer {type(m).__name__} has no activity-perturbation rule"
    return None


@dataclass
class ActivityTrace:
    """What one hidden Linear layer keeps for its weight gradient."""

    linear: nn.Linear
    x: Tensor             # (B, n_in) the layer's input
    mask: Tensor | None   # (B, n_out) ReLU activity, None for other activations
    u: Tensor             # (K, B, n_out) the activity tangent added to z


def activity_forward(layers: list[nn.Module], x: Tensor, noise: NoiseFn
                     ) -> tuple[Tensor, Tensor | None, list[ActivityTrace]]:
    """Primal and tangents through ``layers`` (the MLP without its head).

    Arguments:
        layers: the flattened layers before the head (see :func:`activity_rule_error`).
        x: ``(B, ...)`` inputs; ``noise(i, shape, like)``: the ``(K, *shape)`` tangent of
            hidden layer ``i``.

    Returns:
        ``(h, ḣ, traces)``: the head's input ``(B, n)``, its tangents ``(K, B, n)`` (None
        without hidden Linear layers), and one trace per hidden Linear layer.
    """
    h, th = x, None
    owned = False  # th is a buffer of this walk (not a trace's u): rules may overwrite it
    traces: list[ActivityTrace] = []
    for m in layers:
        if isinstance(m, nn.Flatten):
            h = m(h)
            th = None if th is None else th.flatten(start_dim=2)
        elif isinstance(m, nn.Linear):
            z, tz = linear_jvp(h, th, m.weight, m.bias)
            u = noise(len(traces), tuple(z.shape), z)
            th, owned = (u, False) if tz is None else (tz.add_(u), True)
            traces.append(ActivityTrace(m, h, None, u))
            h = z
        else:  # an elementwise activation
            h, th = activation_jvp(m, h, th, inplace=owned)
            owned = owned or not isinstance(m, nn.Identity)
            if isinstance(m, nn.ReLU) and traces:
                # ∂L/∂z is zero wherever a later ReLU is off: mask those units
                mask = h > 0
                traces[-1].mask = mask if traces[-1].mask is None else traces[-1].mask & mask
    return h, th, traces
