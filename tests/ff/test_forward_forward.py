"""Tests of forwardonly.ff: goodness and loss, normalization, labels, negatives, locality of
the updates, the registries, and short trainings on scikit-learn's 8×8 digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from forwardonly.estimators import ESTIMATORS, ForwardForward, make_estimator
from forwardonly.ff import (
    FFLayer,
    FFNet,
    embed_labels,
    extract_labels,
    ff_loss,
    ff_loss_and_grad,
    goodness,
    hard_wrong_labels,
    hybrid_images,
    hybrid_masks,
    label_trials,
    random_wrong_labels,
    rms_normalize,
)
from forwardonly.models import MODELS, build_model

# float32 math compared with float64 references: relative 1e-5 (a few ulps over sums of ~100).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_net(mode: str = "supervised", device: torch.device | str = "cpu", **kw) -> FFNet:
    return FFNet((1, 8, 8), 10, (32, 24, 16), mode=mode, seed=1, **kw).to(device)


def batch(n: int = 12, seed: int = 0, device: torch.device | str = "cpu"
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn on the CPU (the same on every device), then moved to ``device``."""
    g = gen(seed)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


# -- goodness and loss ---------------------------------------------------------------------
def test_goodness_matches_direct_sum_and_mean():
    h = torch.randn(5, 7, generator=gen())
    for i in range(5):
        direct = sum(float(h[i, j]) ** 2 for j in range(7))
        assert math.isclose(float(goodness(h, "sum")[i]), direct, rel_tol=1e-5)
        assert math.isclose(float(goodness(h, "mean")[i]), direct / 7, rel_tol=1e-5)
    with pytest.raises(ValueError, match="ff_goodness must be one of"):
        goodness(h, "max")  # type: ignore[arg-type]


def test_softplus_and_symmetric_losses_match_direct_formula():
    g_pos = torch.tensor([3.0, 9.0, 12.5])
    g_neg = torch.tensor([11.0, 1.0, 8.0])
    theta, T = 8.0, 2.0

    def sp(z: float) -> float:
        return math.log1p(math.exp(z))

    direct = (sum(sp(-(g - theta) / T) for g in g_pos.tolist())
              + sum(sp((g - theta) / T) for g in g_neg.tolist())) / 6
    got = ff_loss(g_pos, g_neg, threshold=theta, temperature=T, kind="softplus")
    assert math.isclose(float(got), direct, rel_tol=1e-6)

    pairs = zip(g_pos.tolist(), g_neg.tolist(), strict=True)
    direct_sym = sum(sp(-(a - b) / T) for a, b in pairs) / 3
    got_sym = ff_loss(g_pos, g_neg, threshold=theta, temperature=T, kind="symmetric")
    assert math.isclose(float(got_sym), direct_sym, rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["softplus", "symmetric"])
def test_closed_form_loss_gradient_equals_autograd(kind):
    g_pos = (torch.randn(6, generator=gen(1)) * 5 + 10).double().requires_grad_()
    g_neg = (torch.randn(6, generator=gen(2)) * 5 + 10).double().requires_grad_()
    loss = ff_loss(g_pos, g_neg, threshold=10.0, temperature=3.0, kind=kind)
    auto_pos, auto_neg = torch.autograd.grad(loss, (g_pos, g_neg))
    closed, d_pos, d_neg = ff_loss_and_grad(
        g_pos.detach(), g_neg.detach(), threshold=10.0, temperature=3.0, kind=kind
    )
    torch.testing.assert_close(closed, loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(d_pos, auto_pos, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d_neg, auto_neg, rtol=1e-12, atol=1e-15)


def test_symmetric_loss_needs_pairs():
    with pytest.raises(ValueError, match="as many negatives as positives"):
        ff_loss(torch.ones(3), torch.ones(4), threshold=0.0, kind="symmetric")


# -- normalization -------------------------------------------------------------------------
def test_rms_normalize_gives_mean_square_one_and_keeps_zero_rows():
    x = torch.randn(4, 50, generator=gen()) * torch.tensor([[0.01], [1.0], [30.0], [0.0]])
    y = rms_normalize(x)
    torch.testing.assert_close(y[:3].square().mean(1), torch.ones(3), **TOL)
    assert torch.equal(y[3], torch.zeros(50))


def test_next_layer_is_blind_to_the_previous_layers_length():
    layer = FFLayer(20, 9, generator=gen())
    h = torch.relu(torch.randn(6, 20, generator=gen(3)))  # a previous layer's activity
    scales = torch.tensor([[1e-3], [0.5], [1.0], [2.0], [50.0], [1e4]])
    out = layer(h[:1] * scales)  # one activity vector at six lengths
    torch.testing.assert_close(out, out[:1].expand_as(out), rtol=1e-5, atol=1e-5)
    # ... while the direction still matters
    assert not torch.allclose(layer(h[:1]), layer(h[1:2]))


def test_goodness_of_layer_two_ignores_the_length_of_layer_one():
    net = small_net()
    x = net.embed(net.flatten(batch(4)[0]), None)
    h1 = net.layers[0](x)
    g_a = goodness(net.layers[1](h1))
    g_b = goodness(net.layers[1](h1 * 37.0))
    torch.testing.assert_close(g_a, g_b, rtol=1e-5, atol=1e-5)


# -- labels --------------------------------------------------------------------------------
def test_label_embedding_round_trips_and_leaves_the_rest_alone():
    x = torch.rand(10, 64, generator=gen())
    y = torch.arange(10).flip(0)
    e = embed_labels(x, y, 10, scale=1.0)
    assert torch.equal(extract_labels(e, 10), y)
    assert torch.equal(e[:, 10:], x[:, 10:])
    assert torch.equal(e[:, :10].sum(1), torch.ones(10))
    assert torch.equal(x, torch.rand(10, 64, generator=gen()))  # input not modified
    neutral = embed_labels(x, None, 10, scale=2.0)
    assert torch.allclose(neutral[:, :10], torch.full((10, 10), 0.2))
    trials = label_trials(x[:3], 10)  # (30, 64), label-major
    assert torch.equal(extract_labels(trials, 10), torch.arange(10).repeat_interleave(3))
    assert torch.equal(trials[7 * 3 + 2, 10:], x[2, 10:])


def test_label_embedding_rejects_inputs_too_small():
    with pytest.raises(ValueError, match="only 8"):
        embed_labels(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), 10)


# -- negatives -----------------------------------------------------------------------------
def test_wrong_labels_are_never_right():
    y = torch.randint(0, 10, (5000,), generator=gen())
    wrong = random_wrong_labels(y, 10, gen(1))
    assert not bool((wrong == y).any())
    counts = torch.bincount((wrong - y) % 10, minlength=10)[1:].float()  # shifts 1..9
    assert float(counts.min()) > 5000 / 9 * 0.8  # uniform: each about 556, 5 sigma is 0.8x

    logits = torch.zeros(4000, 10)
    logits[:, 3] = 5.0  # the model strongly believes in class 3
    y = torch.randint(0, 10, (4000,), generator=gen(2))
    hard = hard_wrong_labels(logits, y, gen(3))
    assert not bool((hard == y).any())
    # for examples whose true class is not 3, class 3 takes e^5 / (e^5 + 8) = 0.949 of draws
    frac3 = float((hard[y != 3] == 3).float().mean())
    assert abs(frac3 - math.exp(5) / (math.exp(5) + 8)) < 0.02


def test_hybrid_masks_have_the_stated_statistics():
    masks = hybrid_masks(1500, 28, 28, blur_steps=10, generator=gen())
    assert masks.shape == (1500, 28, 28)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    # fraction of ones is exactly 1/2 in expectation; the std of this mean is about 0.005
    assert abs(float(masks.mean()) - 0.5) < 0.02
    # blurred: neighbours agree far more often than chance; distant pixels about at chance
    near = float((masks[:, :, :-1] == masks[:, :, 1:]).float().mean())
    far = float((masks[:, :, :-14] == masks[:, :, 14:]).float().mean())
    assert near > 0.85
    assert abs(far - 0.5) < 0.1
    # without blur, pixels are independent fair coins
    raw = hybrid_masks(1500, 28, 28, blur_steps=0, generator=gen(1))
    assert abs(float((raw[:, :, :-1] == raw[:, :, 1:]).float().mean()) - 0.5) < 0.02


def test_hybrid_images_mix_two_different_images_pixelwise():
    images = torch.rand(6, 2, 8, 8, generator=gen())
    hyb = hybrid_images(images, blur_steps=3, generator=gen(1))
    assert hyb.shape == images.shape
    for i in range(6):
        a = images[i]
        from_a = hyb[i] == a
        # every pixel of a hybrid comes from its own image or from one other image
        partners = [j for j in range(6) if j != i and bool(((hyb[i] == images[j]) | from_a).all())]
        assert len(partners) == 1
        # both channels share the mask
        assert torch.equal(from_a[0], from_a[1])
    # a batch of one (the ragged end of an epoch) mixes the image with itself rotated by 180°
    one = hybrid_images(images[:1], blur_steps=3, generator=gen(2))
    assert bool(((one == images[:1]) | (one == images[:1].flip(2, 3))).all())


# -- locality of the updates ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "negatives", "kw"),
    [
        ("supervised", "random", {}),
        ("supervised", "hard", {}),
        ("supervised", "random", {"goodness": "mean"}),
        ("unsupervised", "hybrid", {}),
    ],
)
def test_step_gradients_equal_autograd_of_each_layers_own_objective(mode, negatives, kw, device):
    net = small_net(mode, **kw, device=device)
    est = ForwardForward(net, negatives=negatives, peer_weight=0.0, temperature=4.0)
    x, y = batch(device=device)
    losses = est.local_objectives(x, y)
    est.step(x, y)
    for layer, loss in zip(net.layers, losses, strict=True):
        gw, gb = torch.autograd.grad(loss, (layer.weight, layer.bias))
        torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-4, atol=1e-6)


def test_saturated_rows_make_no_subnormal_gradients_and_the_same_step():
    # at a low temperature many rows saturate: autograd's gradients then hold subnormal
    # numbers (slow on x86 CPUs); the step counts such rows as 0 and stays equal to autograd
    net = small_net()
    est = ForwardForward(net, negatives="random", peer_weight=0.0, temperature=0.2)
    x, y = batch(64)
    losses = est.local_objectives(x, y)
    est.step(x, y)
    tiny = torch.finfo(torch.float32).tiny
    subnormal_in_reference = 0
    for layer, loss in zip(net.layers, losses, strict=True):
        for p, ref in zip((layer.weight, layer.bias),
                          torch.autograd.grad(loss, (layer.weight, layer.bias)), strict=True):
            subnormal_in_reference += int(((ref != 0) & (ref.abs() < tiny)).sum())
            assert not ((p.grad != 0) & (p.grad.abs() < tiny)).any()
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5)
    assert subnormal_in_reference > 0  # the case is exercised


def test_a_second_step_writes_into_the_existing_grad_buffers():
    net = small_net()
    est = ForwardForward(net, negatives="random", peer_weight=0.0)
    x, y = batch()
    est.step(x, y)
    buffers = {name: p.grad.data_ptr() for name, p in net.layers.named_parameters()}
    x2, y2 = batch(seed=1)
    losses = est.local_objectives(x2, y2)
    est.step(x2, y2)
    for layer, loss in zip(net.layers, losses, strict=True):
        refs = torch.autograd.grad(loss, (layer.weight, layer.bias))
        for p, ref in zip((layer.weight, layer.bias), refs, strict=True):
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)
    for name, p in net.layers.named_parameters():
        assert p.grad.data_ptr() == buffers[name], name


def test_symmetric_loss_gradients_equal_autograd(device):
    net = small_net(device=device)
    est = ForwardForward(net, loss="symmetric", peer_weight=0.0, temperature=8.0)
    x, y = batch(device=device)
    losses = est.local_objectives(x, y)
    est.step(x, y)
    for layer, loss in zip(net.layers, losses, strict=True):
        torch.testing.assert_close(layer.weight.grad, torch.autograd.grad(loss, layer.weight)[0],
                                   rtol=1e-4, atol=1e-6)


def test_stepping_only_layer_l_plus_1_leaves_layer_l_unchanged(device):
    net = small_net(device=device)
    est = ForwardForward(net, peer_weight=0.0)
    x, y = batch(device=device)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.zero_grad()
    losses = est.local_objectives(x, y)
    losses[1].backward()  # only the objective of layer 1 (the second layer)
    opt.step()
    for name, p in net.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.startswith("layers.1."), name


def test_a_layers_update_does_not_depend_on_the_layers_above(device):
    x, y = batch(device=device)
    grads = []
    for perturb in (False, True):
        net = small_net(device=device)
        if perturb:
            with torch.no_grad():
                net.layers[2].weight.mul_(-3.0).add_(1.0)
                net.layers[2].bias.fill_(5.0)
        ForwardForward(net, negatives="random").step(x, y)
        grads.append([p.grad.clone() for p in net.layers[:2].parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_peer_normalization_pulls_units_towards_the_layer_mean_activity(device):
    x, y = batch(device=device)
    plain, peer = small_net(device=device), small_net(device=device)  # same weights
    ForwardForward(plain, peer_weight=0.0).step(x, y)
    with torch.no_grad():
        peer.layers[0].mean_activity.copy_(torch.linspace(0.0, 1.0, 32, device=device))
    ForwardForward(peer, peer_weight=0.5).step(x, y)
    m = peer.layers[0].mean_activity  # already updated with this batch
    h_pos = peer.layers[0](peer.embed(peer.flatten(x), y))
    ramp = torch.linspace(0.0, 1.0, 32, device=device)
    torch.testing.assert_close(m, 0.9 * ramp + 0.1 * h_pos.mean(0), **TOL)
    # the bias gradient gains lambda * (m_j - mean(m)): units above the layer mean are damped
    extra = peer.layers[0].bias.grad - plain.layers[0].bias.grad  # (32,)
    torch.testing.assert_close(extra, 0.5 * (m - m.mean()), rtol=1e-4, atol=1e-6)


# -- the estimator interface ---------------------------------------------------------------
def test_registered_and_built_by_name():
    assert "ff" in ESTIMATORS and "ff-mlp" in MODELS
    net = build_model("ff-mlp", (1, 8, 8), 10, widths=(16, 16), goodness="mean")
    est = make_estimator("ff", net, F.cross_entropy, seed=3, negatives="random")
    x, y = batch()
    stats = est.step(x, y)
    assert set(stats) >= {"loss", "pair_error", "loss_layer0", "loss_layer1"}
    assert all(p.grad is not None for p in net.parameters())
    assert est.predict(x).shape == (12, 10)
    assert est.steps_done == 1


def test_configuration_errors_are_clear():
    with pytest.raises(TypeError, match="--model ff-mlp"):
        ForwardForward(torch.nn.Linear(3, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode='unsupervised'"):
        ForwardForward(small_net(), negatives="hybrid")
    with pytest.raises(ValueError, match="--ff-negatives"):
        ForwardForward(small_net("unsupervised"), negatives="hard")
    with pytest.raises(ValueError, match="ff_readout='softmax'"):
        small_net("unsupervised", readout="goodness")
    with pytest.raises(ValueError, match="built for inputs of shape"):
        ForwardForward(small_net()).step(torch.rand(4, 1, 9, 9), torch.zeros(4, dtype=torch.long))


def test_resumed_estimator_draws_the_same_negatives(device):
    x, y = batch(device=device)
    a = ForwardForward(small_net(device=device), seed=5)
    a.step(x, y)
    after_one = {k: v.clone() for k, v in a.model.state_dict().items()}  # peer running means
    state = a.state_dict()
    a.step(x, y)
    resumed = ForwardForward(small_net(device=device), seed=5)
    resumed.model.load_state_dict(after_one)
    resumed.load_state_dict(state)
    resumed.step(x, y)
    for p, q in zip(a.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    other = ForwardForward(small_net(device=device), seed=6)  # another seed, other negatives
    other.model.load_state_dict(after_one)
    other.load_state_dict({"seed": 6, "steps_done": 1})
    other.step(x, y)
    assert not torch.equal(other.model.layers[0].weight.grad, a.model.layers[0].weight.grad)


def test_goodness_scores_equal_one_label_at_a_time():
    net = small_net()
    x, _ = batch(5)
    scores = net.goodness_scores(x)  # (5, 10)
    flat = net.flatten(x)
    for c in range(10):
        acts = net.activities(net.embed(flat, torch.full((5,), c)))
        expect = goodness(acts[1]) + goodness(acts[2])  # all but the first layer
        torch.testing.assert_close(scores[:, c], expect, **TOL)


# -- short trainings -----------------------------------------------------------------------
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=gen())
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.mark.parametrize(
    ("mode", "readout", "max_error"),
    [("supervised", "goodness", 0.2), ("unsupervised", "softmax", 0.2)],
)
def test_short_training_on_digits_lowers_the_loss_and_beats_chance(mode, readout, max_error):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    net = FFNet((1, 8, 8), 10, (256, 256, 256), mode=mode, readout=readout, seed=0)
    est = ForwardForward(net, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    before = float(est.predict(xte).argmax(-1).ne(yte).float().mean())
    losses = []
    for epoch in range(6):
        order = torch.randperm(len(ytr), generator=gen(epoch))
        for i in range(0, len(ytr), 50):
            idx = order[i : i + 50]
            opt.zero_grad()
            losses.append(est.step(xtr[idx], ytr[idx])["loss"])
            opt.step()
    error = float(est.predict(xte).argmax(-1).ne(yte).float().mean())
    first, last = sum(losses[:28]) / 28, sum(losses[-28:]) / 28  # first and last epoch
    assert last < 0.7 * first, (first, last)
    assert error < max_error, (before, error)  # chance is 0.9


# -- the first-layer shortcut and bfloat16 -------------------------------------------------
@pytest.mark.parametrize("normalize_input", [True, False])
def test_first_layer_shortcut_equals_the_plain_layer(normalize_input):
    from forwardonly.ff.first_layer import (
        image_part,
        labelled_preactivation,
        labelled_weight_grad,
    )
    from forwardonly.ff.labels import label_codes, write_codes

    net = FFNet((1, 8, 8), 10, (16,), normalize_input=normalize_input, seed=2)
    layer = net.layers[0]
    flat = net.flatten(batch(6)[0])
    codes = torch.cat([label_codes(torch.arange(6), 6, 10), label_codes(None, 6, 10, 3.0)])
    rows = write_codes(flat, codes)  # (12, 64)
    z, inv_r = labelled_preactivation(layer, image_part(layer, flat, 10), codes)
    plain = F.linear(layer.prepare(rows), layer.weight, layer.bias)
    torch.testing.assert_close(z, plain, rtol=1e-5, atol=1e-5)
    delta = torch.randn(12, 16, generator=gen(4))
    grad = labelled_weight_grad(layer, image_part(layer, flat, 10), codes, inv_r, delta)
    torch.testing.assert_close(grad, delta.t() @ layer.prepare(rows), rtol=1e-5, atol=1e-5)


def test_bfloat16_products_give_nearly_the_float32_step(device):
    x, y = batch(32, device=device)
    grads = {}
    for precision in ("float32", "bfloat16"):
        net = FFNet((1, 8, 8), 10, (64, 64), precision=precision, seed=0).to(device)
        ForwardForward(net, negatives="random", temperature=8.0).step(x, y)
        grads[precision] = [p.grad for p in net.layers.parameters()]
    for a, b in zip(grads["float32"], grads["bfloat16"], strict=True):
        # bfloat16 keeps 8 mantissa bits: 2^-8 relative per operand; 5% over a whole tensor
        assert float((a - b).norm() / a.norm()) < 0.05
    assert FFNet((1, 8, 8), 10, (8,), precision="bfloat16").to(device)(x).dtype == torch.float32
    with pytest.raises(ValueError, match="ff_precision"):
        FFNet((1, 8, 8), 10, (8,), precision="float16")  # type: ignore[arg-type]
