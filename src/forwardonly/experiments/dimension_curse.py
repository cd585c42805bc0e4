"""The curse of dimensionality: |cos| between random vectors concentrates at 0 as n grows.

For ``x, y ~ N(0, Iₙ)`` independent, rotational invariance makes ``cos(x, y)`` distributed as
``x₁ / ‖x‖``, hence (χ²₁ / (χ²₁ + χ²ₙ₋₁))::

    cos² ~ Beta(1/2, (n-1)/2)
    E[cos²]  = 1/n                       Var[cos²] = 2(n-1) / (n²(n+2))
    E|cos|   = Γ(n/2) / (√π Γ((n+1)/2))  → sqrt(2/(πn))  as n → ∞

This is why a random perturbation direction carries little information about the gradient of
a network with n parameters (forward gradient, zeroth order): the cosine between the estimate and
the true gradient scales like ``n^(-1/2)``.

The experiment has two panels:

1. the essay's picture: for n = 4..79, ``pairs`` independent pairs of N(0, Iₙ) vectors per n
   (fresh samples for every n), histogram of |cos| on [0, 1] in 100 bins, one curve per n,
   coloured RGB (n/80, 1 - n/80, 1): cyan for small n to magenta for large n;
2. E|cos| and sqrt(E[cos²]) against n up to 10⁶ (the size of real networks) beside the closed
   forms. Up to ``--direct-max`` the points come from explicit Gaussian pairs (fewer of them,
   generated in chunks); over the whole range they also come from the exact distribution
   cos² ~ Beta(1/2, (n-1)/2), which needs no n-dimensional vectors at all.

The vectors are explicit: every pair's x and y are drawn, and x·y, ‖x‖², ‖y‖² computed, in
float32 chunks that stay in cache. Their entries come from the library's Gaussian stream
(:class:`forwardonly.gaussian.GaussianStream`: 16 random bits and a table lookup per entry,
mean 0 and mean square 1 exactly), every n from its own stream, the n's shared among
``--threads`` threads (the numbers do not depend on how many). The experiment is numpy only:
the command does not import torch, whose import alone takes about a second.

Run: ``forwardonly experiment dimension-curse --out results/dimension-curse``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from forwardonly.experiments import at_least, available_threads, write_csv
from forwardonly.gaussian import GaussianStream
from forwardonly.seeding import mix_seed

# Normals drawn at once when sampling pairs (2 × rows × n ≤ this, at least one pair): 2¹⁶
# float32 = 256 KiB, so a chunk's draw and its products stay in the L2 cache.
CHUNK_ELEMENTS = 1 << 16
_T = TypeVar("_T")


# -- closed forms ------------------------------------------------------------------------------
def exact_mean_abs_cos(n: int | float) -> float:
    """E|cos(x, y)| = Γ(n/2) / (√π Γ((n+1)/2)) for independent x, y ~ N(0, Iₙ) (log-gamma form)."""
    if n < 2:
        raise ValueError(f"the cosine needs dimension n >= 2, got n={n}")
    return math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2) - 0.5 * math.log(math.pi))


def asymptotic_mean_abs_cos(n: int | float) -> float:
    """Large-n limit sqrt(2 / (π n)) of E|cos|."""
    return math.sqrt(2.0 / (math.pi * n))


def exact_mean_cos2(n: int | float) -> float:
    """E[cos²] = 1/n (the mean of Beta(1/2, (n-1)/2))."""
    return 1.0 / n


# -- sampling ----------------------------------------------------------------------------------
def gaussian_stream(seed: int) -> GaussianStream:
    """The library's Gaussian stream (:class:`forwardonly.gaussian.GaussianStream`).

    Each entry is one of 2¹⁶ equally likely levels, the mean of N(0, 1) on its quantile bin,
    picked by 16 bits of a PCG64DXSM word: symmetric with mean square 1 exactly, fourth moment
    2.99983 (3 for N(0, 1)). E[cos²] = 1/n then holds exactly, and E|cos| from 5 × 10⁶ pairs
    matches the Gaussian closed form to within 2 standard errors (3 × 10⁻⁴ of it) at n = 4, 10
    and 79. One lookup per entry instead of a Box–Muller transform.
    """
    return GaussianStream(seed)


def _cos_of_chunk(z: np.ndarray, out: np.ndarray) -> None:
    """``out[j] = cos(z[0, :, j], z[1, :, j])`` for a ``(2, n, m)`` chunk: ‖x‖², ‖y‖² and x·y
    are sums over the middle axis, i.e. of contiguous rows of m pairs (vectorized over pairs),
    each one pass of ``einsum`` with no temporary array."""
    x, y = z[0], z[1]
    dot = np.einsum("ij,ij->j", x, y)
    norms = np.einsum("ij,ij->j", x, x)
    norms *= np.einsum("ij,ij->j", y, y)
    np.divide(dot, np.sqrt(norms, out=norms), out=out)


def sample_cos(n: int, pairs: int, *, seed: int) -> np.ndarray:
    """Cosines of ``pairs`` independent pairs of N(0, Iₙ) vectors, shape ``(pairs,)`` float32.

    Explicit vectors x, y drawn from :func:`gaussian_stream` (``seed``), in chunks of about
    ``CHUNK_ELEMENTS`` normals laid out ``(2, n, rows)`` (coordinate i of pair j at ``[:, i,
    j]``), each reduced to its cosines while it is in cache. At most one chunk exists at once
    (at least one pair: n = 10⁶ takes 2 × 10⁶ normals at a time).
    """
    if n < 2 or pairs < 1:
        raise ValueError(f"need n >= 2 and pairs >= 1, got n={n}, pairs={pairs}")
    rows = min(pairs, max(1, CHUNK_ELEMENTS // (2 * n)))
    starts = range(0, pairs, rows)
    sizes = [2 * n * min(rows, pairs - start) for start in starts]
    out = np.empty(pairs, dtype=np.float32)
    for start, size, z in zip(starts, sizes, gaussian_stream(seed).blocks(sizes), strict=True):
        _cos_of_chunk(z.reshape(2, n, size // (2 * n)), out[start : start + size // (2 * n)])
    return out


def sample_cos2_beta(n: int, samples: int, *, rng: np.random.Generator) -> np.ndarray:
    """Exact samples of cos² for dimension n: Beta(1/2, (n-1)/2), shape ``(samples,)`` float64,
    drawn as ``X / (X + Y)`` with ``X = Z²/2 ~ Gamma(1/2)`` and ``Y ~ Gamma((n-1)/2)`` (a third
    of the time of numpy's ``beta``)."""
    if n < 2 or samples < 1:
        raise ValueError(f"need n >= 2 and samples >= 1, got n={n}, samples={samples}")
    x = rng.standard_normal(samples)
    x *= x
    x *= 0.5
    y = rng.standard_gamma((n - 1) / 2.0, size=samples)
    y += x
    return np.divide(x, y, out=y)


def histogram_abs_cos(cos: np.ndarray, bins: int = 100) -> np.ndarray:
    """Counts of |cos| in ``bins`` equal bins on [0, 1], shape ``(bins,)`` int64.

    |cos| = 1 (and float round-off just above it) falls in the last bin, so the counts always
    sum to ``cos.size``.
    """
    idx = (np.abs(cos) * bins).astype(np.int64)
    np.clip(idx, 0, bins - 1, out=idx)
    return np.bincount(idx, minlength=bins)


def moments(cos2: np.ndarray, abs_cos: np.ndarray | None = None) -> dict[str, Any]:
    """Sample means of |cos| and cos² with their standard errors (std / sqrt(samples))."""
    c2 = np.asarray(cos2, dtype=np.float64)
    a = np.sqrt(c2) if abs_cos is None else np.asarray(abs_cos, dtype=np.float64)
    s = c2.size
    return {
        "samples": s,
        "mean_abs_cos": float(a.mean()),
        "se_mean_abs_cos": float(a.std(ddof=1) / math.sqrt(s)) if s > 1 else math.nan,
        "mean_cos2": float(c2.mean()),
        "se_mean_cos2": float(c2.std(ddof=1) / math.sqrt(s)) if s > 1 else math.nan,
        "rms_cos": float(math.sqrt(c2.mean())),
    }


def cos_moments(cos: np.ndarray) -> dict[str, Any]:
    """:func:`moments` of sampled cosines (float64)."""
    c = np.asarray(cos, dtype=np.float64)
    return moments(c * c, np.abs(c))


def sample_cos_nested(ns: Sequence[int], pairs: int, *, seed: int) -> np.ndarray:
    """Cosines for every n in ``ns`` from one draw of ``pairs`` pairs in dimension max(ns).

    Pair j in dimension n is the first n coordinates of pair j in dimension max(ns): for each n
    these are ``pairs`` independent pairs of N(0, Iₙ) vectors, but the curves of different n
    share samples (they are correlated across n). Far fewer normals than fresh draws per n.
    Returns ``(len(ns), pairs)`` float32.
    """
    if min(ns) < 2 or pairs < 1:
        raise ValueError(f"need every n >= 2 and pairs >= 1, got n={min(ns)}, pairs={pairs}")
    top = max(ns)
    cols = np.array([int(n) - 1 for n in ns])
    stream = gaussian_stream(seed)
    rows = min(pairs, max(1, CHUNK_ELEMENTS // (2 * top)))
    out = np.empty((len(ns), pairs), dtype=np.float32)
    for start in range(0, pairs, rows):
        m = min(rows, pairs - start)
        z = stream.array((2, m, top))  # (2, m, top)
        x, y = z[0], z[1]
        # Prefix sums over coordinates give dot products and norms for every n at once.
        dot = np.cumsum(x * y, 1)[:, cols]  # (m, len(ns))
        xx = np.cumsum(x * x, 1)[:, cols]
        yy = np.cumsum(y * y, 1)[:, cols]
        out[:, start : start + m] = (dot / np.sqrt(xx * yy)).T
    return out


def _largest_first(ns: Sequence[int], work: Callable[[int], _T], threads: int) -> list[_T]:
    """``[work(n) for n in ns]``, computed by ``threads`` threads taking the largest n first
    (the cost grows with n). Numpy's bit generator, lookups and reductions release the GIL,
    so the threads draw and reduce side by side."""
    order = sorted(range(len(ns)), key=lambda i: -int(ns[i]))
    results: dict[int, _T] = {}

    def one(i: int) -> None:
        results[i] = work(int(ns[i]))

    if threads > 1 and len(ns) > 1:
        with ThreadPoolExecutor(min(threads, len(ns))) as pool:
            list(pool.map(one, order))
    else:
        for i in order:
            one(i)
    return [results[i] for i in range(len(ns))]


def histogram_sweep(
    ns: Sequence[int], pairs: int, bins: int = 100, *, seed: int = 0, nested: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]], float]:
    """The essay's experiment: ``pairs`` Gaussian pairs for every n in ``ns``, |cos| histograms.

    ``nested=False`` (the essay's way) draws fresh pairs for every n, each n from its own
    stream (seed ``mix_seed(seed, 1, n)``), shared among ``threads`` threads (default:
    :func:`~forwardonly.experiments.available_threads`); the result does not depend on
    ``threads``. ``nested=True`` takes every n
    from prefixes of one draw (see :func:`sample_cos_nested`).
    Returns ``(counts (len(ns), bins) int64, moments per n, seconds spent sampling+binning)``.
    """
    threads = threads or available_threads()
    t0 = time.perf_counter()
    if nested:
        shared = sample_cos_nested(ns, pairs, seed=mix_seed(seed, 1))
        per_n = [(histogram_abs_cos(c, bins), cos_moments(c)) for c in shared]
    else:
        def one(n: int) -> tuple[np.ndarray, dict[str, Any]]:
            cos = sample_cos(n, pairs, seed=mix_seed(seed, 1, n))
            return histogram_abs_cos(cos, bins), cos_moments(cos)

        per_n = _largest_first(ns, one, threads)
    counts = np.stack([c for c, _ in per_n])
    return counts, [s for _, s in per_n], time.perf_counter() - t0


def large_n_sweep(
    ns: Sequence[int], *, beta_samples: int, direct_pairs: int, direct_max: int, seed: int = 0,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """E|cos|, E[cos²] for each n: from Beta samples (all n) and Gaussian pairs (n ≤ direct_max,
    seed ``mix_seed(seed, 3, n)``, shared among ``threads`` threads as in
    :func:`histogram_sweep`)."""
    rng = np.random.default_rng(mix_seed(seed, 2))
    direct_ns = [int(n) for n in ns if direct_pairs > 0 and int(n) <= direct_max]
    direct = dict(zip(direct_ns, _largest_first(
        direct_ns, lambda n: cos_moments(sample_cos(n, direct_pairs, seed=mix_seed(seed, 3, n))),
        threads or available_threads()), strict=True))
    rows: list[dict[str, Any]] = []
    for n in ns:
        n = int(n)
        if n in direct:
            rows.append({"n": n, "method": "gaussian-pairs", **direct[n]})
        if beta_samples > 0:
            rows.append({"n": n, "method": "beta", **moments(sample_cos2_beta(n, beta_samples,
                                                                                rng=rng))})
    return rows


def log_grid(lo: int, hi: int, per_decade: int) -> list[int]:
    """Integers from lo to hi, about ``per_decade`` per factor of 10, no duplicates."""
    pts = np.logspace(math.log10(lo), math.log10(hi), int(per_decade * math.log10(hi / lo)) + 1)
    return sorted({int(round(p)) for p in pts})


def with_closed_forms(row: dict[str, Any]) -> dict[str, Any]:
    n = row["n"]
    return {
        **row,
        "exact_mean_abs_cos": exact_mean_abs_cos(n),
        "asymptotic_mean_abs_cos": asymptotic_mean_abs_cos(n),
        "exact_mean_cos2": exact_mean_cos2(n),
        "z_cos2": (row["mean_cos2"] - 1.0 / n) / row["se_mean_cos2"],
    }


# -- plot --------------------------------------------------------------------------------------
def essay_color(n: int) -> tuple[float, float, float]:
    """The essay's colour for dimension n: RGB (n/80, 1 - n/80, 1)."""
    t = min(max(n / 80.0, 0.0), 1.0)
    return (t, 1.0 - t, 1.0)


def plot(
    path: Path,
    ns: Sequence[int],
    counts: np.ndarray,
    pairs: int,
    large_rows: list[dict[str, Any]],
    hist_seconds: float,
    sampling: str = "independent",
) -> Path:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    bins = counts.shape[1]
    centers = (np.arange(bins) + 0.5) / bins
    # Fixed axes positions (figure fractions) instead of a layout engine: the same picture,
    # without measuring every text box before drawing.
    fig = Figure(figsize=(13, 5.2))
    ax1 = fig.add_axes((0.045, 0.1, 0.39, 0.8))
    cax = fig.add_axes((0.445, 0.1, 0.012, 0.8))
    ax2 = fig.add_axes((0.56, 0.1, 0.43, 0.8))

    density = counts.astype(np.float64) / (pairs / bins)  # (len(ns), bins): integrates to 1
    for i, n in enumerate(ns):
        ax1.plot(centers, density[i], color=essay_color(int(n)), lw=0.9)
    ax1.set_xlim(0, 1)
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("|cos(x, y)|")
    ax1.set_ylabel("density")
    ax1.set_title(
        f"|cos| of {pairs:,} random Gaussian pairs per n, n = {min(ns)}..{max(ns)}\n"
        f"({sampling} samples per n, {bins} bins; sampled + binned in {hist_seconds:.2f} s)",
        fontsize=10,
    )
    cmap = LinearSegmentedColormap.from_list("essay", [essay_color(0), essay_color(80)])
    sm = ScalarMappable(norm=Normalize(0, 80), cmap=cmap)
    fig.colorbar(sm, cax=cax, label="dimension n")

    grid = np.array(sorted({r["n"] for r in large_rows}), dtype=float)
    fine = np.logspace(math.log10(grid.min()), math.log10(grid.max()), 200)
    ax2.plot(fine, [exact_mean_abs_cos(n) for n in fine], color="C0", lw=1.5,
             label="E|cos| exact: Γ(n/2) / (√π Γ((n+1)/2))")
    ax2.plot(fine, [asymptotic_mean_abs_cos(n) for n in fine], color="C0", ls=":", lw=1.5,
             label="E|cos| → sqrt(2/(πn))")
    ax2.plot(fine, 1 / np.sqrt(fine), color="C3", lw=1.5, label="sqrt(E cos²) = 1/sqrt(n)")
    for method, marker, fill in (("beta", "o", "none"), ("gaussian-pairs", "x", None)):
        rows = [r for r in large_rows if r["method"] == method]
        if not rows:
            continue
        n_ = [r["n"] for r in rows]
        what = (f"Beta(1/2,(n-1)/2) samples ({rows[0]['samples']:,}/n)" if method == "beta"
                else f"Gaussian pairs ({rows[0]['samples']:,}/n)")
        kw: dict[str, Any] = {"marker": marker, "ls": "none", "ms": 5}
        if fill:
            kw["mfc"] = fill
        ax2.plot(n_, [r["mean_abs_cos"] for r in rows], color="C0", label=f"E|cos|, {what}", **kw)
        ax2.plot(n_, [r["rms_cos"] for r in rows], color="C3", label=f"sqrt(E cos²), {what}",
                 **kw)
    ax2.axvspan(1e5, grid.max(), color="0.9", zorder=0)
    ax2.text(3e5, 0.5, "real networks:\n10⁵ parameters\nand more", ha="center", va="center",
             fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    for axis in (ax2.xaxis, ax2.yaxis):  # plain-text powers of ten: no mathtext to lay out
        axis.set_major_formatter(FuncFormatter(_power_of_ten))
        axis.set_minor_formatter(NullFormatter())
    ax2.set_xlabel("dimension n")
    ax2.set_ylabel("|cos| scale")
    ax2.set_title("concentration of cos at 0: E|cos| and sqrt(E cos²) against n", fontsize=10)
    ax2.legend(fontsize=7.5, loc="lower left")
    ax2.grid(True, which="major", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, pil_kwargs={"compress_level": 1})  # fast zlib: 1/5 the time
    return path


def _import_plotting() -> None:
    """Import what :func:`plot` needs (about a third of a second), on a thread of its own
    while the pairs are sampled: the sampling releases the GIL in its draws and lookups, and
    :func:`plot`'s own imports then find the modules loaded (or wait for them)."""
    for name in ("matplotlib.cm", "matplotlib.colors", "matplotlib.figure", "matplotlib.ticker",
                 "matplotlib.backends.backend_agg"):
        importlib.import_module(name)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power_of_ten(value: float, _position: object = None) -> str:
    """A log axis' tick label as plain text: ``10⁻³``, ``1``, ``10⁵``."""
    if value <= 0:
        return ""
    exponent = round(math.log10(value))
    return "1" if exponent == 0 else f"10{str(exponent).translate(_SUPERSCRIPT)}"


# -- command -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/dimension-curse"),
                        help="folder for dimension_curse.png and the CSV files")
    parser.add_argument("--seed", type=int, default=0, help="seed of all random draws")
    parser.add_argument("--n-min", type=at_least(2), default=4, help="smallest n of the histograms")
    parser.add_argument("--n-max", type=at_least(2), default=79, help="largest n of the histograms")
    parser.add_argument("--pairs", type=at_least(1), default=100_000,
                        help="Gaussian pairs per n for the histograms (fresh for every n)")
    parser.add_argument("--bins", type=at_least(1), default=100, help="histogram bins on [0, 1]")
    parser.add_argument("--sampling", choices=("independent", "nested"), default="independent",
                        help="independent: fresh pairs for every n (the essay's way); nested: "
                        "every n from prefixes of one draw in dimension --n-max (faster, the "
                        "curves then share samples)")
    parser.add_argument("--large-n-max", type=at_least(2), default=1_000_000,
                        help="largest n of the second panel")
    parser.add_argument("--per-decade", type=at_least(1), default=6,
                        help="points per factor of 10 in n on the second panel")
    parser.add_argument("--beta-samples", type=at_least(1), default=100_000,
                        help="samples of cos² ~ Beta(1/2,(n-1)/2) per n on the second panel")
    parser.add_argument("--direct-pairs", type=at_least(0), default=1_000,
                        help="explicit Gaussian pairs per n on the second panel (0: none)")
    parser.add_argument("--direct-max", type=at_least(2), default=10_000,
                        help="largest n for which the second panel also samples Gaussian pairs")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="threads that sample the Gaussian pairs, each taking whole n's "
                        "(default: $OMP_NUM_THREADS if set, else every core this process may "
                        "use); the "
                        "numbers do not depend on it")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not 2 <= args.n_min <= args.n_max:
        raise ValueError(f"need 2 <= --n-min <= --n-max, got {args.n_min} and {args.n_max}")
    out: Path = args.out
    ns = list(range(args.n_min, args.n_max + 1))
    threads = available_threads() if args.threads is None else args.threads
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    threading.Thread(target=_import_plotting, daemon=True).start()
    counts, hist_stats, seconds = histogram_sweep(
        ns, args.pairs, args.bins, seed=args.seed, nested=args.sampling == "nested",
        threads=threads,
    )

    lo = 4 if args.large_n_max >= 4 else 2
    grid = log_grid(lo, args.large_n_max, args.per_decade)
    t0 = time.perf_counter()
    large = large_n_sweep(grid, beta_samples=args.beta_samples, direct_pairs=args.direct_pairs,
                          direct_max=args.direct_max, seed=args.seed, threads=threads)
    large_seconds = time.perf_counter() - t0

    edges = np.linspace(0.0, 1.0, args.bins + 1).tolist()
    hist_rows = [
        {"n": n, "bin_lo": edges[b], "bin_hi": edges[b + 1], "count": c,
         "density": c * args.bins / args.pairs}
        for n, row in zip(ns, counts.tolist(), strict=True) for b, c in enumerate(row)
    ]
    hist_method = f"gaussian-pairs-histogram-{args.sampling}"
    moment_rows = [with_closed_forms({"n": n, "method": hist_method, **s})
                   for n, s in zip(ns, hist_stats, strict=True)]
    moment_rows += [with_closed_forms(r) for r in large]
    write_csv(out / "dimension_curse_histograms.csv", hist_rows)
    write_csv(out / "dimension_curse_moments.csv", moment_rows)
    png = plot(out / "dimension_curse.png", ns, counts, args.pairs, large, seconds, args.sampling)

    worst = max(moment_rows, key=lambda r: abs(r["z_cos2"]))
    summary = {
        "histogram_seconds": seconds,
        "large_n_seconds": large_seconds,
        "pairs_per_n": args.pairs,
        "sampling": args.sampling,
        "threads": threads,
        "n_range": [ns[0], ns[-1]],
        "total_pairs": args.pairs * len(ns),
        "max_abs_z_cos2": abs(worst["z_cos2"]),
        "mean_abs_cos_at_n_max": next(r["mean_abs_cos"] for r in reversed(moment_rows)),
        "png": str(png),
    }
    print(f"dimension-curse: {summary['total_pairs']:,} pairs (n = {ns[0]}..{ns[-1]}, "
          f"{args.pairs:,} per n, {args.sampling}) sampled and binned in {seconds:.2f} s "
          f"({threads} thread{'s' if threads > 1 else ''}); "
          f"second panel (n up to {grid[-1]:,}) in {large_seconds:.2f} s")
    print(f"  E[cos²] vs 1/n: largest deviation {abs(worst['z_cos2']):.2f} standard errors "
          f"(n = {worst['n']}, {worst['method']})")
    print(f"  E|cos| at n = {grid[-1]:,}: {summary['mean_abs_cos_at_n_max']:.3g} "
          f"(exact {exact_mean_abs_cos(grid[-1]):.3g})")
    print(f"  wrote {png} and CSVs in {out}")
    return summary
