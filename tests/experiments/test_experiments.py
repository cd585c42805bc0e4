"""Tests of the essay's experiments: dimension curse, estimator quality, latency.

Statistical checks use fixed seeds and state their tolerance (in standard errors); exact
checks compare with ``torch.testing.assert_close`` / ``math.isclose``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from forwardonly.estimators import ESTIMATORS, Estimator, make_estimator
from forwardonly.estimators.base import set_grad
from forwardonly.experiments import EXPERIMENTS, load_experiment, write_csv
from forwardonly.experiments import dimension_curse as dc
from forwardonly.experiments import estimator_quality as eq
from forwardonly.experiments import latency as lat

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- helpers -----------------------------------------------------------------------------------
def run_command(name: str, argv: list[str]) -> dict:
    module = load_experiment(name)
    parser = argparse.ArgumentParser(prog=f"forwardonly experiment {name}")
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path} has no rows"
    return rows


# -- registry ----------------------------------------------------------------------------------
def test_every_experiment_has_the_command_interface() -> None:
    for name, module_name in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args(["--out", "somewhere", "--seed", "3"])
        assert args.out == Path("somewhere") and args.seed == 3, name
        assert callable(module.run)


def test_unknown_experiment_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="experiment must be one of"):
        load_experiment("dimension_curse")


def test_write_csv_refuses_empty_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        write_csv(tmp_path / "x.csv", [])


# -- dimension curse ---------------------------------------------------------------------------
def test_histogram_counts_sum_to_the_sample_count() -> None:
    cos = dc.sample_cos(7, 5_000, seed=0)
    counts = dc.histogram_abs_cos(cos, 100)
    assert counts.shape == (100,) and int(counts.sum()) == 5_000
    # Edge values: |cos| = 1 and round-off just above 1 land in the last bin, 0 in the first.
    edge = np.array([-1.0, 1.0, 1.0000001, 0.0, -0.0, 0.5], dtype=np.float32)
    counts = dc.histogram_abs_cos(edge, 10)
    assert int(counts.sum()) == 6
    assert counts[-1] == 3 and counts[0] == 2 and counts[5] == 1


def test_histogram_sweep_counts_and_independence_of_n() -> None:
    ns = [4, 10, 30]
    for nested in (False, True):
        counts, stats, seconds = dc.histogram_sweep(ns, 2_000, bins=20, seed=1, nested=nested)
        assert counts.shape == (3, 20)
        assert counts.sum(1).tolist() == [2_000] * 3
        assert [s["samples"] for s in stats] == [2_000] * 3
        assert seconds >= 0


def test_histogram_sweep_does_not_depend_on_the_thread_count() -> None:
    # Every n has its own stream, so sharing the n's among threads changes nothing.
    ns = [4, 5, 17, 30]
    one = dc.histogram_sweep(ns, 3_000, bins=20, seed=2, threads=1)
    three = dc.histogram_sweep(ns, 3_000, bins=20, seed=2, threads=3)
    assert np.array_equal(one[0], three[0]) and one[1] == three[1]
    other_seed = dc.histogram_sweep(ns, 3_000, bins=20, seed=3, threads=1)
    assert not np.array_equal(one[0], other_seed[0])
    rows = dc.large_n_sweep([4, 50, 3_000], beta_samples=10, direct_pairs=200, direct_max=100,
                            seed=1, threads=2)
    assert [(r["n"], r["method"]) for r in rows] == [
        (4, "gaussian-pairs"), (4, "beta"), (50, "gaussian-pairs"), (50, "beta"), (3_000, "beta")]
    assert rows == dc.large_n_sweep([4, 50, 3_000], beta_samples=10, direct_pairs=200,
                                    direct_max=100, seed=1, threads=1)


def test_pairs_are_explicit_vectors_from_the_library_stream() -> None:
    # sample_cos is cos(x, y) of the stream's entries laid out (2, n, pairs): x = [0], y = [1].
    n, pairs = 6, 50
    z = dc.gaussian_stream(11).array((2, n, pairs), np.float64)
    x, y = z[0].T, z[1].T
    want = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    np.testing.assert_allclose(dc.sample_cos(n, pairs, seed=11), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [3, 8, 40, 500, 2_000])
def test_mean_cos2_within_3_standard_errors_of_1_over_n(n: int) -> None:
    # E[cos²] = 1/n and E|cos| = Γ(n/2) / (√π Γ((n+1)/2)); the checks allow 3 standard errors.
    m = dc.cos_moments(dc.sample_cos(n, 20_000, seed=n))
    assert abs(m["mean_cos2"] - 1 / n) < 3 * m["se_mean_cos2"]
    assert abs(m["mean_abs_cos"] - dc.exact_mean_abs_cos(n)) < 3 * m["se_mean_abs_cos"]
    # The same for the exact distribution cos² ~ Beta(1/2, (n-1)/2).
    b = dc.moments(dc.sample_cos2_beta(n, 20_000, rng=np.random.default_rng(n)))
    assert abs(b["mean_cos2"] - 1 / n) < 3 * b["se_mean_cos2"]


@pytest.mark.parametrize("n", [4, 50])
def test_nested_samples_have_the_right_moments(n: int) -> None:
    cos = dc.sample_cos_nested([n, 60], 20_000, seed=7)[0].astype(np.float64)
    m = dc.moments(cos * cos, np.abs(cos))
    assert abs(m["mean_cos2"] - 1 / n) < 3 * m["se_mean_cos2"]
    assert abs(m["mean_abs_cos"] - dc.exact_mean_abs_cos(n)) < 3 * m["se_mean_abs_cos"]


def test_chunked_sampling_for_large_n(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force many chunks; the result must still be 64 valid cosines with E[cos²] ≈ 1/n.
    monkeypatch.setattr(dc, "CHUNK_ELEMENTS", 4_000)
    cos = dc.sample_cos(1_000, 64, seed=2)
    assert cos.shape == (64,) and bool((np.abs(cos) <= 1).all())
    assert abs(float(np.mean(cos.astype(np.float64) ** 2)) - 1e-3) < 6e-4  # ~3.5 s.e.


def test_exact_mean_abs_cos_closed_forms() -> None:
    assert math.isclose(dc.exact_mean_abs_cos(2), 2 / math.pi, rel_tol=1e-12)  # uniform angle
    assert math.isclose(dc.exact_mean_abs_cos(3), 0.5, rel_tol=1e-12)  # uniform on [-1, 1]
    n = 1_000_000
    assert math.isclose(dc.exact_mean_abs_cos(n), dc.asymptotic_mean_abs_cos(n), rel_tol=1e-5)
    with pytest.raises(ValueError, match="n >= 2"):
        dc.exact_mean_abs_cos(1)


def test_essay_colors() -> None:
    assert dc.essay_color(0) == (0.0, 1.0, 1.0)  # cyan
    assert dc.essay_color(80) == (1.0, 0.0, 1.0)  # magenta
    assert dc.essay_color(40) == (0.5, 0.5, 1.0)


def test_dimension_curse_command_end_to_end(tmp_path: Path) -> None:
    summary = run_command("dimension-curse", [
        "--out", str(tmp_path), "--n-min", "4", "--n-max", "9", "--pairs", "500",
        "--bins", "20", "--large-n-max", "2000", "--per-decade", "2", "--beta-samples", "500",
        "--direct-pairs", "100", "--direct-max", "100"])
    assert_png(tmp_path / "dimension_curse.png")
    hist = read_csv(tmp_path / "dimension_curse_histograms.csv")
    assert len(hist) == 6 * 20
    for n in range(4, 10):
        assert sum(int(r["count"]) for r in hist if int(r["n"]) == n) == 500
    moments = read_csv(tmp_path / "dimension_curse_moments.csv")
    assert {r["method"] for r in moments} == {
        "gaussian-pairs-histogram-independent", "gaussian-pairs", "beta"}
    assert summary["total_pairs"] == 6 * 500 and summary["histogram_seconds"] >= 0


def test_dimension_curse_command_runs_without_torch(tmp_path: Path) -> None:
    # The whole command is numpy: a fresh interpreter never imports torch (about a second).
    code = (
        "import sys\n"
        "from forwardonly.cli import main\n"
        f"main(['experiment', 'dimension-curse', '--out', {str(tmp_path)!r}, '--n-max', '6',"
        " '--pairs', '200', '--large-n-max', '1000', '--beta-samples', '100',"
        " '--direct-pairs', '10', '--direct-max', '50'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "dimension_curse.png")


# -- latency -----------------------------------------------------------------------------------
def test_backprop_schedule_by_hand() -> None:
    ivs = lat.backprop_schedule([1.0, 2.0], [3.0, 4.0], [0.5, 5.0])
    got = {(iv.stage, iv.phase): (iv.start, iv.end) for iv in ivs}
    assert got == {
        (0, "forward"): (0.0, 1.0), (1, "forward"): (1.0, 3.0),
        (1, "backward"): (3.0, 7.0), (1, "update"): (7.0, 12.0),
        (0, "backward"): (7.0, 10.0), (0, "update"): (10.0, 10.5),
    }
    assert lat.makespan(ivs) == 12.0  # stage 2's long update ends last


def test_forward_gradient_schedule_by_hand() -> None:
    ivs = lat.forward_gradient_schedule([2.0, 3.0], [1.0, 4.0], broadcast=0.5)
    got = {(iv.stage, iv.phase): (iv.start, iv.end) for iv in ivs}
    assert got == {
        (0, "jvp"): (0.0, 2.0), (1, "jvp"): (2.0, 5.0),
        (0, "update"): (5.5, 6.5), (1, "update"): (5.5, 9.5),
    }
    assert lat.makespan(ivs) == 9.5


def test_schedule_critical_paths_match_the_formulas() -> None:
    rng = np.random.default_rng(0)
    f, b, u, j, v = (rng.uniform(0.1, 2.0, 6).tolist() for _ in range(5))
    t_bp = sum(f) + max(sum(b[i:]) + u[i] for i in range(6))
    t_fg = sum(j) + 0.25 + max(v)
    assert math.isclose(lat.makespan(lat.backprop_schedule(f, b, u)), t_bp, rel_tol=1e-12)
    assert math.isclose(lat.makespan(lat.forward_gradient_schedule(j, v, 0.25)), t_fg,
                        rel_tol=1e-12)


def test_schedules_reject_bad_costs() -> None:
    with pytest.raises(ValueError, match="one cost per stage"):
        lat.backprop_schedule([1.0, 2.0], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        lat.forward_gradient_schedule([1.0], [-1.0])
    with pytest.raises(ValueError, match="at least one stage"):
        lat.forward_gradient_schedule([], [])


def test_build_stages_splits_all_layers() -> None:
    stages = lat.build_stages(5, 8, 4, in_features=6, classes=3, seed=0)
    linears = [[m for m in st if isinstance(m, nn.Linear)] for st in stages]
    assert [len(ls) for ls in linears] == [2, 2, 1, 1]  # 6 linear layers, extras first
    x = torch.randn(2, 6)
    for st in stages:
        x = st(x)
    assert x.shape == (2, 3)
    with pytest.raises(ValueError, match="between 1 and depth"):
        lat.build_stages(2, 8, 4, in_features=6, classes=3)


@pytest.mark.parametrize("distribution", ["gaussian", "rank1"])
def test_stage_jvp_equals_torch_func_jvp(distribution: str) -> None:
    from forwardonly.autodiff import DirectionSampler, Rank1

    torch.manual_seed(0)
    stage = lat.build_stages(3, 5, 2, in_features=4, classes=3, seed=1)[1]
    h, h_dot = torch.randn(6, 5), torch.randn(6, 5)
    sampler = DirectionSampler(distribution, 1234)
    out, out_dot, dirs = lat.stage_jvp(stage, h, h_dot, sampler, first_index=3)
    dense = [d.materialize()[0] if isinstance(d, Rank1) else d.reshape(p.shape)
             for d, p in zip(dirs, stage.parameters(), strict=True)]
    params = dict(stage.named_parameters())
    tangents = dict(zip(params, dense, strict=True))
    ref, ref_dot = jvp(lambda p, x: functional_call(stage, p, (x,)),
                       ({k: v.detach() for k, v in params.items()}, h), (tangents, h_dot))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_dot, ref_dot)


def test_forward_gradient_step_applies_d_times_v() -> None:
    # After the step, θ' - θ = -lr · d · v with d the JVP of the loss: check on the weights.
    stages = lat.build_stages(2, 4, 2, in_features=3, classes=2, seed=0)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    before = [p.detach().clone() for st in stages for p in st.parameters()]
    timings = lat.time_forward_gradient_step(stages, x, y, lr=0.1, seed=9)
    assert set(timings) == {"jvp", "update"} and all(len(v) == 2 for v in timings.values())
    after = [p.detach() for st in stages for p in st.parameters()]
    delta = torch.cat([(a - b).reshape(-1) for a, b in zip(after, before, strict=True)])
    # Redraw the directions and the directional derivative at the old weights.
    from forwardonly.autodiff import DirectionSampler

    sampler = DirectionSampler("gaussian", 9)
    v = torch.cat([sampler.dense(i, b, 1)[0].reshape(-1) for i, b in enumerate(before)])
    model = nn.Sequential(*[m for st in stages for m in st])
    names = [n for n, _ in model.named_parameters()]
    old = dict(zip(names, before, strict=True))
    tang, i = {}, 0
    for n, b in old.items():
        tang[n] = v[i : i + b.numel()].view_as(b)
        i += b.numel()
    _, d = jvp(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y), (old,), (tang,))
    torch.testing.assert_close(delta, -0.1 * d * v, rtol=1e-4, atol=1e-6)


def test_latency_command_end_to_end(tmp_path: Path) -> None:
    summary = run_command("latency", [
        "--out", str(tmp_path), "--depth", "3", "--width", "16", "--stages", "2",
        "--batch-size", "8", "--in-features", "12", "--repeats", "2", "--warmup", "1"])
    assert_png(tmp_path / "latency.png")
    costs = read_csv(tmp_path / "latency_costs.csv")
    assert {r["phase"] for r in costs} == {"forward", "backward", "update", "jvp"}
    schedule = read_csv(tmp_path / "latency_schedule.csv")
    assert {r["label"] for r in schedule} == {lat.LABEL}
    assert summary["backprop_ms"] > 0 and summary["critical_path_ratio_gaussian"] > 0
    assert "critical_path_ratio_rank1" in summary


# -- estimator quality -------------------------------------------------------------------------
class NoisyExact(Estimator):
    """Exact gradient plus N(0, σ²) noise drawn from the estimator's seed (a test double)."""

    def __init__(self, model: nn.Module, loss_fn, *, directions: int = 1, seed: int = 0,
                 sigma: float = 0.5) -> None:
        super().__init__(model, loss_fn, seed=seed)
        self.sigma = sigma

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        params = [p for _, p in self.trainable()]
        with torch.enable_grad():
            loss = self.loss_fn(self.model(inputs), targets)
            grads = torch.autograd.grad(loss, params)
        gen = torch.Generator().manual_seed(self.seed)
        for p, g in zip(params, grads, strict=True):
            set_grad(p, g + self.sigma * torch.randn(p.shape, generator=gen))
        return {"loss": loss.item()}


def two_parameter_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1))  # weight + bias: 2 parameters
    x = torch.randn(16, 1)
    y = 3 * x + 1 + 0.1 * torch.randn(16, 1)
    return model, x, y


def direct_quality(gs: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """The quality numbers written out plainly from the R×P estimates."""
    e2 = exact @ exact
    cos = gs @ exact / (np.linalg.norm(gs, axis=1) * np.linalg.norm(exact))
    alpha = np.mean(gs @ exact) / e2
    tr_cov = np.trace(np.atleast_2d(np.cov(gs.T)))  # unbiased sample covariance
    return {"cos_mean": cos.mean(), "cos_se": cos.std(ddof=1) / np.sqrt(len(cos)),
            "scale": alpha, "second_moment_ratio": np.mean(np.sum(gs**2, 1)) / e2,
            "normalized_second_moment": np.mean(np.sum(gs**2, 1)) / (alpha**2 * e2),
            "relative_variance": tr_cov / (alpha**2 * e2)}


def assert_matches(q: dict[str, float], direct: dict[str, float]) -> None:
    for key, value in direct.items():
        assert math.isclose(q[key], float(value), rel_tol=1e-9, abs_tol=1e-12), key


def test_exact_gradient_matches_autograd_on_two_parameters() -> None:
    model, x, y = two_parameter_problem()
    g = eq.exact_gradient(model, F.mse_loss, x, y)
    err = model(x).detach() - y  # (16, 1)
    by_hand = torch.stack([(2 * err * x).mean(), (2 * err).mean()])  # d/dw, d/db of the MSE
    torch.testing.assert_close(g, by_hand)


def test_quality_of_a_noisy_exact_estimator_matches_a_direct_computation() -> None:
    model, x, y = two_parameter_problem()
    exact = eq.exact_gradient(model, F.mse_loss, x, y)
    seeds = list(range(10, 30))
    q = eq.measure(lambda s: NoisyExact(model, F.mse_loss, seed=s), x, y, seeds, exact)
    gs = np.stack([eq.estimate_gradient(NoisyExact(model, F.mse_loss, seed=s), x, y).numpy()
                   for s in seeds]).astype(np.float64)
    # The estimates are what the estimator draws: exact + σ·N(0, I) from its seed.
    for s, g in zip(seeds, gs, strict=True):
        noise = 0.5 * torch.randn(2, generator=torch.Generator().manual_seed(s))
        np.testing.assert_allclose(g, (exact + noise).numpy(), rtol=1e-6)
    assert_matches(q, direct_quality(gs, exact.double().numpy()))
    assert_matches(eq.gradient_quality(torch.from_numpy(gs), exact),
                   direct_quality(gs, exact.double().numpy()))


@pytest.mark.skipif("fg-w" not in ESTIMATORS, reason="fg-w is not registered")
def test_fg_w_quality_on_two_parameters_matches_a_direct_computation() -> None:
    model, x, y = two_parameter_problem()
    exact = eq.exact_gradient(model, F.mse_loss, x, y)
    seeds = list(range(40))
    build = lambda s: make_estimator("fg-w", model, F.mse_loss,  # noqa: E731
                                     **eq.estimator_options("fg-w", 1, s))
    q = eq.measure(build, x, y, seeds, exact)
    gs = np.stack([eq.estimate_gradient(build(s), x, y).numpy() for s in seeds])
    # Every FG-W estimate is (∇·v) v: parallel to its direction, with <g, ∇> = (∇·v)² >= 0.
    assert (gs.astype(np.float64) @ exact.double().numpy() >= 0).all()
    assert_matches(q, direct_quality(gs.astype(np.float64), exact.double().numpy()))


@pytest.mark.skipif("fg-w" not in ESTIMATORS, reason="fg-w is not registered")
def test_fg_w_cosine_matches_theory_on_two_parameters() -> None:
    # n = 2, K = 1: E cos = 2/π (the angle of v is uniform); 600 seeds, 4 standard errors.
    model, x, y = two_parameter_problem()
    exact = eq.exact_gradient(model, F.mse_loss, x, y)
    build = lambda s: make_estimator("fg-w", model, F.mse_loss,  # noqa: E731
                                     **eq.estimator_options("fg-w", 1, s))
    q = eq.measure(build, x, y, range(600), exact)
    assert math.isclose(eq.theory_cosine(2, 1), 2 / math.pi, rel_tol=1e-12)
    assert abs(q["cos_mean"] - 2 / math.pi) < 4 * q["cos_se"]
    assert abs(q["scale"] - 1.0) < 0.25  # unbiased; s.e. of the scale is about 0.07 here


@pytest.mark.parametrize(("n", "k"), [(30, 1), (30, 4), (200, 16)])
def test_theory_matches_a_monte_carlo_of_the_estimator(n: int, k: int) -> None:
    # Simulate g = Σ_k d_k v_k (full) and Σ_k sign(d_k) v_k (sign) for a unit gradient u = e1.
    rng = np.random.default_rng(n + k)
    v = rng.standard_normal((4_000, k, n))  # (R, K, n)
    d = v[:, :, 0]  # (R, K): u·v_k
    for kind, coeff in (("gaussian", d), ("sign", np.sign(d))):
        g = np.einsum("rk,rkn->rn", coeff, v)  # (R, n)
        cos = g[:, 0] / np.linalg.norm(g, axis=1)
        se = cos.std(ddof=1) / np.sqrt(len(cos))
        assert abs(cos.mean() - eq.theory_cosine(n, k, kind)) < 4 * se, kind
        mean = g.mean(0)
        nsm = np.mean(np.sum(g**2, 1)) / mean[0] ** 2
        assert math.isclose(nsm, eq.theory_second_moment(n, k, kind), rel_tol=0.1), kind


def test_theory_special_cases() -> None:
    from forwardonly.experiments.dimension_curse import exact_mean_abs_cos

    for n in (2, 10, 1_000):  # K = 1: the dimension-curse quantity
        assert math.isclose(eq.theory_cosine(n, 1), exact_mean_abs_cos(n), rel_tol=1e-12)
    assert eq.theory_second_moment(100, 1) == 102  # (n + 2) at K = 1
    assert eq.theory_relative_variance(100, 4) == pytest.approx(101 / 4)
    with pytest.raises(ValueError, match="kind must be"):
        eq.theory_second_moment(10, 1, "rank1")


def test_gradient_methods_skip_the_reference_and_non_direction_estimators() -> None:
    methods, notes = eq.gradient_methods()
    assert "bp" not in methods and "bp" in notes
    for name in methods:
        assert "directions" in eq.estimator_options(name, 2, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        eq.gradient_methods(["no-such-method"])


def test_estimator_quality_command_end_to_end(tmp_path: Path) -> None:
    summary = run_command("estimator-quality", [
        "--out", str(tmp_path), "--widths", "3,6", "--directions", "1,2",
        "--directions-width", "4", "--repeats", "3", "--batch-size", "16"])
    assert_png(tmp_path / "estimator_quality.png")
    rows = read_csv(tmp_path / "estimator_quality.csv")
    assert len(rows) == 4 * len(summary["methods"])
    for r in rows:
        assert -1.0 <= float(r["cos_mean"]) <= 1.0
        assert int(r["parameters"]) == 75 * int(r["width"]) + 10  # digits: 64 in, 10 classes
