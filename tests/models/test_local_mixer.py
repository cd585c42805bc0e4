"""LocalMixer: sizes (Table 2), shapes, patches, local weight gradients, its LayerNorm."""

import pytest
import torch
from torch.func import jvp

from forwardonly.autodiff import ln_jvp, ln_stats
from forwardonly.models import build_model
from forwardonly.models.local_mixer import (
    PAPER_PARAMS,
    PRESETS,
    LocalMixer,
    layer_norm,
    local_mixer,
)
from forwardonly.models.local_norm import local_layer_norm

SHAPES = {"S/1/1": (1, 28, 28), "M/1/16": (1, 28, 28), "M/8/16": (3, 32, 32),
          "L/8/64": (3, 32, 32)}


@pytest.mark.parametrize("preset", list(PAPER_PARAMS))
def test_parameter_counts_match_table_2(preset):
    model = local_mixer(SHAPES[preset], 10, preset)
    n = sum(p.numel() for p in model.parameters())
    print(f"LocalMixer {preset}: {n:,} parameters (paper: {PAPER_PARAMS[preset]:,})")
    # Table 2 rounds to 3 significant figures
    assert abs(n - PAPER_PARAMS[preset]) / PAPER_PARAMS[preset] < 0.005


def test_registered_builder_and_overrides():
    model = build_model("local-mixer", (3, 32, 32), 10, preset="M/8/16", blocks=2, width=64,
                        groups=8)
    assert isinstance(model, LocalMixer)
    assert (model.shape.blocks, model.shape.patches, model.shape.channels,
            model.shape.groups) == (2, 8, 64, 8)
    assert set(PRESETS) >= {"S/1/1", "M/1/16", "M/8/16", "L/8/64", "tiny"}


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="preset must be one of"):
        local_mixer((1, 28, 28), 10, "XL")
    with pytest.raises(ValueError, match="divisible by patches"):
        local_mixer((1, 28, 28), 10, "M/8/16")
    with pytest.raises(ValueError, match="divisible by groups"):
        local_mixer((1, 28, 28), 10, "M/1/16", width=100)
    model = local_mixer((1, 8, 8), 10, "tiny")
    with pytest.raises(ValueError, match="expects inputs of shape"):
        model(torch.zeros(2, 3, 8, 8))


def test_forward_shapes_and_seeded_init():
    x = torch.randn(5, 3, 32, 32)
    a = local_mixer((3, 32, 32), 7, "tiny", seed=3)
    b = local_mixer((3, 32, 32), 7, "tiny", seed=3)
    assert a(x).shape == (5, 7)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.count_nonzero(a.final_head.weight) == 0  # the final head starts at zero


def test_patchify_cuts_row_major_non_overlapping_patches():
    model = local_mixer((2, 4, 6), 3, "tiny", patches=2, width=8, groups=2)
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    p = model.patchify(x)  # (1, 4, 2*2*3)
    assert p.shape == (1, 4, 12)
    # patch 1 (top row, right half): channels x rows 0-1 x columns 3-5
    assert torch.equal(p[0, 1], x[0, :, 0:2, 3:6].reshape(-1))
    assert torch.equal(p[0, 2], x[0, :, 2:4, 0:3].reshape(-1))


@pytest.mark.parametrize("kind", ["token", "dense", "group"])
def test_layer_weight_grad_is_the_exact_local_gradient(kind):
    torch.manual_seed(0)
    model = local_mixer((1, 8, 8), 5, "tiny", width=16, groups=4)
    layer = next(m for b in model.blocks for m in b.layers if m.kind == kind)
    n_in = layer.weight.shape[0] if kind == "dense" else 16
    a = torch.randn(3, model.tokens, n_in)
    gz = torch.randn(3, model.tokens, 16)
    z = layer.linear(a)
    ref_w, ref_b = torch.autograd.grad((z * gz).sum(), [layer.weight, layer.bias])
    gw, gb = layer.weight_grad(a, gz)
    torch.testing.assert_close(gw, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.reshape(ref_b.shape), ref_b, rtol=1e-5, atol=1e-5)
    # K stacked weights at once equal K separate calls
    wk = torch.randn(2, *layer.weight.shape)
    bk = torch.randn(2, *layer.bias.shape)
    batched = layer.linear(a, wk, bk)
    for k in range(2):
        torch.testing.assert_close(batched[k], layer.linear(a, wk[k], bk[k]), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_layernorm_jvp_is_its_vjp_and_matches_autograd(groups):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    t = torch.randn(2, 3, 5, 16)
    _, mean, rstd = ln_stats(x, groups)
    for k in range(2):
        _, ref = jvp(lambda v: layer_norm(v, groups), (x,), (t[k],))
        torch.testing.assert_close(ln_jvp(x, mean, rstd, t, groups)[k], ref, rtol=1e-5,
                                   atol=1e-5)
    g = torch.randn(3, 5, 16)
    xr = x.clone().requires_grad_()
    (vjp,) = torch.autograd.grad(layer_norm(xr, groups), xr, g)
    torch.testing.assert_close(ln_jvp(x, mean, rstd, g, groups), vjp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_local_layer_norm_equals_the_reference_in_values_gradients_and_tangents(groups):
    """The model's LayerNorm (two-reduction statistics, fused backward) against F.layer_norm:
    values, statistics, reverse mode and forward mode (double precision gradcheck)."""
    torch.manual_seed(2)
    x = (torch.randn(3, 5, 16, dtype=torch.float64) * 3 + 2).requires_grad_()
    torch.testing.assert_close(local_layer_norm(x, groups), layer_norm(x, groups))
    xg = x.detach().unflatten(-1, (groups, 16 // groups))
    _, mean, rstd = torch.native_layer_norm(xg, (16 // groups,), None, None, 1e-5)
    _, my_mean, my_rstd = ln_stats(x.detach(), groups)
    torch.testing.assert_close(my_mean, mean)
    torch.testing.assert_close(my_rstd, rstd)
    g, t = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    (mine,) = torch.autograd.grad(local_layer_norm(x, groups), x, g)
    (ref,) = torch.autograd.grad(layer_norm(x, groups), x, g)
    torch.testing.assert_close(mine, ref)
    _, mine_t = jvp(lambda v: local_layer_norm(v, groups), (x.detach(),), (t,))
    _, ref_t = jvp(lambda v: layer_norm(v, groups), (x.detach(),), (t,))
    torch.testing.assert_close(mine_t, ref_t)
    assert torch.autograd.gradcheck(lambda v: local_layer_norm(v, groups), (x,),
                                    check_forward_ad=True)
    half = x.detach().to(torch.bfloat16)  # other dtypes take torch's fused kernel
    torch.testing.assert_close(local_layer_norm(half, groups).float(),
                               layer_norm(half, groups).float())
