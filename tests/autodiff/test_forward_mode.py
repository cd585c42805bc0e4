"""Forward-mode directional derivatives are exact: they equal autograd's ∇L·v."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forwardonly import ForwardModeError, directional_derivatives
from forwardonly.autodiff import DirectionSampler
from forwardonly.models import build_model

K = 3


def _reference(model, x, y, tangents):
    """∇L·v_k by reverse mode, in float64."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    return torch.stack([sum((grads[id(p)] * t[k]).sum() for p, t in tangents.items())
                        for k in range(K)])


def _setup(name, in_shape, device="cpu"):
    """float64 model, batch and tangents drawn on the CPU, then moved to ``device``."""
    model = build_model(name, in_shape, 10).double()
    x = torch.randn(8, *in_shape, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    tangents = {p: torch.randn(K, *p.shape, dtype=torch.float64) for p in model.parameters()}
    model.to(device)  # moves the parameters in place: the tangents' keys stay valid
    return (model, x.to(device), y.to(device),
            {p: t.to(device) for p, t in tangents.items()})


class Wrapped(nn.Module):
    """Not an nn.Sequential: forces the whole-model path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("name,in_shape", [("mlp", (1, 6, 6)), ("cnn", (2, 8, 8))])
@pytest.mark.parametrize("wrap", [False, True], ids=["layer-by-layer", "whole-model"])
def test_directional_derivative_equals_autograd(name, in_shape, wrap, device):
    model, x, y, tangents = _setup(name, in_shape, device)
    expected = _reference(model, x, y, tangents)
    net = Wrapped(model) if wrap else model
    tangent_of = {id(p): t for p, t in tangents.items()}
    loss, d = directional_derivatives(net, F.cross_entropy, x, y,
                                      lambda p: tangent_of[id(p)], K)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-12)
    rel = ((d - expected).abs() / expected.abs()).max().item()
    assert rel < 1e-10


def test_single_direction_path_matches(device):
    model, x, y, tangents = _setup("mlp", (1, 4, 4), device)
    expected = _reference(model, x, y, tangents)
    _, d = directional_derivatives(model, F.cross_entropy, x, y,
                                   lambda p: tangents[p][:1], 1)
    assert torch.allclose(d, expected[:1], rtol=1e-10, atol=0)


def test_rank1_linear_rule_equals_dense(device):
    model = build_model("mlp", (1, 4, 4), 5, widths=[7]).double().to(device)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (6,)).to(device)
    sampler = DirectionSampler("rank1", step_seed=123)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    def factored(p):
        i = index[id(p)]
        return sampler.rank1(i, p, K) if p.dim() >= 2 else sampler.dense(i, p, K)
    _, d_fast = directional_derivatives(model, F.cross_entropy, x, y, factored, K)
    dense = {id(p): sampler.dense(index[id(p)], p, K) for p in model.parameters()}
    expected = _reference(model, x, y, {p: dense[id(p)] for p in model.parameters()})
    assert torch.allclose(d_fast, expected, rtol=1e-10, atol=1e-14)


class NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class Doubler(nn.Module):
    def forward(self, x):
        return NoJvp.apply(x)


@pytest.mark.parametrize("wrap", [False, True], ids=["layer-by-layer", "whole-model"])
def test_unsupported_module_is_named(wrap):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), Doubler(), nn.Linear(4, 2))
    net = Wrapped(model) if wrap else model
    x, y = torch.randn(3, 1, 2, 2), torch.randint(0, 2, (3,))
    with pytest.raises(ForwardModeError, match="Doubler") as info:
        directional_derivatives(net, F.cross_entropy, x, y,
                                lambda p: torch.randn(1, *p.shape), 1)
    assert "--method bp or zo" in str(info.value)
