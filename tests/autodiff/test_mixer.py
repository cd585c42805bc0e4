"""Forward mode through LocalMixer layers (autodiff.mixer) against torch.func.jvp."""

import pytest
import torch
from torch.func import jvp

from forwardonly.autodiff import activity_weight_grads, layer_forward
from forwardonly.models.local_mixer import layer_norm, local_mixer


@pytest.mark.parametrize("kind", ["token", "dense", "group"])
def test_layer_forward_tangents_equal_autograd_jvp(kind, device):
    """Hand-written forward mode (input, weight and activity tangents, residual) vs torch.func."""
    torch.manual_seed(1)
    model = local_mixer((1, 8, 8), 5, "tiny", width=16, groups=4)
    layer = next(m for b in model.blocks for m in b.layers if m.kind == kind)
    n_in = layer.weight.shape[0] if kind == "dense" else 16
    x, r = torch.randn(3, model.tokens, n_in), torch.randn(3, model.tokens, 16)
    tx, tr = torch.randn(2, *x.shape), torch.randn(2, *r.shape)
    u = torch.randn(2, 3, model.tokens, 16)
    wd, bd = torch.randn(2, *layer.weight.shape), torch.randn(2, *layer.bias.shape)
    layer.to(device)  # drawn on the CPU, the same on every device
    x, r, tx, tr, u, wd, bd = (t.to(device) for t in (x, r, tx, tr, u, wd, bd))

    def f(xv, w, b, noise, res):
        z = layer.linear(layer_norm(xv, layer.norm_groups), w, b)
        return torch.relu(layer_norm(z, layer.norm_groups) + noise + res)

    with torch.no_grad():
        out, tout, trace = layer_forward(layer, x, tx, u=u, wdot=(wd, bd), residual=r.clone(),
                                         tresidual=tr)
    zero = torch.zeros_like(u[0])
    for k in range(2):
        ref, ref_t = jvp(f, (x, layer.weight.detach(), layer.bias.detach(), zero, r),
                         (tx[k], wd[k], bd[k], u[k], tr[k]))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tout[k], ref_t, rtol=1e-4, atol=1e-5)
    assert torch.equal(trace.out, out) and trace.u is u


def test_activity_weight_grads_masked_shortcut_and_consumed_tangent(device):
    """A layer whose only tangent is u keeps [out > 0] ⊙ u; its weight gradient equals the
    general path's (same u, a zero input tangent); a trace's u serves one gradient only."""
    torch.manual_seed(3)
    model = local_mixer((1, 8, 8), 5, "tiny", width=16, groups=4)
    layer = model.blocks[1].layers[1]  # dense
    x = torch.randn(3, model.tokens, 16)
    u = torch.randn(2, 3, model.tokens, 16)
    coef = torch.randn(2, 3, model.tokens, 4, 1)
    layer.to(device)
    x, u, coef = x.to(device), u.to(device), coef.to(device)
    with torch.no_grad():
        _, _, short = layer_forward(layer, x, None, u=u.clone())
        zero = torch.zeros(2, *x.shape, device=device)
        _, _, general = layer_forward(layer, x, zero, u=u.clone())
    assert short.u_masked and not general.u_masked
    for got, ref in zip(activity_weight_grads(short, coef), activity_weight_grads(general, coef),
                        strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already taken"):
        activity_weight_grads(short, coef)
