"""The refitted FF readout: a convex fit that really reaches its optimum, λ picked on held-out
training rows, and the head of the network replaced."""

import pytest
import torch
import torch.nn.functional as F

from forwardonly.ff import FFNet
from forwardonly.ff.readout import (
    choose_weight_decay,
    fit_linear_softmax,
    readout_error,
    readout_features,
    refit_head,
)


def _blobs(n: int = 600, dim: int = 20, classes: int = 4, spread: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + spread * torch.randn(n, dim, generator=gen)
    return x, y


def test_fit_reaches_the_optimum_of_the_regularized_loss():
    x, y = _blobs()
    lam = 1e-2
    w, b = fit_linear_softmax(x, y, 4, weight_decay=lam)
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss = F.cross_entropy(x @ w.t() + b, y) + 0.5 * lam * w.square().sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    # strongly convex: a vanishing gradient means the minimum (float32 tolerance)
    assert torch.cat([gw.flatten(), gb]).norm() < 1e-4


def test_fit_separates_separable_classes():
    x, y = _blobs(spread=0.1)
    w, b = fit_linear_softmax(x, y, 4, weight_decay=0.0)
    assert readout_error(x, y, w, b) == 0.0


def test_weight_decay_is_chosen_on_held_out_rows():
    # few rows, many noise dimensions: an unregularized fit overfits, a strong L2 does not
    x, y = _blobs(n=300, dim=5, spread=2.0, seed=1)
    noise = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    feats = torch.cat([x, noise], 1)
    lam, errors = choose_weight_decay(feats, y, 4, [0.0, 1.0], held_out=100)
    assert set(errors) == {0.0, 1.0}
    assert errors[1.0] < errors[0.0]
    assert lam == 1.0


def test_refit_head_replaces_the_head_and_fits_the_training_features():
    torch.manual_seed(0)
    net = FFNet((1, 8, 8), 4, [32, 32, 32], mode="unsupervised", seed=0)
    x, y = _blobs(n=400, dim=64, classes=4, spread=0.5)
    x = x.view(-1, 1, 8, 8)
    before = readout_error(readout_features(net, x), y, net.head.weight, net.head.bias)
    report = refit_head(net, x, y, candidates=(1e-4, 1e-2), held_out=100)
    after = readout_error(readout_features(net, x), y, net.head.weight, net.head.bias)
    assert report["weight_decay"] in (1e-4, 1e-2)
    assert before > 0.5  # the zero-initialized head guesses one class
    assert after < 0.1


def test_bad_arguments_are_rejected():
    x, y = _blobs(n=50)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        fit_linear_softmax(x, y, 4, weight_decay=-1.0)
    with pytest.raises(ValueError, match="features must be"):
        fit_linear_softmax(x, y[:10], 4, weight_decay=0.0)
    with pytest.raises(ValueError, match="held_out must be between"):
        choose_weight_decay(x, y, 4, [0.0], held_out=50)
    with pytest.raises(ValueError, match="at least one"):
        choose_weight_decay(x, y, 4, [], held_out=10)
