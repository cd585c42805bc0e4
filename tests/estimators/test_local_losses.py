"""Local-loss and activity-perturbation estimators on LocalMixer: l-bp, lg-bp, fg-a,
lg-fg-a, lg-fg-w. Exactness where the math is exact; unbiasedness with stated tolerances."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forwardonly.estimators import ESTIMATORS, make_estimator
from forwardonly.models.local_mixer import local_mixer

LOCAL = ("l-bp", "lg-bp", "fg-a", "lg-fg-a", "lg-fg-w", "fg-w-mixer")


def setup(seed=0, blocks=2, batch=8, device="cpu"):
    """A tiny LocalMixer and a batch, drawn on the CPU (the same on every device), then moved
    to ``device``."""
    torch.manual_seed(seed)
    model = local_mixer((1, 8, 8), 5, "tiny", blocks=blocks, seed=seed + 1)
    with torch.no_grad():  # a non-zero final head, so the global loss reaches the backbone
        model.final_head.weight.normal_(0.0, 0.3)
    x = torch.rand(batch, 1, 8, 8)
    y = torch.randint(0, 5, (batch,))
    return model.to(device), x.to(device), y.to(device)


def grads(model, name, x, y, **options):
    est = make_estimator(name, model, F.cross_entropy, **options)
    est.step(x, y)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def cos(a, b):
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))


def block_params(grads_, i):
    return {n: g for n, g in grads_.items() if n.startswith(f"blocks.{i}.")}


@pytest.mark.parametrize("name", LOCAL)
def test_every_parameter_gets_a_finite_gradient(name, device):
    model, x, y = setup(device=device)
    assert name in ESTIMATORS
    est = make_estimator(name, model, F.cross_entropy)
    stats = est.step(x, y)
    assert {"loss", "local_loss"} <= set(stats)
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, n
        assert torch.isfinite(p.grad).all(), n
    assert est.predict(x).shape == (8, 5)
    torch.testing.assert_close(est.predict(x), model(x))  # predict: the final head


def test_l_bp_is_exact_backprop_of_each_block_loss(device):
    model, x, y = setup(device=device)
    got = grads(model, "l-bp", x, y)
    h = model.patchify(x)
    for i, block in enumerate(model.blocks):
        out = block(h.detach())
        loss = F.cross_entropy(model.heads[i](model.block_features(out)), y)
        names = [f"blocks.{i}.{n}" for n, _ in block.named_parameters()]
        ref = torch.autograd.grad(loss, list(block.parameters()))
        for n, r in zip(names, ref, strict=True):
            torch.testing.assert_close(got[n], r, rtol=1e-5, atol=1e-7)
        h = out
    final = F.cross_entropy(model.final_head(model.final_features(h.detach())), y)
    ref = torch.autograd.grad(final, list(model.final_head.parameters()))
    torch.testing.assert_close(got["final_head.weight"], ref[0])


def test_lg_bp_equals_l_bp(device):
    """Summed replicated losses have the plain block loss's gradient (chain rule)."""
    model, x, y = setup(1, device=device)
    a, b = grads(model, "l-bp", x, y), grads(model, "lg-bp", x, y)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["l-bp", "lg-bp", "lg-fg-a", "lg-fg-w"])
def test_each_local_loss_touches_only_its_own_block(name, device):
    """Block 0's gradient is unchanged when block 1 or head 1 change (stop-gradient), and
    changes when its own head changes; the same seed gives the same estimate."""
    model, x, y = setup(2, device=device)
    base = grads(model, name, x, y, seed=5)
    with torch.no_grad():
        for p in [*model.blocks[1].parameters(), *model.heads[1].parameters()]:
            p.add_(torch.randn_like(p))
    after = grads(model, name, x, y, seed=5)
    for n, g in block_params(base, 0).items():
        assert torch.equal(g, after[n]), n
    assert not torch.equal(base["blocks.1.layers.1.weight"], after["blocks.1.layers.1.weight"])
    with torch.no_grad():
        model.heads[0].weight.add_(torch.randn_like(model.heads[0].weight))
    own = grads(model, name, x, y, seed=5)
    assert not torch.equal(own["blocks.0.layers.1.weight"], after["blocks.0.layers.1.weight"])


@pytest.mark.slow
def test_lg_fg_a_is_unbiased_for_its_local_losses(device):
    """Average of 24000 activity-perturbation estimates → the exact local gradient."""
    model, x, y = setup(3, device=device)
    exact = grads(model, "l-bp", x, y)
    total = None
    for s in range(12):
        g = grads(model, "lg-fg-a", x, y, directions=2000, seed=s)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    for n, g in total.items():
        if n.startswith("blocks") and n.endswith("weight"):
            assert cos(g, exact[n]) > 0.99, n
            torch.testing.assert_close((g / 12).norm(), exact[n].norm(), rtol=0.1, atol=0)


def test_lg_fg_a_gaussian_and_rademacher_are_both_unbiased(device):
    model, x, y = setup(4, blocks=1, device=device)
    exact = grads(model, "l-bp", x, y)
    for dist in ("gaussian", "rademacher"):
        g = grads(model, "lg-fg-a", x, y, directions=4000, distribution=dist, seed=1)
        for n in ("blocks.0.layers.0.weight", "blocks.0.layers.1.weight"):
            assert cos(g[n], exact[n]) > 0.98, (dist, n)


def test_fg_a_is_unbiased_for_the_global_loss(device):
    """Global activity perturbation (one block, so the check stays fast): cos > 0.98 after
    16,000 directions (at 8,000, 1 − cos is about 0.01 with seed-to-seed swings to 0.03)."""
    model, x, y = setup(5, blocks=1, device=device)
    exact = grads(model, "bp", x, y)
    total = None
    for s in range(8):
        g = grads(model, "fg-a", x, y, directions=2000, seed=s)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    for n in ("blocks.0.layers.0.weight", "blocks.0.layers.1.weight", "final_head.weight"):
        assert cos(total[n], exact[n]) > 0.98, n


def test_lg_fg_w_approaches_the_local_gradient(device):
    """Weight perturbation per (group) loss: unbiased for the grouped layer, a small bias for
    the dense layer (its output LayerNorm mixes groups); cos > 0.98 / > 0.95 at 8000 samples."""
    model, x, y = setup(6, blocks=1, device=device)
    exact = grads(model, "l-bp", x, y)
    total = None
    for s in range(4):
        g = grads(model, "lg-fg-w", x, y, directions=2000, seed=s)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    assert cos(total["blocks.0.layers.1.weight"], exact["blocks.0.layers.1.weight"]) > 0.98
    assert cos(total["blocks.0.layers.0.weight"], exact["blocks.0.layers.0.weight"]) > 0.95


def test_directions_are_reproducible_per_step(device):
    model, x, y = setup(7, device=device)
    est = make_estimator("lg-fg-a", model, F.cross_entropy, seed=3)
    est.step(x, y)
    first = model.blocks[0].layers[0].weight.grad.clone()
    est.step(x, y)
    assert not torch.equal(first, model.blocks[0].layers[0].weight.grad)
    again = make_estimator("lg-fg-a", model, F.cross_entropy, seed=3)
    again.step(x, y)
    assert torch.equal(first, model.blocks[0].layers[0].weight.grad)


@pytest.mark.parametrize("name", LOCAL)
def test_freeze_backbone_trains_the_heads_only(name, device):
    model, x, y = setup(8, device=device)
    est = make_estimator(name, model, F.cross_entropy, freeze_backbone=True)
    est.step(x, y)
    for p in model.backbone_parameters():
        assert torch.count_nonzero(p.grad) == 0
    assert torch.count_nonzero(model.heads[0].weight.grad) > 0
    assert torch.count_nonzero(model.final_head.weight.grad) > 0


def test_bad_arguments_are_clear_errors(device):
    model, _, _ = setup(device=device)
    with pytest.raises(TypeError, match="needs a LocalMixer"):
        make_estimator("lg-fg-a", nn.Sequential(nn.Flatten(), nn.Linear(64, 5)),
                       F.cross_entropy)
    with pytest.raises(ValueError, match="directions must be a positive integer"):
        make_estimator("fg-a", model, F.cross_entropy, directions=0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        make_estimator("lg-fg-a", model, F.cross_entropy, distribution="uniform")


def digits_error(name, *, freeze_backbone=False, epochs=10):
    """Test error of a tiny LocalMixer trained by ``name`` on scikit-learn's 8×8 digits."""
    from forwardonly.data import load_dataset, standardize

    data = standardize(load_dataset("digits"))
    model = local_mixer(data.in_shape, 10, "tiny", width=32, groups=4, seed=0)
    est = make_estimator(name, model, F.cross_entropy, seed=0, freeze_backbone=freeze_backbone)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(data.train_x), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            est.step(data.train_x[idx], data.train_y[idx])
            opt.step()
    return (est.predict(data.test_x).argmax(-1) != data.test_y).float().mean().item()


@pytest.mark.slow
def test_lg_fg_a_learns_digits():
    """LG-FG-A learns features: its test error is far below chance (0.9) and far below that of
    the same network trained the same way with its backbone frozen at the random init (only
    the heads learn), so the forward gradients of the blocks carry real signal.

    Rounding differences between CPUs change a run about as much as another direction seed
    and data order do; over 8 such seeds on one machine LG-FG-A ended at 0.12–0.20 and the
    frozen baseline at 0.33–0.34 (smallest gap 0.14), so the bounds below hold with room.
    """
    err = digits_error("lg-fg-a")
    frozen = digits_error("lg-fg-a", freeze_backbone=True)
    assert err < 0.3, (err, frozen)
    assert err < frozen - 0.07, (err, frozen)


def test_fg_a_on_a_plain_mlp_is_unbiased_and_trains_the_head_exactly(device):
    from forwardonly.models.mlp import mlp

    torch.manual_seed(9)
    model = mlp((1, 8, 8), 5, widths=(32, 16)).to(device)
    x, y = torch.rand(16, 1, 8, 8).to(device), torch.randint(0, 5, (16,)).to(device)
    exact = grads(model, "bp", x, y)
    total = None
    for s in range(3):
        g = grads(model, "fg-a", x, y, directions=4000, seed=s)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    for n in ("1.weight", "3.weight"):
        assert cos(total[n], exact[n]) > 0.99, n
    torch.testing.assert_close(total["5.weight"] / 3, exact["5.weight"], rtol=1e-4, atol=1e-6)


def test_fg_a_rejects_models_it_has_no_rule_for():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 5))
    with pytest.raises(TypeError, match="Conv2d has no activity-perturbation rule"):
        make_estimator("fg-a", model, F.cross_entropy)


def test_fg_w_mixer_is_unbiased_for_the_global_loss_with_exact_heads(device):
    model, x, y = setup(10, blocks=1, device=device)
    exact = grads(model, "bp", x, y)
    total = None
    for s in range(4):
        g = grads(model, "fg-w-mixer", x, y, directions=5000, seed=s)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    for n in ("blocks.0.layers.0.weight", "blocks.0.layers.1.weight"):
        assert cos(total[n], exact[n]) > 0.95, n
    torch.testing.assert_close(total["final_head.weight"] / 4, exact["final_head.weight"])
