"""How good is a gradient estimate? Cosine to the exact gradient and variance, measured vs theory.

For every random-direction estimator registered in :data:`forwardonly.estimators.ESTIMATORS`
(those whose constructor takes ``directions``: fg-w, fg-sign, zo, zo-sign, and activity /
local variants when present; ``bp`` is the reference), on an MLP and one batch of real data:
build the estimator with seed s, zero every ``.grad``, call ``est.step(x, y)``, read the
estimate g from ``.grad`` and compare it with the exact gradient ∇ = ∇L (autograd, same
batch, same weights). Over R seeds:

- ``cos`` = <g, ∇> / (‖g‖ ‖∇‖), mean and standard error;
- scale α = mean <g, ∇> / ‖∇‖² (E[g] = α∇ for all the estimators here: α = 1 when unbiased);
- normalized second moment  E‖g‖² / ‖E g‖², estimated as mean‖g‖² / (α²‖∇‖²);
- relative variance  tr Cov(g) / ‖E g‖², estimated as (sample tr Cov) / (α²‖∇‖²).

Theory (n = number of parameters, K directions, Gaussian directions v_k ~ N(0, Iₙ); write
u = ∇/‖∇‖, d_k = u·v_k ~ N(0, 1) and v_k = d_k u + w_k with w_k ~ N(0, I_{n-1}) ⊥ u,
independent of d_k):

*Full estimate* (fg-w; zo as ε → 0), g ∝ Σ_k d_k v_k = A u + Σ_k d_k w_k with A = Σ d_k² ~ χ²_K.
Given d, Σ d_k w_k ~ N(0, A I_{n-1}), so ‖Σ d_k w_k‖² = A χ²_{n-1} and::

    cos² = A / (A + χ²_{n-1}) ~ Beta(K/2, (n-1)/2),   E cos² = K / (n+K-1)
    E cos = Γ((K+1)/2) Γ((n+K-1)/2) / (Γ(K/2) Γ((n+K)/2))
          ≈ sqrt(K/n) for 1 ≪ K ≪ n;  = E|cos| ≈ sqrt(2/(πn)) at K = 1
    E‖g‖²/‖E g‖² = (n+K+1)/K   (n+2 at K=1: E‖g‖² = (n+2)‖∇‖², Baydin et al.; Ren et al. Tab. 1)
    tr Cov(g)/‖E g‖² = (n+1)/K

At K = 1 the cosine is |cos| between a random direction and ∇ — the dimension-curse
experiment's quantity.

*Sign estimate* (fg-sign; zo-sign as ε → 0), g ∝ Σ_k sign(d_k) v_k = S u + Σ_k sign(d_k) w_k
with S = Σ|d_k|; the second term is N(0, K I_{n-1}) whatever the signs, so::

    cos = S / sqrt(S² + K χ²_{n-1})     (evaluated from this exact scalar representation by
                                          Monte Carlo: S and χ² are scalars, no n-vectors)
    E‖g‖²/‖E g‖² = πn/(2K) + (K-1)/K,    tr Cov(g)/‖E g‖² = (πn/2 - 1)/K

The lines assume Gaussian directions (the estimators' default); rademacher / rank-one
directions give slightly lower variance (‖v‖² = n exactly). Activity perturbation (fg-a) and
local losses have no line here: their estimate targets other quantities.

Run: ``forwardonly experiment estimator-quality --out results/estimator-quality``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forwardonly.autodiff import LossFn
from forwardonly.estimators import ESTIMATORS, Estimator, make_estimator
from forwardonly.experiments import torch_threads, write_csv
from forwardonly.seeding import mix_seed

# Which theory line applies to which estimator (see the module docstring).
THEORY: dict[str, str] = {"fg-w": "gaussian", "zo": "gaussian", "fg-sign": "sign",
                          "zo-sign": "sign"}
REFERENCE = "bp"


# -- theory ------------------------------------------------------------------------------------
def theory_cosine(n: int | float, k: int, kind: str = "gaussian", *, samples: int = 200_000,
                  seed: int = 0) -> float:
    """Expected cosine between the K-direction estimate and ∇ in dimension n (Gaussian v).

    ``kind="gaussian"``: closed form E sqrt(Beta(K/2, (n-1)/2)). ``kind="sign"``: Monte
    Carlo over the exact scalar representation S / sqrt(S² + K χ²_{n-1}) (``samples`` draws).
    """
    if n < 2 or k < 1:
        raise ValueError(f"need n >= 2 and k >= 1, got n={n}, k={k}")
    if kind == "gaussian":
        return math.exp(math.lgamma((k + 1) / 2) + math.lgamma((n + k - 1) / 2)
                        - math.lgamma(k / 2) - math.lgamma((n + k) / 2))
    if kind == "sign":
        s = _sign_sums(k, samples, seed)  # (samples,)
        rng = np.random.default_rng(mix_seed(seed, int(n)))
        chi = rng.chisquare(n - 1, size=samples)  # (samples,) χ²_{n-1}
        return float(np.mean(s / np.sqrt(s * s + k * chi)))
    raise ValueError(f"kind must be 'gaussian' or 'sign', got {kind!r}")


@functools.lru_cache(maxsize=64)
def _sign_sums(k: int, samples: int, seed: int) -> np.ndarray:
    # S = Σ_k |N(0,1)| depends on K only, so it is drawn once per K.
    rng = np.random.default_rng(mix_seed(seed, k, 0x51))
    sums: np.ndarray = np.abs(rng.standard_normal((samples, k))).sum(1)  # (samples,)
    return sums


def theory_second_moment(n: int | float, k: int, kind: str = "gaussian") -> float:
    """E‖g‖² / ‖E g‖² for K Gaussian directions: (n+K+1)/K, or πn/(2K) + (K-1)/K for signs."""
    if kind == "gaussian":
        return (n + k + 1) / k
    if kind == "sign":
        return math.pi * n / (2 * k) + (k - 1) / k
    raise ValueError(f"kind must be 'gaussian' or 'sign', got {kind!r}")


def theory_relative_variance(n: int | float, k: int, kind: str = "gaussian") -> float:
    """tr Cov(g) / ‖E g‖²: (n+1)/K for the full estimate, (πn/2 - 1)/K for signs."""
    return theory_second_moment(n, k, kind) - 1.0


# -- measurement -------------------------------------------------------------------------------
def flat_grad(model: nn.Module) -> Tensor:
    """``.grad`` of every trainable parameter, concatenated, shape ``(P,)`` (None counts as 0)."""
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
             for p in model.parameters() if p.requires_grad]
    return torch.cat(parts).detach().clone()


def exact_gradient(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> Tensor:
    """∇L by reverse-mode autograd, flattened ``(P,)``; leaves ``.grad`` cleared."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)]).detach()


def estimate_gradient(est: Estimator, inputs: Tensor, targets: Tensor) -> Tensor:
    """One step of ``est`` on zeroed gradients; the estimate it wrote into ``.grad``, ``(P,)``."""
    for p in est.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    est.step(inputs, targets)
    return flat_grad(est.model)


def quality_from_sums(dots: Sequence[float], sq_norms: Sequence[float], mean: Tensor,
                      exact: Tensor) -> dict[str, float]:
    """Quality numbers from per-repeat <g_r, ∇>, ‖g_r‖², the mean estimate ḡ and ∇.

    See the module docstring for the definitions. ``cos_se`` is std/sqrt(R); the variance
    uses the unbiased sample trace ``(Σ‖g_r‖² − R‖ḡ‖²) / (R − 1)``.
    """
    r = len(dots)
    if r != len(sq_norms) or r < 1:
        raise ValueError(f"need the same number (>= 1) of dots and norms, got {r} and "
                         f"{len(sq_norms)}")
    dots_ = np.asarray(dots, dtype=np.float64)
    sq = np.asarray(sq_norms, dtype=np.float64)
    e2 = float(exact.double().square().sum())
    if e2 == 0.0:
        raise ValueError("the exact gradient is zero on this batch: cosine and scale are "
                         "undefined; use another batch or initialization")
    cos = dots_ / np.sqrt(np.maximum(sq, 1e-300) * e2)
    alpha = float(dots_.mean() / e2)
    m2 = float(sq.mean())
    tr_cov = (float(sq.sum()) - r * float(mean.double().square().sum())) / (r - 1) if r > 1 \
        else math.nan
    scale2 = alpha * alpha * e2
    return {
        "repeats": r,
        "cos_mean": float(cos.mean()),
        "cos_se": float(cos.std(ddof=1) / math.sqrt(r)) if r > 1 else math.nan,
        "scale": alpha,
        "second_moment_ratio": m2 / e2,
        "normalized_second_moment": m2 / scale2 if scale2 > 0 else math.nan,
        "relative_variance": tr_cov / scale2 if scale2 > 0 else math.nan,
        "grad_norm": math.sqrt(e2),
    }


def gradient_quality(estimates: Tensor, exact: Tensor) -> dict[str, float]:
    """Quality numbers of estimates ``(R, P)`` against the exact gradient ``(P,)``."""
    if estimates.dim() != 2 or estimates.shape[1] != exact.numel():
        raise ValueError(f"estimates must be (R, P) with P = {exact.numel()}, got "
                         f"{tuple(estimates.shape)}")
    est = estimates.double()
    return quality_from_sums((est @ exact.double()).tolist(), est.square().sum(1).tolist(),
                             est.mean(0), exact)


def measure(build: Callable[[int], Estimator], inputs: Tensor, targets: Tensor,
            seeds: Sequence[int], exact: Tensor) -> dict[str, float]:
    """Quality of the estimator ``build(seed)`` over ``seeds`` (one step each), streaming.

    Never holds more than two P-vectors (the running sum and the current estimate).
    """
    dots: list[float] = []
    sq: list[float] = []
    total = torch.zeros_like(exact, dtype=torch.float64)
    ex = exact.double()
    for s in seeds:
        g = estimate_gradient(build(s), inputs, targets).double()  # (P,)
        if g.numel() != ex.numel():
            raise ValueError(f"the estimate has {g.numel()} entries but the exact gradient "
                             f"{ex.numel()}; both must cover the same trainable parameters")
        dots.append(float(g @ ex))
        sq.append(float(g @ g))
        total += g
    return quality_from_sums(dots, sq, total / len(seeds), exact)


def estimator_options(name: str, directions: int, seed: int) -> dict[str, Any]:
    """``directions`` and ``seed`` for estimator ``name``, as far as its ``__init__`` takes them.

    Raises ``ValueError`` if it takes no ``directions``: it is not a random-direction estimator.
    """
    accepted = inspect.signature(ESTIMATORS[name].__init__).parameters
    if "directions" not in accepted:
        raise ValueError(f"estimator {name!r} takes no 'directions' option: it is not a "
                         "random-direction gradient estimator")
    opts: dict[str, Any] = {"directions": directions}
    if "seed" in accepted:
        opts["seed"] = seed
    return opts


def gradient_methods(names: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The estimators to measure, and a note for each registered one that is left out."""
    notes: dict[str, str] = {}
    chosen: list[str] = []
    for name in (names if names is not None else sorted(ESTIMATORS)):
        if name not in ESTIMATORS:
            valid = ", ".join(repr(n) for n in sorted(ESTIMATORS))
            raise ValueError(f"method must be one of {valid}, got {name!r}")
        if name == REFERENCE:
            notes[name] = "the exact gradient: the reference, not measured"
            continue
        try:
            estimator_options(name, 1, 0)
        except ValueError as exc:
            notes[name] = str(exc)
            continue
        chosen.append(name)
    return chosen, notes


# -- the model and the batch -------------------------------------------------------------------
def mlp_for(width: int, in_shape: tuple[int, ...], classes: int, seed: int) -> nn.Module:
    """``mlp`` with one hidden layer of ``width`` units, initialized from ``seed``."""
    import forwardonly.models.mlp  # noqa: F401  (registers "mlp")
    from forwardonly.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("mlp", in_shape, classes, widths=(width,))


def load_batch(dataset: str, data_dir: str | None, batch_size: int, seed: int
               ) -> tuple[Tensor, Tensor, tuple[int, ...], int]:
    """A random training batch ``(B, C, H, W)``, labels ``(B,)``, the input shape and classes."""
    from forwardonly.data import load_dataset

    ds = load_dataset(dataset, data_dir)
    gen = torch.Generator().manual_seed(mix_seed(seed, 0xBA7C))
    idx = torch.randperm(ds.train_x.shape[0], generator=gen)[:batch_size]
    return ds.train_x[idx], ds.train_y[idx], tuple(ds.train_x.shape[1:]), ds.classes


# -- plot --------------------------------------------------------------------------------------
def plot(path: Path, rows: list[dict[str, Any]], title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    methods = sorted({r["method"] for r in rows})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    # Distinct hollow markers: at K = 1 fg-w and fg-sign have the same cosine, point by point.
    markers = {m: "osD^v<>phX"[i % 10] for i, m in enumerate(methods)}
    for col, (sweep, xkey, xlabel) in enumerate((
            ("width", "parameters", "parameters n (width sweep)"),
            ("directions", "directions", "directions K"))):
        part = [r for r in rows if r["sweep"] == sweep]
        if not part:
            continue
        fixed = (f"K = {part[0]['directions']}" if sweep == "width"
                 else f"n = {part[0]['parameters']:,}")
        for m in methods:
            mr = sorted((r for r in part if r["method"] == m), key=lambda r: r[xkey])
            if not mr:
                continue
            xs = [r[xkey] for r in mr]
            style = {"color": colors[m], "marker": markers[m], "ms": 6, "mfc": "none",
                     "ls": "none"}
            axes[0, col].errorbar(xs, [r["cos_mean"] for r in mr],
                                  yerr=[r["cos_se"] for r in mr], capsize=2, label=m, **style)
            axes[1, col].plot(xs, [r["normalized_second_moment"] for r in mr], label=m, **style)
        for kind, ls in (("gaussian", "--"), ("sign", ":")):
            tr = sorted({r[xkey]: r for r in part if r["theory"] == kind}.values(),
                        key=lambda r: r[xkey])
            if not tr:
                continue
            xs = [r[xkey] for r in tr]
            who = "fg-w, zo" if kind == "gaussian" else "fg-sign, zo-sign"
            axes[0, col].plot(xs, [r["cos_theory"] for r in tr], color="black", ls=ls, lw=1,
                              label=f"theory, {kind} ({who})")
            axes[1, col].plot(xs, [r["second_moment_theory"] for r in tr], color="black",
                              ls=ls, lw=1, label=f"theory, {kind} ({who})")
        axes[0, col].set_title(f"cosine(estimate, exact gradient), {fixed}", fontsize=10)
        axes[1, col].set_title(f"E‖g‖² / ‖E g‖², {fixed}; theory (n+K+1)/K (n+2 at K=1), "
                               "signs πn/(2K) + (K-1)/K", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xscale("log", base=10 if sweep == "width" else 2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.grid(True, which="major", alpha=0.3)
        axes[0, col].legend(fontsize=7.5)
    axes[0, 0].set_ylabel("mean cosine (± s.e.)")
    axes[1, 0].set_ylabel("normalized second moment")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


# -- command -----------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive comma-separated integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/estimator-quality"),
                        help="folder for estimator_quality.png and estimator_quality.csv")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the batch, the weights and the estimators' seeds")
    parser.add_argument("--dataset", default="digits", help="data set of the batch")
    parser.add_argument("--data-dir", default=None,
                        help="data directory (not needed for digits)")
    parser.add_argument("--batch-size", type=int, default=256, help="examples in the batch")
    parser.add_argument("--methods", default=None,
                        help="comma-separated estimators (default: every registered "
                        "random-direction estimator)")
    parser.add_argument("--widths", default="13,40,133,400,1333,4000,13333",
                        help="hidden widths of the one-hidden-layer MLP for the width sweep "
                        "(digits: about 1e3..1e6 parameters)")
    parser.add_argument("--width-directions", type=int, default=1,
                        help="K used in the width sweep")
    parser.add_argument("--directions", default="1,2,4,8,16,32,64",
                        help="K values of the directions sweep")
    parser.add_argument("--directions-width", type=int, default=133,
                        help="hidden width used in the directions sweep")
    parser.add_argument("--repeats", type=int, default=64,
                        help="R: estimates (different seeds) per point")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while measuring")


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    if args.repeats < 2:
        raise ValueError(f"--repeats must be at least 2 to estimate a variance, got "
                         f"{args.repeats}")
    names = None if args.methods is None else [m.strip() for m in args.methods.split(",")
                                               if m.strip()]
    methods, notes = gradient_methods(names)
    x, y, in_shape, classes = load_batch(args.dataset, args.data_dir, args.batch_size, args.seed)
    loss_fn = F.cross_entropy
    seeds = [mix_seed(args.seed, 0xE57, r) for r in range(args.repeats)]
    points = [("width", w, args.width_directions) for w in _ints(args.widths)]
    points += [("directions", args.directions_width, k) for k in _ints(args.directions)]

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with torch_threads(args.threads):
        for sweep, width, k in points:
            model = mlp_for(width, in_shape, classes, args.seed)
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            exact = exact_gradient(model, loss_fn, x, y)
            for name in list(methods):
                t1 = time.perf_counter()

                def build(s: int, name: str = name, k: int = k, model: nn.Module = model
                          ) -> Estimator:
                    return make_estimator(name, model, loss_fn, **estimator_options(name, k, s))

                try:
                    q = measure(build, x, y, seeds, exact)
                except Exception as exc:  # noqa: BLE001  one estimator's failure is a note
                    notes[name] = f"failed on the mlp: {type(exc).__name__}: {exc}"
                    methods.remove(name)
                    continue
                kind = THEORY.get(name, "")
                rows.append({
                    "sweep": sweep, "method": name, "width": width, "parameters": n,
                    "directions": k, **q,
                    "theory": kind,
                    "cos_theory": theory_cosine(n, k, kind) if kind else math.nan,
                    "second_moment_theory": theory_second_moment(n, k, kind) if kind
                    else math.nan,
                    "relative_variance_theory": theory_relative_variance(n, k, kind) if kind
                    else math.nan,
                    "seconds": time.perf_counter() - t1,
                })
    seconds = time.perf_counter() - t0
    if not rows:
        raise RuntimeError(f"no estimator could be measured; notes: {notes}")
    write_csv(out / "estimator_quality.csv", rows)
    title = (f"gradient estimates vs the exact gradient: one {args.dataset} batch of "
             f"{args.batch_size}, MLP with one hidden layer, {args.repeats} seeds per point")
    png = plot(out / "estimator_quality.png", rows, title)

    print(f"estimator-quality: {len(rows)} points ({', '.join(methods)}) in {seconds:.1f} s")
    for name, note in notes.items():
        print(f"  skipped {name}: {note}")
    for r in rows:
        if r["sweep"] == "width" and r["width"] in (min(_ints(args.widths)),
                                                    max(_ints(args.widths))):
            th = f" (theory {r['cos_theory']:.3g})" if r["theory"] else ""
            print(f"  {r['method']:>8} n={r['parameters']:>9,} K={r['directions']}: cos "
                  f"{r['cos_mean']:.3g} ± {r['cos_se']:.2g}{th}, E‖g‖²/‖Eg‖² "
                  f"{r['normalized_second_moment']:.3g}")
    print(f"  wrote {png} and estimator_quality.csv in {out}")
    return {"seconds": seconds, "methods": methods, "skipped": notes, "points": len(rows),
            "png": str(png)}
