"""Direction samplers: reproducible from (seed, step, tensor), E[v] = 0 and E[v vᵀ] = I."""

import numpy as np
import pytest
import torch

from forwardonly.autodiff import (
    ACTIVITY_DISTRIBUTIONS,
    DISTRIBUTIONS,
    DirectionSampler,
    NoiseTable,
    Rank1,
    linear_jvp,
    rademacher,
    run_layers,
)
from forwardonly.autodiff.directions import (
    GAUSSIAN_LEVELS,
    GaussianStream,
    LowRank,
    gaussian_levels,
)
from forwardonly.autodiff.rules import dense
from forwardonly.seeding import mix_seed

N = 40_000  # samples for the moment checks


def sampler_of(distribution: str, step_seed: int, **options) -> DirectionSampler:
    """A step's sampler; ``gaussian-table`` reads a table of seed 0 (the estimator keeps one
    across steps)."""
    return DirectionSampler(distribution, step_seed, table=NoiseTable(0), **options)


def second_moment(v: torch.Tensor) -> torch.Tensor:
    """(N, d) samples -> the (d, d) sample estimate of E[v vᵀ], in float64."""
    v = v.reshape(v.shape[0], -1).double()
    return v.T @ v / v.shape[0]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_second_moment_is_the_identity(distribution):
    """Every entry of the sample E[v vᵀ] is within 6 standard errors of I.

    An entry is a mean of N products with variance at most 2 (Gaussian diagonal: E[v⁴] − 1
    = 2; lowrank diagonal: E[v⁴] − 1 = 2 − 2/r; off-diagonal and ±1 products: 1), so its
    standard error is ≤ sqrt(2/N) = 0.0071
    and the bound 6·sqrt(2/N) = 0.042 fails by chance with probability < 1e-7 per entry.
    """
    like = torch.empty(3, 4)  # 12 entries: a matrix, so rank1 draws factored directions
    v = sampler_of(distribution, step_seed=11).dense(0, like, N)  # (N, 3, 4)
    assert v.shape == (N, 3, 4)
    tol = 6 * (2 / N) ** 0.5
    err = (second_moment(v) - torch.eye(12, dtype=torch.float64)).abs().max().item()
    assert err < tol, (distribution, err)
    assert v.double().mean(0).abs().max().item() < 6 / N**0.5  # E[v] = 0, variance 1


@pytest.mark.parametrize("distribution", ["rademacher", "rank1"])
def test_sign_directions_have_exact_norms(distribution):
    v = sampler_of(distribution, step_seed=5).dense(2, torch.empty(6, 7), 50)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(v.pow(2).sum(dim=(1, 2)), torch.full((50,), 42.0))


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_directions_are_reproducible_from_seed_step_and_tensor(distribution):
    """A tensor's directions depend on (seed, step, tensor index) only: drawn again in
    another order, on another sampler of the same step, they are the same."""
    seed, step = 7, 3
    tensors = [torch.empty(5, 4), torch.empty(4), torch.empty(2, 3, 2)]
    first = sampler_of(distribution, mix_seed(seed, step))
    drawn = [first.dense(i, t, 2) for i, t in enumerate(tensors)]
    again = sampler_of(distribution, mix_seed(seed, step))
    for i in reversed(range(len(tensors))):
        assert torch.equal(again.dense(i, tensors[i], 2), drawn[i])
    other_step = sampler_of(distribution, mix_seed(seed, step + 1))
    other_seed = sampler_of(distribution, mix_seed(seed + 1, step))
    for i, t in enumerate(tensors):
        assert not torch.equal(other_step.dense(i, t, 2), drawn[i])
        assert not torch.equal(other_seed.dense(i, t, 2), drawn[i])
    assert not torch.equal(first.dense(1, tensors[0], 2), drawn[0])  # another tensor index


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_combine_redraws_the_same_directions(distribution):
    sampler = sampler_of(distribution, step_seed=99)
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
        sampler = sampler_of(distribution, step_seed=1)
        v = sampler.dense(0, like, 2)
        assert v.dtype == dtype and v.device.type == device and v.shape == (2, 3, 4)
        out = torch.empty(2, 3, 4, dtype=dtype, device=device)
        assert sampler.dense(0, like, 2, out=out) is out and torch.equal(out, v)
        c = sampler.combine(0, like, torch.ones(2, dtype=torch.float32, device=device))
        assert c.dtype == dtype and c.shape == like.shape


def test_bad_distribution_names_are_clear_errors():
    with pytest.raises(ValueError, match="distribution must be one of 'gaussian', "
                       "'rademacher', 'rank1', 'lowrank', 'gaussian-table', got 'uniform'"):
        DirectionSampler("uniform", 0)
    with pytest.raises(ValueError, match="one of 'gaussian', 'rademacher', got 'rank1'"):
        DirectionSampler("rank1", 0, valid=ACTIVITY_DISTRIBUTIONS)
    with pytest.raises(ValueError, match="got 'rank1'"):
        DirectionSampler("rank1", 0).noise(2)


@pytest.mark.parametrize("distribution", ACTIVITY_DISTRIBUTIONS)
def test_activity_noise_is_reproducible_per_layer_and_unit_variance(distribution):
    sampler = sampler_of(distribution, step_seed=21)
    noise = sampler.noise(4)
    like = torch.empty(0, dtype=torch.float64)
    u = noise(3, (500, 20), like)
    assert u.shape == (4, 500, 20) and u.dtype == torch.float64
    assert torch.equal(sampler_of(distribution, 21).noise(4)(3, (500, 20), like), u)
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


# -- lowrank: V = (1/√r) Σ_i b_i a_iᵀ ---------------------------------------------------

@pytest.mark.parametrize("rank", [1, 2, 3, 7])
def test_lowrank_second_moment_is_the_identity_for_every_rank(rank):
    """E[vec V vec Vᵀ] = I for every r (tolerance as in test_second_moment_is_the_identity:
    6 standard errors, the entries' variance being at most 2)."""
    like = torch.empty(3, 4)
    v = DirectionSampler("lowrank", step_seed=13, rank=rank).dense(0, like, N)
    tol = 6 * (2 / N) ** 0.5
    err = (second_moment(v) - torch.eye(12, dtype=torch.float64)).abs().max().item()
    assert err < tol, (rank, err)
    assert v.double().mean(0).abs().max().item() < 6 / N**0.5
    # the fourth moment of an entry is 3 − 2/r (lighter-tailed than Gaussian factors' 3 + 6/r)
    m4 = v.double().pow(4).mean().item()
    assert m4 == pytest.approx(3 - 2 / rank, abs=6 * (40 / (12 * N)) ** 0.5)


def test_lowrank_of_rank_one_is_the_rank1_distribution():
    """r = 1 draws exactly the rank1 directions (same signs), hence the same covariance."""
    for shape in [(5, 4), (3, 2, 2), (7,)]:
        like = torch.empty(shape, dtype=torch.float64)
        low = DirectionSampler("lowrank", step_seed=6, rank=1)
        one = DirectionSampler("rank1", step_seed=6)
        assert torch.equal(low.dense(2, like, 9), one.dense(2, like, 9))
    c = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    like = torch.empty(4, 5, dtype=torch.float64)
    assert torch.equal(DirectionSampler("lowrank", 1, rank=1).combine(0, like, c),
                       DirectionSampler("rank1", 1).combine(0, like, c))


def test_lowrank_factors_are_the_dense_lowrank_directions():
    sampler = DirectionSampler("lowrank", step_seed=4, rank=3)
    like = torch.empty(5, 2, 3, dtype=torch.float64)  # conv-like: factored as 5 × 6
    assert sampler.is_factored(like.shape) and not sampler.is_factored(torch.Size([5]))
    f = sampler.factors(0, like, 2)
    assert isinstance(f, LowRank) and f.rank == 3
    assert f.b.shape == (2, 3, 5) and f.a.shape == (2, 3, 6)
    assert set(f.a.unique().tolist()) == {-1.0, 1.0} and set(f.b.unique().tolist()) == {-1.0, 1.0}
    v = sampler.dense(0, like, 2)
    expected = torch.einsum("kiq,kip->kqp", f.b, f.a).reshape(2, 5, 2, 3) / 3**0.5
    torch.testing.assert_close(v, expected, rtol=1e-15, atol=1e-15)
    assert torch.linalg.matrix_rank(v[0].reshape(5, 6)).item() == 3
    vec = sampler.dense(1, torch.empty(5), 3)  # vectors: plain ±1
    assert vec.shape == (3, 5) and set(vec.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("rank", [0, -2, 1.5, True])
def test_bad_direction_rank_is_a_clear_error(rank):
    with pytest.raises(ValueError, match="direction_rank must be a positive integer"):
        DirectionSampler("lowrank", 0, rank=rank)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("batch", [(), (6,), (2, 5)])
def test_factored_linear_jvp_equals_dense(rank, batch):
    """The Linear rule with LowRank factors, ((x A) Bᵀ)/√r, equals x Vᵀ with V dense
    (float64, 1e-12), with an input tangent and a bias tangent as well."""
    torch.manual_seed(0)
    k, p, q = 4, 7, 5
    dt = torch.float64
    h = torch.randn(*batch, p, dtype=dt)
    h_dot = torch.randn(k, *batch, p, dtype=dt)
    w, b = torch.randn(q, p, dtype=dt), torch.randn(q, dtype=dt)
    sampler = DirectionSampler("lowrank", step_seed=3, rank=rank)
    w_dot, b_dot = sampler.factors(0, w, k), sampler.dense(1, b, k)
    y, y_dot = linear_jvp(h, h_dot.clone(), w, b, w_dot, b_dot)
    y_ref, y_dot_ref = linear_jvp(h, h_dot.clone(), w, b, w_dot.materialize(), b_dot)
    assert y_dot.shape == (k, *batch, q)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(y_dot, y_dot_ref, rtol=1e-12, atol=1e-12)
    # and against the definition, one direction at a time
    for j in range(k):
        v = w_dot.materialize()[j]
        ref = h_dot[j] @ w.T + h @ v.T + b_dot[j]
        torch.testing.assert_close(y_dot[j], ref, rtol=1e-12, atol=1e-12)


def test_run_layers_with_lowrank_tangents_equals_dense():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
                                ).double()
    layers = [(str(i), m) for i, m in enumerate(model)]
    params = list(model.parameters())
    sampler = DirectionSampler("lowrank", 8, rank=2)
    index = {id(p): i for i, p in enumerate(params)}

    def factored(p):
        i = index[id(p)]
        return sampler.factors(i, p, 3) if sampler.is_factored(p.shape) else sampler.dense(i, p, 3)

    x = torch.randn(4, 6, dtype=torch.float64)
    h, h_dot = run_layers(layers, x, None, factored, 3)
    h_ref, h_dot_ref = run_layers(layers, x, None, lambda p: dense(factored(p)), 3)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(h_dot, h_dot_ref, rtol=1e-12, atol=1e-12)


# -- the CPU Gaussian: 2¹⁶ levels indexed by 16 random bits --------------------------------

def test_gaussian_levels_have_exact_moments():
    """Antisymmetric (mean exactly 0), mean square 1 to rounding, ascending, N(0, 1)'s
    kurtosis to 2e-4, and the largest level where N(0, 1)'s last 2⁻¹⁶ lies (≈ 4.39)."""
    levels = gaussian_levels()
    assert levels.shape == (GAUSSIAN_LEVELS,) and levels.dtype == torch.float64
    assert torch.equal(levels, -levels.flip(0))
    assert bool((levels.diff() > 0).all())
    assert levels.pow(2).mean().item() == pytest.approx(1.0, abs=1e-12)
    assert levels.pow(4).mean().item() == pytest.approx(3.0, abs=2e-4)
    assert 4.3 < levels.max().item() < 4.5


def test_gaussian_entries_have_the_moments_of_n01():
    """2²¹ entries: mean 0, variance 1, kurtosis 3, each within 6 standard errors
    (SE of the mean 1/√n, of the variance √(2/n), of the fourth moment √(96/n) for N(0, 1)),
    and every entry one of the levels."""
    n = 1 << 21
    v = DirectionSampler("gaussian", step_seed=17).dense(3, torch.empty(n), 1)[0].double()
    se = 6 / n**0.5
    assert abs(v.mean().item()) < se
    assert abs(v.pow(2).mean().item() - 1) < se * 2**0.5
    assert abs(v.pow(4).mean().item() - 3) < se * 96**0.5
    assert bool(torch.isin(v, gaussian_levels().float().double()).all())
    # tails: P(|Z| > 3) = 0.0027 for N(0, 1); 6 standard errors of a binomial proportion
    p3 = (v.abs() > 3).double().mean().item()
    assert abs(p3 - 0.0026998) < 6 * (0.0027 / n) ** 0.5


def correlation(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_gaussian_entries_are_uncorrelated_across_neighbours():
    """No correlation between neighbouring entries (lags 1 to 8: inside a 64-bit word and
    across words), neighbouring tensor indices, neighbouring steps, or two consecutive draws
    from one stream: |r| < 6/√n for each (n = 2²⁰)."""
    n = 1 << 20
    tol = 6 / n**0.5
    s = DirectionSampler("gaussian", step_seed=mix_seed(3, 10))
    like = torch.empty(n)
    v = s.dense(0, like, 1)[0]
    for lag in range(1, 9):
        assert abs(correlation(v[:-lag], v[lag:])) < tol, lag
        assert abs(correlation(v[:-lag].abs(), v[lag:].abs())) < tol, lag  # not just signs
    assert abs(correlation(v, s.dense(1, like, 1)[0])) < tol
    assert abs(correlation(v, DirectionSampler("gaussian", mix_seed(3, 11)).dense(0, like, 1)[0])
               ) < tol
    stream = s.generator(5, torch.device("cpu"))
    first, second = stream.normal((n,)), stream.normal((n,))
    assert abs(correlation(first, second)) < tol


def test_gaussian_stream_is_reproducible_and_chunk_independent():
    """A stream's entries do not depend on the chunking, nor on how a draw of a multiple of
    4 entries is split; dtype, ``out`` (also non-contiguous) and shape are honoured."""
    n = 3 * (1 << 16) + 5  # several chunks and a remainder
    whole = GaussianStream(42).normal((n,), dtype=torch.float64)
    assert torch.equal(GaussianStream(42).normal((n,), dtype=torch.float64), whole)
    stream = GaussianStream(42)
    f64 = torch.float64
    parts = [stream.normal((1 << 16,), dtype=f64), stream.normal((8,), dtype=f64),
             stream.normal((n - (1 << 16) - 8,), dtype=f64)]
    assert torch.equal(torch.cat(parts), whole)
    small = GaussianStream(42).normal((3, 4), dtype=torch.float64)  # the small-draw path
    assert torch.equal(small.flatten(), whole[:12])
    assert torch.equal(GaussianStream(42).normal((n,)), whole.float())  # table in float32
    out = torch.empty(7, 6).T  # non-contiguous
    assert GaussianStream(42).normal((6, 7), out=out) is out
    assert torch.equal(out, GaussianStream(42).normal((6, 7)))
    half = GaussianStream(42).normal((1000,), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.float(), whole[:1000].bfloat16().float())
    assert not torch.equal(GaussianStream(43).normal((12,)), whole[:12].float())


def test_local_fg_style_draws_share_one_generator():
    """Two draws from one generator (a layer's weight, then its bias) are reproducible."""
    s = DirectionSampler("gaussian", step_seed=8)
    like_w, like_b = torch.empty(2, 30, 20), torch.empty(2, 20)
    gen = s.generator(4, torch.device("cpu"))
    w, b = s.draw(gen, (2, 30, 20), like_w), s.draw(gen, (2, 20), like_b)
    gen = s.generator(4, torch.device("cpu"))
    assert torch.equal(s.draw(gen, (2, 30, 20), like_w), w)
    assert torch.equal(s.draw(gen, (2, 20), like_b), b)
    assert not torch.equal(b, w[:, 0])


def test_combine_uses_kept_directions_and_writes_out():
    for distribution in DISTRIBUTIONS:
        s = sampler_of(distribution, step_seed=2)
        like = torch.empty(5, 6, dtype=torch.float64)
        c = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
        drawn = s.factors(0, like, 3) if s.is_factored(like.shape) else s.dense(0, like, 3)
        out = torch.empty(5, 6, dtype=torch.float64)
        assert s.combine(0, like, c, drawn, out=out) is out
        torch.testing.assert_close(out, s.combine(0, like, c), rtol=1e-14, atol=1e-14)


# -- a direction in pieces: blocks of rows, chosen rows, blockwise adds --------------------

# (30522 // 100, 384): a slice of MiniLM's word embeddings; 37 and 15 entries a row are odd
PIECE_SHAPES = [(1000, 37), (257, 384), (7, 3, 5), (11,), (), (30522 // 100, 384)]


def test_consecutive_random_calls_continue_one_draw():
    """What slicing Rademacher draws rests on: ``random_`` on a CPU generator spends one
    64-bit number per element, so consecutive calls continue one call's words."""
    gen = torch.Generator().manual_seed(3)
    whole = torch.empty(5000, dtype=torch.int64).random_(-(2**63), 2**63 - 1, generator=gen)
    gen = torch.Generator().manual_seed(3)
    parts = [torch.empty(n, dtype=torch.int64).random_(-(2**63), 2**63 - 1, generator=gen)
             for n in (1, 63, 1000, 3, 3933)]
    assert torch.equal(torch.cat(parts), whole)


def test_gaussian_stream_skips_whole_words():
    whole = GaussianStream(42).normal((5000,), dtype=torch.float64)
    stream = GaussianStream(42)
    assert stream.skip(8) is stream
    assert torch.equal(stream.normal((100,), dtype=torch.float64), whole[8:108])
    assert torch.equal(stream.skip(4000).normal((12,), dtype=torch.float64), whole[4108:4120])
    with pytest.raises(ValueError, match="multiple of 4"):
        GaussianStream(42).skip(6)


@pytest.mark.parametrize("shape", PIECE_SHAPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_chunks_are_the_whole_draw_bit_for_bit(distribution, shape):
    """Blocks of consecutive rows, in order, each about ``max_entries`` entries (more only by
    the rows a stream's word needs), concatenated: exactly ``dense(...)[0]``."""
    s = sampler_of(distribution, step_seed=21, rank=3)
    like = torch.empty(shape)
    whole = s.dense(5, like, 1)[0]
    for max_entries in (100, 1000, 1 << 18):
        blocks = list(s.chunks(5, like, max_entries))
        if like.dim() == 0:
            assert len(blocks) == 1 and blocks[0][0] is ...
            assert torch.equal(blocks[0][1], whole)
            continue
        row = like[0].numel()
        start = 0
        for rows, v in blocks:
            assert rows.start == start and rows.stop > start
            assert v.shape == (rows.stop - rows.start, *shape[1:])
            assert v.numel() <= max(max_entries, 64 * row)
            start = rows.stop
        assert start == shape[0]
        if like.numel() > 64 * max(max_entries, row):
            assert len(blocks) > 1
        assert torch.equal(torch.cat([v for _, v in blocks]), whole), max_entries


@pytest.mark.parametrize("shape", PIECE_SHAPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_rows_are_the_rows_of_the_whole_draw(distribution, shape):
    """Chosen rows — repeated, unordered, negative, in any shape of ids — bit for bit those
    of the whole draw (Gaussian rows start mid-word when a row is not 4 entries)."""
    s = sampler_of(distribution, step_seed=22, rank=3)
    like = torch.empty(shape)
    whole = s.dense(1, like, 1)[0]
    if like.dim() == 0:
        with pytest.raises(IndexError):
            s.rows(1, like, torch.tensor([0]))
        return
    q = shape[0]
    ids = torch.tensor([[q - 1, 0, 3 % q], [3 % q, 1 % q, -1], [2 % q, 4 % q, q // 2]])
    got = s.rows(1, like, ids)
    assert got.shape == (3, 3, *shape[1:])
    assert torch.equal(got, whole[ids])
    assert torch.equal(s.rows(1, like, torch.arange(q)), whole)
    assert torch.equal(s.rows(1, like, torch.tensor(q - 1)), whole[q - 1])
    assert s.rows(1, like, torch.empty(0, dtype=torch.long)).shape == (0, *shape[1:])
    with pytest.raises(IndexError, match="row ids"):
        s.rows(1, like, torch.tensor([q]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_add_to_is_the_whole_draw_added(distribution, dtype):
    """``add_to`` adds block by block what ``add_(dense(...)[0], alpha)`` adds at once, bit
    for bit — also into a non-contiguous tensor and, with ``also``, into a second one;
    bfloat16 (whose blockwise add would round differently) takes one block."""
    s = sampler_of(distribution, step_seed=23, rank=3)
    for shape in [(257, 384), (1000, 37), (11,), ()]:
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(shape, generator=gen).to(dtype)
        g = torch.randn(shape, generator=gen).to(dtype)
        z = s.dense(2, p, 1)[0]
        expected_p, expected_g = p.clone().add_(z, alpha=-0.37), g.clone().add_(z, alpha=0.11)
        s.add_to(2, p, -0.37, 1000, also=(g, 0.11))
        assert torch.equal(p, expected_p) and torch.equal(g, expected_g), shape
    t = torch.randn(384, 257, dtype=dtype).T  # (257, 384), non-contiguous
    expected = t.clone().add_(s.dense(3, t, 1)[0], alpha=1e-3)
    s.add_to(3, t, 1e-3, 500)
    assert torch.equal(t, expected)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_pieces_on_the_test_device(distribution, device):
    """On any device the pieces are those of the whole draw (a device generator's Gaussians
    are one block)."""
    s = sampler_of(distribution, step_seed=24, rank=3)
    like = torch.empty(300, 40, device=device)
    whole = s.dense(0, like, 1)[0]
    assert torch.equal(torch.cat([v for _, v in s.chunks(0, like, 1000)]), whole)
    ids = torch.tensor([5, 299, 5, 0, 6], device=device)
    assert torch.equal(s.rows(0, like, ids), whole[ids])
    p = torch.randn(300, 40, device=device)
    expected = p.clone().add_(whole, alpha=0.5)
    s.add_to(0, p, 0.5, 1000)
    assert torch.equal(p, expected)


def test_numpy_stream_draws_the_same_entries_as_the_tensor_stream():
    """forwardonly.gaussian (numpy only) and the tensor stream: the same entries, in float32
    and float64, over consecutive draws and skips."""
    from forwardonly import gaussian

    for dtype, np_dtype in ((torch.float32, np.float32), (torch.float64, np.float64)):
        a, b = GaussianStream(5), gaussian.GaussianStream(5)
        for size in (3, 4096, 70_001):
            want = a.normal((size,), dtype=dtype)
            assert np.array_equal(b.array(size, np_dtype), want.numpy())
        a.skip(8)
        b.skip(8)
        assert np.array_equal(b.array((2, 3), np_dtype), a.normal((2, 3), dtype=dtype).numpy())
    # blocks(): the entries of consecutive array() calls, and the stream moves on past them
    sizes = [6, 4096, 5, 70_001]
    one_by_one = gaussian.GaussianStream(21)
    want = [one_by_one.array(size) for size in sizes]
    streamed = gaussian.GaussianStream(21)
    for w, got in zip(want, streamed.blocks(sizes), strict=True):
        assert np.array_equal(got, w)
    assert np.array_equal(streamed.array(9), one_by_one.array(9))
    out = np.empty((4, 5), dtype=np.float32)
    assert gaussian.GaussianStream(9).array((4, 5), out=out) is out
    with pytest.raises(ValueError, match="C-contiguous"):
        gaussian.GaussianStream(9).array((5, 4), out=out.T)


@pytest.mark.parametrize("factor", [4, 16])
def test_one_noise_tables_second_moment_has_mean_eigenvalue_one_and_spread_one_over_root_factor(
        factor):
    """For one fixed table, E[v vᵀ] over the step's offset is M = (1/L) Σ_o w_o w_oᵀ (every
    window w_o of the L offsets): positive semi-definite, mean eigenvalue about 1 (the mean
    square of the table's entries) and a spread of about 1/√factor, as the module says."""
    n = 300
    table = NoiseTable(3, factor)
    t = table.table(0, n, torch.empty(n, dtype=torch.float64))
    length = factor * n
    windows = t.unfold(0, n, 1)[:length]  # (L, n): every window
    m = windows.T @ windows / length
    eig = torch.linalg.eigvalsh(m)
    assert eig.min() > 0
    assert eig.mean().item() == pytest.approx(1.0, abs=0.05)
    assert eig.std().item() == pytest.approx(factor ** -0.5, rel=0.3)
