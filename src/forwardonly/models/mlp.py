"""Multi-layer perceptron: ``Flatten → (Linear → act) × len(widths) → Linear``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from . import check_sizes, register_model

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        valid = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of {valid}, got {name!r}")
    return ACTIVATIONS[name]()


@register_model("mlp")
def mlp(in_shape: tuple[int, ...], num_classes: int, *, widths: Sequence[int] = (256, 256),
        activation: str = "relu") -> nn.Sequential:
    """An ``nn.Sequential`` MLP; ``in_shape`` is flattened (e.g. (1, 28, 28) -> 784).

    Arguments:
        in_shape: shape of one example.
        num_classes: outputs of the last layer.
        widths: hidden layer widths, e.g. ``(1024, 1024)``; ``()`` gives a linear model.
        activation: one of ``relu, gelu, tanh, sigmoid, silu, leaky_relu``.
    """
    widths = list(widths)
    if any(int(w) != w or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {widths}")
    fan_in = 1
    for s in check_sizes(in_shape, num_classes, image=False):
        fan_in *= s
    layers: list[nn.Module] = [nn.Flatten()]
    for w in widths:
        layers += [nn.Linear(fan_in, int(w)), make_activation(activation)]
        fan_in = int(w)
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)
