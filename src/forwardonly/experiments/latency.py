"""Latency of one training step, backprop vs forward gradient: per-stage costs as schedules.

A deep MLP is split into S stages — think of one "parameter server" per stage, each holding its
own layers. One training step then looks like this:

- **Backprop.** Forward through stages 1..S in sequence (stage S also computes the loss), then
  backward through stages S..1 in reverse; stage i can update its weights as soon as its own
  backward is done, while stage i-1 is still in its backward. Critical path::

      T_bp = Σᵢ fᵢ + max_i ( Σ_{j ≥ i} bⱼ + uᵢ )

- **Forward gradient** (weight perturbation, Baydin et al. 2022). Every stage draws its
  direction vᵢ (from a shared seed) and runs its forward pass carrying tangents (a JVP), in
  sequence; the last stage's tangent output is the scalar d = ∇L·v. Once d is known (after an
  optional broadcast delay c), every stage updates θᵢ -= lr · d · vᵢ at the same time::

      T_fg = Σᵢ jᵢ + c + maxᵢ uᵢ

What the measurement shows (on a CPU): the parallel updates save little, because an SGD update is
cheap next to the passes; the critical path is set by the JVP, which costs a forward pass for the
primal, another for the input tangent ``ẋ Wᵀ`` and — with dense directions — a third for
``x Ẇᵀ`` plus drawing n random numbers. Rank-one directions make the last term an outer product.

This module measures the per-stage costs fᵢ, bᵢ, uᵢ (backprop) and jᵢ, uᵢ (forward gradient)
**in a single process** — stage by stage, median over repeats, one thread by default so that
each stage stands for one core — and composes them into the two schedules with pure
functions (:func:`backprop_schedule`, :func:`forward_gradient_schedule`). It is a faithful
composition of measured costs, not a run on separate processes: communication between stages
(activations, and d) is not measured and is set by ``--broadcast-ms`` for the scalar only.

Run: ``forwardonly experiment latency --out results/latency``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forwardonly.autodiff import (
    SEEDED_DISTRIBUTIONS,
    DirectionSampler,
    Factored,
    LowRank,
    Rank1,
    loss_and_derivatives,
    run_layers,
    sequential_layers,
)
from forwardonly.experiments import torch_threads, write_csv
from forwardonly.seeding import mix_seed

LABEL = "single-process measurement composed into schedules"
PHASE_COLORS = {"forward": "tab:blue", "backward": "tab:red", "update": "tab:green",
                "jvp": "tab:purple"}


# -- schedules (pure) --------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """One bar of a Gantt chart: ``phase`` of ``stage`` (0-based) from ``start`` to ``end``."""

    stage: int
    phase: str  # "forward" | "backward" | "update" | "jvp"
    start: float
    end: float


def _check_costs(name: str, costs: Sequence[float], stages: int) -> None:
    if len(costs) != stages:
        raise ValueError(f"{name} has {len(costs)} costs but there are {stages} stages; "
                         "give one cost per stage")
    if any(c < 0 for c in costs):
        raise ValueError(f"{name} costs must be non-negative, got {list(costs)}")


def backprop_schedule(forward: Sequence[float], backward: Sequence[float],
                      update: Sequence[float]) -> list[Interval]:
    """Backprop step: forwards in order, backwards in reverse, each update after its backward."""
    s = len(forward)
    if s == 0:
        raise ValueError("need at least one stage")
    _check_costs("backward", backward, s)
    _check_costs("update", update, s)
    _check_costs("forward", forward, s)
    out: list[Interval] = []
    t = 0.0
    for i in range(s):
        out.append(Interval(i, "forward", t, t + forward[i]))
        t += forward[i]
    for i in reversed(range(s)):
        out.append(Interval(i, "backward", t, t + backward[i]))
        t += backward[i]
        out.append(Interval(i, "update", t, t + update[i]))  # overlaps stage i-1's backward
    return out


def forward_gradient_schedule(jvp_costs: Sequence[float], update: Sequence[float],
                              broadcast: float = 0.0) -> list[Interval]:
    """Forward-gradient step: JVPs in order; all updates start together once d is known."""
    s = len(jvp_costs)
    if s == 0:
        raise ValueError("need at least one stage")
    _check_costs("jvp", jvp_costs, s)
    _check_costs("update", update, s)
    if broadcast < 0:
        raise ValueError(f"broadcast delay must be non-negative, got {broadcast}")
    out: list[Interval] = []
    t = 0.0
    for i in range(s):
        out.append(Interval(i, "jvp", t, t + jvp_costs[i]))
        t += jvp_costs[i]
    t += broadcast  # the scalar d travels to every stage
    out += [Interval(i, "update", t, t + update[i]) for i in range(s)]
    return out


def makespan(intervals: Sequence[Interval]) -> float:
    """Length of the critical path: the end of the last interval."""
    return max(iv.end for iv in intervals)


# -- the model, split into stages --------------------------------------------------------------
def build_stages(depth: int, width: int, stages: int, *, in_features: int, classes: int,
                 seed: int = 0) -> list[nn.Sequential]:
    """An MLP ``in → (Linear(width) → ReLU) × depth → Linear(classes)`` cut into ``stages``.

    The ``depth + 1`` linear layers are shared out as evenly as possible (earlier stages get
    the extra layers); each stage is a flat ``nn.Sequential`` of ``Linear`` and ``ReLU``.
    """
    if not 1 <= stages <= depth + 1:
        raise ValueError(f"stages must be between 1 and depth + 1 = {depth + 1}, got {stages}")
    layers: list[list[nn.Module]] = []  # one [Linear, ReLU] (or [Linear] for the head) each
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
        torch.manual_seed(seed)
        fan_in = in_features
        for _ in range(depth):
            layers.append([nn.Linear(fan_in, width), nn.ReLU()])
            fan_in = width
        layers.append([nn.Linear(fan_in, classes)])
    per, extra = divmod(len(layers), stages)
    out: list[nn.Sequential] = []
    k = 0
    for i in range(stages):
        n = per + (1 if i < extra else 0)
        out.append(nn.Sequential(*(m for layer in layers[k : k + n] for m in layer)))
        k += n
    return out


# -- measurement -------------------------------------------------------------------------------
def _now() -> float:
    return time.perf_counter()


def time_backprop_step(stages: Sequence[nn.Module], x: Tensor, y: Tensor, lr: float
                       ) -> dict[str, list[float]]:
    """One backprop SGD step, stage by stage; seconds per stage for forward, backward, update.

    Stage boundaries are cut with ``detach`` so each stage's backward runs on its own; the last
    stage's forward includes the cross-entropy loss.
    """
    s = len(stages)
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    fwd, bwd, upd = [0.0] * s, [0.0] * s, [0.0] * s
    h = x
    for i, stage in enumerate(stages):
        t0 = _now()
        h_in = h.detach().requires_grad_(i > 0)
        out = stage(h_in)
        if i == s - 1:
            out = F.cross_entropy(out, y)
        fwd[i] = _now() - t0
        inputs.append(h_in)
        outputs.append(out)
        h = out
    grad: Tensor | None = None
    for i in reversed(range(s)):
        t0 = _now()
        torch.autograd.backward(outputs[i], grad_tensors=grad)
        grad = inputs[i].grad
        bwd[i] = _now() - t0
        t0 = _now()
        with torch.no_grad():
            for p in stages[i].parameters():
                assert p.grad is not None  # every parameter is in the graph just run
                p.add_(p.grad, alpha=-lr)
                p.grad = None
        upd[i] = _now() - t0
    return {"forward": fwd, "backward": bwd, "update": upd}


def stage_jvp(stage: nn.Module, h: Tensor, h_dot: Tensor | None, sampler: DirectionSampler,
              first_index: int) -> tuple[Tensor, Tensor | None, list[Tensor | Factored]]:
    """Forward pass of one stage carrying the tangent of one weight direction.

    The rules of :mod:`forwardonly.autodiff.rules`: ``y = x Wᵀ + b`` gives
    ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ`` — with a rank-one ``Ẇ = b aᵀ`` the middle term is the outer
    product ``(x a) bᵀ`` instead of a matmul; ``ReLU`` gives ``ẏ = ẋ ⊙ [x > 0]``. Parameter j
    of the stage takes direction ``first_index + j`` of ``sampler``, so any stage can redraw
    its own directions from the step's seed.

    Returns ``(h, h_dot, directions)``: output ``(B, q)``, its tangent ``(B, q)`` and the
    directions of the stage's parameters (``(1, *shape)`` tensors or :class:`Rank1` factors).
    """
    dirs: list[Tensor | Factored] = []

    def tangent(p: nn.Parameter) -> Tensor | Factored:
        index = first_index + len(dirs)
        dirs.append(sampler.factors(index, p, 1) if sampler.is_factored(p.shape)
                    else sampler.dense(index, p, 1))
        return dirs[-1]

    layers = sequential_layers(stage) or [("0", stage)]
    tx = None if h_dot is None else h_dot.unsqueeze(0).clone()  # (1, B, p), ours to overwrite
    h, tx = run_layers(layers, h, tx, tangent, 1)
    return h, None if tx is None else tx[0], dirs


def time_forward_gradient_step(stages: Sequence[nn.Module], x: Tensor, y: Tensor, lr: float,
                               *, seed: int, distribution: str = "gaussian"
                               ) -> dict[str, list[float]]:
    """One forward-gradient SGD step, stage by stage; seconds per stage for JVP and update.

    Stage i draws its directions vᵢ (``distribution`` as in :mod:`forwardonly.autodiff.directions`)
    and runs :func:`stage_jvp` — the draw is part of jᵢ. The last stage's JVP includes the
    cross-entropy loss, whose tangent (``torch.func.jvp``) is the scalar d = ∇L·v. The
    update θᵢ -= lr·d·vᵢ uses the directions the stage kept from its JVP.
    """
    s = len(stages)
    jv, upd = [0.0] * s, [0.0] * s
    sampler = DirectionSampler(distribution, seed)
    directions: list[list[Tensor | Factored]] = []
    h, h_dot = x, None
    index = 0
    with torch.no_grad():
        for i, stage in enumerate(stages):
            t0 = _now()
            h, h_dot, dirs = stage_jvp(stage, h, h_dot, sampler, index)
            if i == s - 1:
                tx = None if h_dot is None else h_dot.unsqueeze(0)
                h, h_dot = loss_and_derivatives(F.cross_entropy, h, tx, y, 1)
            jv[i] = _now() - t0
            index += len(dirs)
            directions.append(dirs)
        assert h_dot is not None  # the last stage's loss derivative (there is a stage)
        d = float(h_dot[0])  # the scalar every stage waits for
        coeff = torch.tensor([d])
        for i, stage in enumerate(stages):
            t0 = _now()
            for p, v in zip(stage.parameters(), directions[i], strict=True):
                step = v.combine(coeff) if isinstance(v, Rank1 | LowRank) else v.reshape(p.shape)
                p.add_(step, alpha=-lr * (1.0 if isinstance(v, Rank1 | LowRank) else d))
            upd[i] = _now() - t0
    return {"jvp": jv, "update": upd}


def measure_costs(stages: Sequence[nn.Module], x: Tensor, y: Tensor, *, repeats: int,
                  warmup: int, distributions: Sequence[str] = ("gaussian",), lr: float = 1e-3,
                  seed: int = 0
                  ) -> tuple[dict[str, dict[str, list[float]]],
                             dict[str, list[dict[str, list[float]]]]]:
    """Per-stage, per-phase median seconds over ``repeats`` steps of each method.

    Methods are ``"bp"`` (phases forward, backward, update) and ``"fg-<distribution>"`` for
    each direction distribution (phases jvp, update). Returns ``(medians, raw)`` with
    ``medians[method][phase]`` a list over stages and ``raw[method]`` every repeat's timings.
    The methods take turns step by step so slow drifts of a shared machine hit all alike.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    methods = ["bp", *(f"fg-{d}" for d in distributions)]
    raw: dict[str, list[dict[str, list[float]]]] = {m: [] for m in methods}
    for r in range(warmup + repeats):
        timings = {"bp": time_backprop_step(stages, x, y, lr)}
        for dist in distributions:
            timings[f"fg-{dist}"] = time_forward_gradient_step(
                stages, x, y, lr, seed=mix_seed(seed, r), distribution=dist)
        if r >= warmup:
            for m in methods:
                raw[m].append(timings[m])
    medians = {
        m: {phase: [statistics.median(run[phase][i] for run in runs) for i in range(len(stages))]
            for phase in runs[0]}
        for m, runs in raw.items()
    }
    return medians, raw


# -- plot --------------------------------------------------------------------------------------
def plot(path: Path, schedules: dict[str, list[Interval]], stages: int, title: str) -> Path:
    """One Gantt chart per schedule (first one is the reference of the ratios), shared time axis."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(schedules)
    totals = {n: makespan(schedules[n]) * 1e3 for n in names}
    ref = totals[names[0]]
    fig = Figure(figsize=(11, 1.2 + len(names) * (0.5 + 0.3 * stages)), layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        for iv in schedules[name]:
            y0 = stages - 1 - iv.stage
            # Updates are drawn thinner, so overlapping backward/update bars stay readable.
            h, off = (0.35, 0.05) if iv.phase == "update" else (0.7, 0.15)
            ax.broken_barh([(iv.start * 1e3, (iv.end - iv.start) * 1e3)], (y0 + off, h),
                           facecolors=PHASE_COLORS[iv.phase], edgecolor="black", linewidth=0.3)
        total = totals[name]
        ax.axvline(total, color="black", ls="--", lw=1)
        ax.set_yticks([stages - 1 - i + 0.5 for i in range(stages)],
                      [f"stage {i + 1}" for i in range(stages)], fontsize=7)
        ax.set_ylim(0, stages)
        ratio = "" if name == names[0] else f"  ({names[0]} / this = {ref / total:.2f}×)"
        ax.set_title(f"{name}: critical path {total:.1f} ms{ratio}", fontsize=9, loc="left")
    axes[0].set_xlim(0, max(totals.values()) * 1.05)
    axes[-1].set_xlabel("time within one training step (ms)")
    handles = [Patch(color=c, label=p) for p, c in PHASE_COLORS.items()]
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncol=4)
    fig.suptitle(f"{title}\n({LABEL})", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


# -- command -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/latency"),
                        help="folder for latency.png and the CSV files")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data, directions")
    parser.add_argument("--depth", type=int, default=16, help="hidden layers of the MLP")
    parser.add_argument("--width", type=int, default=1024, help="width of every hidden layer")
    parser.add_argument("--stages", type=int, default=8,
                        help="stages (one parameter server each) the layers are split into")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument("--in-features", type=int, default=784,
                        help="input size (784 = a flattened 28x28 image)")
    parser.add_argument("--classes", type=int, default=10, help="outputs of the last layer")
    parser.add_argument("--distributions", default="gaussian,rank1",
                        help="comma-separated direction distributions of the forward-gradient "
                        "schedules: gaussian, rademacher, rank1 (rank-one weight directions "
                        "make the weight tangent an outer product instead of a matmul)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="measured steps per method (median per stage and phase)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while measuring (1: each stage stands for one core)")
    parser.add_argument("--broadcast-ms", type=float, default=0.0,
                        help="delay for the scalar d to reach every stage (not measured here)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    dists = [d.strip() for d in str(args.distributions).split(",") if d.strip()]
    for d in dists:
        # a clear error for an unknown name before measuring
        DirectionSampler(d, 0, valid=SEEDED_DISTRIBUTIONS)
    stages = build_stages(args.depth, args.width, args.stages, in_features=args.in_features,
                          classes=args.classes, seed=args.seed)
    gen = torch.Generator().manual_seed(mix_seed(args.seed, 7))
    x = torch.randn(args.batch_size, args.in_features, generator=gen)  # (B, in)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=gen)  # (B,)
    with torch_threads(args.threads):
        costs, raw = measure_costs(stages, x, y, repeats=args.repeats, warmup=args.warmup,
                                   distributions=dists, seed=args.seed)
    schedules = {"backprop": backprop_schedule(costs["bp"]["forward"], costs["bp"]["backward"],
                                               costs["bp"]["update"])}
    for d in dists:
        schedules[f"forward gradient, {d} directions"] = forward_gradient_schedule(
            costs[f"fg-{d}"]["jvp"], costs[f"fg-{d}"]["update"],
            broadcast=args.broadcast_ms / 1e3)
    keys = dict(zip(schedules, costs, strict=True))  # schedule name -> cost key
    t_bp = makespan(schedules["backprop"])

    cost_rows = [
        {"method": name, "stage": i + 1, "phase": phase, "median_ms": med * 1e3,
         "min_ms": min(run[phase][i] for run in raw[keys[name]]) * 1e3,
         "max_ms": max(run[phase][i] for run in raw[keys[name]]) * 1e3,
         "repeats": len(raw[keys[name]])}
        for name in schedules for phase, values in costs[keys[name]].items()
        for i, med in enumerate(values)
    ]
    sched_rows = [{"method": name, "stage": iv.stage + 1, "phase": iv.phase,
                   "start_ms": iv.start * 1e3, "end_ms": iv.end * 1e3, "label": LABEL}
                  for name, ivs in schedules.items() for iv in ivs]
    write_csv(out / "latency_costs.csv", cost_rows)
    write_csv(out / "latency_schedule.csv", sched_rows)
    params = sum(p.numel() for st in stages for p in st.parameters())
    title = (f"one SGD step of an MLP ({args.depth} hidden layers × {args.width}, "
             f"{params / 1e6:.1f}M parameters, batch {args.batch_size}) split into "
             f"{args.stages} stages, {args.threads} thread(s)")
    png = plot(out / "latency.png", schedules, args.stages, title)

    summary: dict[str, Any] = {"backprop_ms": t_bp * 1e3, "parameters": params,
                               "label": LABEL, "png": str(png)}
    for key, phases in costs.items():
        for phase, values in phases.items():
            summary[f"{key}_{phase}_ms"] = sum(values) * 1e3
    print(f"latency ({LABEL}): {args.stages} stages, {params:,} parameters")
    print(f"  backprop critical path {t_bp * 1e3:.1f} ms (stage sums: forward "
          f"{summary['bp_forward_ms']:.1f}, backward {summary['bp_backward_ms']:.1f}, "
          f"update {summary['bp_update_ms']:.1f})")
    for d in dists:
        t = makespan(schedules[f"forward gradient, {d} directions"])
        summary[f"fg-{d}_ms"] = t * 1e3
        summary[f"critical_path_ratio_{d}"] = t_bp / t
        print(f"  forward gradient ({d}) critical path {t * 1e3:.1f} ms (stage sums: jvp "
              f"{summary[f'fg-{d}_jvp_ms']:.1f}, update {summary[f'fg-{d}_update_ms']:.1f}, "
              f"updates in parallel); backprop / this = {t_bp / t:.2f}")
    print(f"  wrote {png} and CSVs in {out}")
    return summary
