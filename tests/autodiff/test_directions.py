"""Direction samplers: reproducible from (seed, step, tensor), E[v] = 0 and E[v vᵀ] = I."""

import pytest
import torch

from forwardonly.autodiff import (
    ACTIVITY_DISTRIBUTIONS,
    DISTRIBUTIONS,
    DirectionSampler,
    Rank1,
    rademacher,
)
from forwardonly.seeding import mix_seed

N = 40_000  # samples for the moment checks


def second_moment(v: torch.Tensor) -> torch.Tensor:
    """(N, d) samples -> the (d, d) sample estimate of E[v vᵀ], in float64."""
    v = v.reshape(v.shape[0], -1).double()
    return v.T @ v / v.shape[0]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_second_moment_is_the_identity(distribution):
    """Every entry of the sample E[v vᵀ] is within 6 standard errors of I.

    An entry is a mean of N products with variance at most 2 (Gaussian diagonal: E[v⁴] − 1
    = 2; off-diagonal and ±1 products: 1), so its standard error is ≤ sqrt(2/N) = 0.0071
    and the bound 6·sqrt(2/N) = 0.042 fails by chance with probability < 1e-7 per entry.
    """
    like = torch.empty(3, 4)  # 12 entries: a matrix, so rank1 draws factored directions
    v = DirectionSampler(distribution, step_seed=11).dense(0, like, N)  # (N, 3, 4)
    assert v.shape == (N, 3, 4)
    tol = 6 * (2 / N) ** 0.5
    err = (second_moment(v) - torch.eye(12, dtype=torch.float64)).abs().max().item()
    assert err < tol, (distribution, err)
    assert v.double().mean(0).abs().max().item() < 6 / N**0.5  # E[v] = 0, variance 1


@pytest.mark.parametrize("distribution", ["rademacher", "rank1"])
def test_sign_directions_have_exact_norms(distribution):
    v = DirectionSampler(distribution, step_seed=5).dense(2, torch.empty(6, 7), 50)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(v.pow(2).sum(dim=(1, 2)), torch.full((50,), 42.0))


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_directions_are_reproducible_from_seed_step_and_tensor(distribution):
    """A tensor's directions depend on (seed, step, tensor index) only: drawn again in
    another order, on another sampler of the same step, they are the same."""
    seed, step = 7, 3
    tensors = [torch.empty(5, 4), torch.empty(4), torch.empty(2, 3, 2)]
    first = DirectionSampler(distribution, mix_seed(seed, step))
    drawn = [first.dense(i, t, 2) for i, t in enumerate(tensors)]
    again = DirectionSampler(distribution, mix_seed(seed, step))
    for i in reversed(range(len(tensors))):
        assert torch.equal(again.dense(i, tensors[i], 2), drawn[i])
    other_step = DirectionSampler(distribution, mix_seed(seed, step + 1))
    other_seed = DirectionSampler(distribution, mix_seed(seed + 1, step))
    for i, t in enumerate(tensors):
        assert not torch.equal(other_step.dense(i, t, 2), drawn[i])
        assert not torch.equal(other_seed.dense(i, t, 2), drawn[i])
    assert not torch.equal(first.dense(1, tensors[0], 2), drawn[0])  # another tensor index


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_combine_redraws_the_same_directions(distribution):
    sampler = DirectionSampler(distribution, step_seed=99)
    like = torch.empty(4, 6, dtype=torch.float64)
    coeffs = torch.tensor([0.5, -2.0, 3.0])
    expected = torch.tensordot(coeffs.double(), sampler.dense(1, like, 3), dims=1)
    torch.testing.assert_close(sampler.combine(1, like, coeffs), expected, rtol=1e-12,
                               atol=1e-12)


def test_rank1_factors_are_the_dense_rank1_directions():
    sampler = DirectionSampler("rank1", step_seed=4)
    like = torch.empty(5, 2, 3)  # conv-like: factored as 5 × 6
    r = sampler.rank1(0, like, 3)
    assert isinstance(r, Rank1) and r.b.shape == (3, 5) and r.a.shape == (3, 6)
    assert torch.equal(r.materialize(), sampler.dense(0, like, 3))
    vec = sampler.dense(1, torch.empty(5), 3)  # vectors: plain ±1
    assert vec.shape == (3, 5) and set(vec.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_the_tensor(distribution, dtype):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        like = torch.empty(3, 4, dtype=dtype, device=device)
        sampler = DirectionSampler(distribution, step_seed=1)
        v = sampler.dense(0, like, 2)
        assert v.dtype == dtype and v.device.type == device and v.shape == (2, 3, 4)
        out = torch.empty(2, 3, 4, dtype=dtype, device=device)
        assert sampler.dense(0, like, 2, out=out) is out and torch.equal(out, v)
        c = sampler.combine(0, like, torch.ones(2, dtype=torch.float32, device=device))
        assert c.dtype == dtype and c.shape == like.shape


def test_bad_distribution_names_are_clear_errors():
    with pytest.raises(ValueError, match="distribution must be one of 'gaussian', "
                       "'rademacher', 'rank1', got 'uniform'"):
        DirectionSampler("uniform", 0)
    with pytest.raises(ValueError, match="one of 'gaussian', 'rademacher', got 'rank1'"):
        DirectionSampler("rank1", 0, valid=ACTIVITY_DISTRIBUTIONS)
    with pytest.raises(ValueError, match="got 'rank1'"):
        DirectionSampler("rank1", 0).noise(2)


@pytest.mark.parametrize("distribution", ACTIVITY_DISTRIBUTIONS)
def test_activity_noise_is_reproducible_per_layer_and_unit_variance(distribution):
    sampler = DirectionSampler(distribution, step_seed=21)
    noise = sampler.noise(4)
    like = torch.empty(0, dtype=torch.float64)
    u = noise(3, (500, 20), like)
    assert u.shape == (4, 500, 20) and u.dtype == torch.float64
    assert torch.equal(DirectionSampler(distribution, 21).noise(4)(3, (500, 20), like), u)
    assert not torch.equal(noise(2, (500, 20), like), u)
    assert abs(u.pow(2).mean().item() - 1) < 6 * (2 / u.numel()) ** 0.5
    assert u.mean().abs().item() < 6 / u.numel() ** 0.5


def test_rademacher_signs_are_balanced_and_exact():
    gen = torch.Generator().manual_seed(0)
    u = rademacher((4, 1000, 64), gen)
    assert u.shape == (4, 1000, 64) and u.dtype == torch.float32
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    # every bit position of the random words is used: per-column means stay near 0
    assert u.reshape(-1, 64).mean(0).abs().max() < 0.05  # 4000 draws per column, 3.2 sigma
    odd = rademacher(13, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert odd.shape == (13,) and odd.dtype == torch.float64
