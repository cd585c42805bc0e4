"""The hand-written forward-mode rules equal torch.func.jvp (float64, tight tolerances)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from forwardonly.autodiff import (
    RULES,
    DirectionSampler,
    Rank1,
    activation_jvp,
    activity_forward,
    activity_rule_error,
    linear_jvp,
    relu_tangent,
    run_layers,
    sequential_layers,
)

TOL = {"rtol": 1e-12, "atol": 1e-12}
K = 3
f64 = torch.float64


def linear_reference(h, h_dot, w, b, w_dot, b_dot):
    """(y, (K, ..., q) ẏ) by torch.func.jvp of F.linear, one direction at a time."""
    outs = [jvp(F.linear, (h, w, b), (h_dot[k], w_dot[k], b_dot[k])) for k in range(len(w_dot))]
    return outs[0][0], torch.stack([t for _, t in outs])


@pytest.mark.parametrize("batch", [(6,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("k", [1, K])
@pytest.mark.parametrize("form", ["dense", "rank1"])
def test_linear_jvp_equals_torch_func(batch, k, form):
    h = torch.randn(*batch, 4, dtype=f64)
    h_dot = torch.randn(k, *batch, 4, dtype=f64)
    w, b = torch.randn(7, 4, dtype=f64), torch.randn(7, dtype=f64)
    b_dot = torch.randn(k, 7, dtype=f64)
    if form == "rank1":
        w_dot = DirectionSampler("rank1", 3).rank1(0, w, k)
        dense = w_dot.materialize()
    else:
        w_dot = dense = torch.randn(k, 7, 4, dtype=f64)
    ref, ref_dot = linear_reference(h, h_dot, w, b, dense, b_dot)
    out, out_dot = linear_jvp(h, h_dot.clone(), w, b, w_dot, b_dot)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(out_dot, ref_dot, **TOL)


@pytest.mark.parametrize("k", [1, 2])  # one direction takes its own 2-D path
def test_linear_jvp_zero_tangents(k):
    """Missing tangents count as zero; with none at all the tangent stays None."""
    h, w, b = torch.randn(5, 4, dtype=f64), torch.randn(3, 4, dtype=f64), torch.randn(3, dtype=f64)
    zero_h, zero_w = torch.zeros(k, 5, 4, dtype=f64), torch.zeros(k, 3, 4, dtype=f64)
    zero_b = torch.zeros(k, 3, dtype=f64)
    w_dot, b_dot, h_dot = torch.randn(k, 3, 4, dtype=f64), torch.randn(k, 3, dtype=f64), \
        torch.randn(k, 5, 4, dtype=f64)
    assert linear_jvp(h, None, w, b)[1] is None
    for args, ref_args in [((None, w_dot, None), (zero_h, w_dot, zero_b)),
                           ((None, None, b_dot), (zero_h, zero_w, b_dot)),
                           ((h_dot, None, None), (h_dot, zero_w, zero_b))]:
        _, got = linear_jvp(h, args[0], w, b, args[1], args[2])
        _, ref = linear_reference(h, *ref_args[:1], w, b, *ref_args[1:])
        torch.testing.assert_close(got, ref, **TOL)
    out, got = linear_jvp(h, h_dot, w, None)
    torch.testing.assert_close(out, h @ w.T, **TOL)
    torch.testing.assert_close(got, h_dot @ w.T, **TOL)


@pytest.mark.parametrize("k", [1, K])
@pytest.mark.parametrize("inplace", [False, True])
def test_relu_tangent_equals_torch_func(k, inplace):
    x = torch.randn(4, 9, dtype=f64)
    t = torch.randn(k, 4, 9, dtype=f64)
    ref = torch.stack([jvp(torch.relu, (x,), (t[i],))[1] for i in range(k)])
    given = t.clone()
    got = relu_tangent(given, torch.relu(x), inplace=inplace)
    torch.testing.assert_close(got, ref, **TOL)
    assert (got is given) == inplace
    if not inplace:
        assert torch.equal(given, t)  # the caller's tangent is left alone


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.Tanh(), nn.Sigmoid(), nn.SiLU(),
                                 nn.LeakyReLU(0.1), nn.Identity()], ids=lambda m: type(m).__name__)
def test_activation_jvp_equals_torch_func(act):
    x = torch.randn(5, 6, dtype=f64)
    t = torch.randn(K, 5, 6, dtype=f64)
    ref = torch.stack([jvp(act, (x,), (t[i],))[1] for i in range(K)])
    out, got = activation_jvp(act, x, t.clone(), inplace=True)
    torch.testing.assert_close(out, act(x), **TOL)
    torch.testing.assert_close(got, ref, **TOL)
    assert activation_jvp(act, x, None)[1] is None


def test_sequential_layers_flattens_nested_sequentials():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.ReLU())),
                          nn.Linear(3, 2))
    names = [n for n, _ in sequential_layers(model)]
    assert names == ["0", "1.0", "1.1.0", "2"]
    assert sequential_layers(nn.Linear(2, 2)) is None
    assert set(RULES) >= {nn.Linear, nn.ReLU, nn.GELU, nn.Flatten, nn.Identity}


@pytest.mark.parametrize("k", [1, K])
def test_run_layers_equals_torch_func_with_rules_and_the_generic_path(k):
    """Linear, activations and Flatten by their rules; LayerNorm and Conv2d through the
    generic torch.func path; every parameter perturbed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 6),
                          nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 1, 4, 4, dtype=f64)
    x_dot = torch.randn(k, *x.shape, dtype=f64)
    params = dict(model.named_parameters())
    tangents = {n: torch.randn(k, *p.shape, dtype=f64) for n, p in params.items()}
    by_id = {id(p): tangents[n] for n, p in params.items()}
    with torch.no_grad():
        out, out_dot = run_layers(sequential_layers(model), x, x_dot.clone(),
                                  lambda p: by_id[id(p)], k)
    primals = {n: p.detach() for n, p in params.items()}
    for i in range(k):
        ref, ref_dot = jvp(lambda p, v: functional_call(model, p, (v,)), (primals, x),
                           ({n: t[i] for n, t in tangents.items()}, x_dot[i]))
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(out_dot[i], ref_dot, **TOL)


@pytest.mark.parametrize("k", [1, K])  # one direction: the in-place rank-one update
def test_run_layers_with_rank1_tangents_equals_dense(k):
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    sampler = DirectionSampler("rank1", 8)
    index = {id(p): i for i, p in enumerate(model.parameters())}

    def factored(p):
        return sampler.rank1(index[id(p)], p, k) if p.dim() == 2 else sampler.dense(
            index[id(p)], p, k)

    def dense(p):
        t = factored(p)
        return t.materialize() if isinstance(t, Rank1) else t

    x = torch.randn(6, 5, dtype=f64)
    with torch.no_grad():
        _, fast = run_layers(sequential_layers(model), x, None, factored, k)
        _, ref = run_layers(sequential_layers(model), x, None, dense, k)
    torch.testing.assert_close(fast, ref, **TOL)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_activity_forward_equals_torch_func(act):
    """Tangents u added to every hidden pre-activation, carried to the head's input."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), act(), nn.Linear(6, 5), act(),
                          nn.Linear(5, 2)).double()
    assert activity_rule_error(model) is None
    layers = [m for _, m in sequential_layers(model)][:-1]
    x = torch.randn(4, 2, 4, dtype=f64)
    noise = DirectionSampler("gaussian", 2).noise(K)
    with torch.no_grad():
        h, th, traces = activity_forward(layers, x, noise)
    assert len(traces) == 2 and [t.linear for t in traces] == [layers[1], layers[3]]

    def f(u1, u2):
        z1 = layers[1](layers[0](x)) + u1
        return layers[4](layers[3](layers[2](z1)) + u2)

    zeros = (torch.zeros_like(traces[0].u[0]), torch.zeros_like(traces[1].u[0]))
    for k in range(K):
        ref, ref_t = jvp(f, zeros, (traces[0].u[k], traces[1].u[k]))
        torch.testing.assert_close(h, ref, **TOL)
        torch.testing.assert_close(th[k], ref_t, **TOL)
    if act is nn.ReLU:  # the first layer's units are masked by their own ReLU
        assert torch.equal(traces[0].mask, layers[1](layers[0](x)) > 0)


def test_activity_rule_error_names_the_layer():
    assert "Conv2d has no activity-perturbation rule" in activity_rule_error(
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 5)))
    assert "must be an nn.Linear" in activity_rule_error(nn.Sequential(nn.Linear(2, 2),
                                                                       nn.ReLU()))
    assert "is not an nn.Sequential" in activity_rule_error(nn.Linear(2, 2))


@pytest.mark.parametrize("k", [1, 3])
def test_cross_entropy_rule_matches_autograd(k):
    """The hand-written cross-entropy rule: the loss bit for bit F.cross_entropy's, the K
    directional derivatives torch.func.jvp's (float64, 1e-12)."""
    from forwardonly.autodiff.rules import loss_and_derivatives

    torch.manual_seed(0)
    z = torch.randn(7, 5, dtype=torch.float64)
    z_dot = torch.randn(k, 7, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    loss, d = loss_and_derivatives(F.cross_entropy, z, z_dot, y, k)
    assert torch.equal(loss, F.cross_entropy(z, y))
    want = torch.stack([torch.func.jvp(lambda t: F.cross_entropy(t, y), (z,), (z_dot[i],))[1]
                        for i in range(k)])
    torch.testing.assert_close(d, want, rtol=1e-12, atol=1e-12)
    # labels the rule does not cover (ignore_index, probabilities) take the generic path
    y_ignored = y.clone()
    y_ignored[0] = -100
    _, d_ignored = loss_and_derivatives(F.cross_entropy, z, z_dot, y_ignored, k)
    want = torch.func.jvp(lambda t: F.cross_entropy(t, y_ignored), (z,), (z_dot[0],))[1]
    torch.testing.assert_close(d_ignored[0], want, rtol=1e-12, atol=1e-12)
    soft = torch.softmax(torch.randn(7, 5, dtype=torch.float64), 1)
    _, d_soft = loss_and_derivatives(F.cross_entropy, z, z_dot, soft, k)
    want = torch.func.jvp(lambda t: F.cross_entropy(t, soft), (z,), (z_dot[0],))[1]
    torch.testing.assert_close(d_soft[0], want, rtol=1e-12, atol=1e-12)
