"""Core benchmarks on an MLP: step time and peak memory of the estimators, MNIST after a budget.

``core-step-time``: every method on its own copy of the same model, timed round-robin in one
process (method A, B, C, A, B, C, ...) with the thread count set explicitly, medians over
rounds and the spread of the ratio to backprop over rounds. Beside the library's estimators it
times the forward gradient a user would write without the library: ``torch.func.jvp`` of
``functional_call`` (``vmap`` over K directions), Gaussian directions, ``g = Σ_k d_k v_k / K``.

``core-memory``: peak resident set of a fresh process that builds the model and runs two
steps, with glibc's default allocator and with ``MALLOC_MMAP_THRESHOLD_`` lowered (freed
blocks leave the resident set, so the peak follows the live tensors); both the total and the
growth above the import-only baseline (the interpreter and torch).

``core-mnist``: test error after a fixed budget, each run through the library's loop in its
own run directory (resumed when it holds a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import add_data_dir, fit
from benchmarks.report import REPO, Results, md_table
from forwardonly import build_model, make_estimator
from forwardonly.autodiff import DirectionSampler, NoiseTable
from forwardonly.seeding import mix_seed

# label -> (method, options); "plain" labels are the torch.func baseline, not an estimator
STEP_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "bp": ("bp", {}),
    "fg-w K=1": ("fg-w", {"directions": 1}),
    "plain jvp K=1": ("plain", {"directions": 1}),
    "fg-w K=1 gaussian-table": ("fg-w", {"directions": 1, "distribution": "gaussian-table"}),
    "fg-w K=1 rademacher": ("fg-w", {"directions": 1, "distribution": "rademacher"}),
    "fg-w K=1 rank1": ("fg-w", {"directions": 1, "distribution": "rank1"}),
    "fg-w K=8": ("fg-w", {"directions": 8}),
    "fg-w K=8 redraw": ("fg-w", {"directions": 8, "keep_directions": False}),
    "fg-w K=8 gaussian-table": ("fg-w", {"directions": 8, "distribution": "gaussian-table"}),
    "plain vmap(jvp) K=8": ("plain", {"directions": 8}),
    "fg-w K=16 rank1": ("fg-w", {"directions": 16, "distribution": "rank1"}),
    "zo K=1": ("zo", {"directions": 1}),
    "forward only": ("forward", {}),
    "draw only: gaussian": ("draw", {"distribution": "gaussian"}),
    "draw only: gaussian-table": ("draw", {"distribution": "gaussian-table"}),
    "draw only: torch normal_": ("draw", {"distribution": "torch"}),
}


class PlainForwardGradient:
    """The forward gradient without the library: ``torch.func`` and Gaussian directions."""

    def __init__(self, model: torch.nn.Module, directions: int) -> None:
        self.model, self.k = model, directions

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from torch.func import functional_call, jvp, vmap

        params = {n: p.detach() for n, p in self.model.named_parameters()}

        def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(functional_call(self.model, p, (x,)), y)

        vs = {n: torch.randn(self.k, *p.shape) for n, p in params.items()}  # (K, *shape)
        if self.k == 1:
            d = jvp(loss, (params,), ({n: v[0] for n, v in vs.items()},))[1].reshape(1)
        else:
            d = vmap(lambda v: jvp(loss, (params,), (v,))[1])(vs)  # (K,)
        for n, p in self.model.named_parameters():
            p.grad = torch.tensordot(d, vs[n], dims=1) / self.k


class DrawOnly:
    """One K=1 direction for every parameter, drawn into a gradient-sized buffer: the
    library's sampler, or ``torch.Generator`` + ``normal_`` per tensor (what it used before);
    ``gaussian-table`` directions are the table's views, as fg-w uses them (no copy)."""

    def __init__(self, model: torch.nn.Module, distribution: str) -> None:
        self.params = list(model.parameters())
        self.bufs = [torch.empty_like(p) for p in self.params]
        self.distribution, self.seed = distribution, 0
        self.table = NoiseTable(0)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.seed += 1
        if self.distribution == "torch":
            for i, b in enumerate(self.bufs):
                b.normal_(generator=torch.Generator().manual_seed(mix_seed(self.seed, i)))
            return
        sampler = DirectionSampler(self.distribution, self.seed, table=self.table)
        for i, (p, b) in enumerate(zip(self.params, self.bufs, strict=True)):
            if sampler.reads_table:
                sampler.dense(i, p, 1)
            else:
                sampler.dense(i, p, 1, out=b.unsqueeze(0))


class ForwardOnly:
    """The model's forward pass on the batch, no graph: what a draw is measured against."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            self.model(x)


def step_time_verdicts(rows: list[dict[str, Any]]) -> str:
    """The targets at one thread, each met or not and by how much, from the measured rows."""
    def ratio(label: str, batch: int) -> float | None:
        return next((r["ratio_to_bp"] for r in rows if r["threads"] == 1
                     and r["batch"] == batch and r["method"] == label), None)

    lines = []
    for label, batch, bound in (("fg-w K=1", 64, 1.2), ("fg-w K=1", 1024, 0.9),
                                ("fg-w K=1 gaussian-table", 64, 1.2),
                                ("fg-w K=1 gaussian-table", 1024, 0.9),
                                ("fg-w K=1 rank1", 64, 0.8)):
        got = ratio(label, batch)
        if got is not None:
            verdict = "met" if got <= bound else f"not met, {got / bound - 1:.0%} over"
            lines.append(f"{label} at batch {batch}: {got}× bp (target ≤ {bound}×): {verdict}")
    for label in ("fg-w K=8", "fg-w K=8 gaussian-table"):
        for batch in sorted({r["batch"] for r in rows}):
            ours, plain = ratio(label, batch), ratio("plain vmap(jvp) K=8", batch)
            if ours is not None and plain is not None:
                verdict = "met" if ours <= plain else "not met"
                lines.append(f"{label} at batch {batch}: {ours}× bp against plain "
                             f"vmap(jvp)'s {plain}× (target: at least as fast): {verdict}")
    for batch in sorted({r["batch"] for r in rows}):
        forward = ratio("forward only", batch)
        for label in ("draw only: gaussian", "draw only: gaussian-table"):
            draw = ratio(label, batch)
            if forward is not None and draw is not None:
                verdict = "met" if draw <= forward else "not met"
                lines.append(f"{label.removeprefix('draw only: ')} direction at batch {batch}: "
                             f"{draw}× bp against the forward pass's {forward}× (target: no "
                             f"more than the forward pass): {verdict}")
    return "\n\nAt one thread: " + "; ".join(lines) + "." if lines else ""


def step_time(args: argparse.Namespace, res: Results) -> None:
    labels = args.methods or list(STEP_METHODS)
    if "bp" not in labels:
        raise SystemExit("--methods must include bp: every ratio is to backprop")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            torch.manual_seed(0)
            x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
            steppers = {}
            for label in labels:
                method, opts = STEP_METHODS[label]
                torch.manual_seed(0)  # every copy starts from the same weights
                model = build_model("mlp", (1, 28, 28), 10, widths=args.widths)
                steppers[label] = (PlainForwardGradient(model, opts["directions"])
                                   if method == "plain" else
                                   DrawOnly(model, opts["distribution"]) if method == "draw"
                                   else ForwardOnly(model) if method == "forward"
                                   else make_estimator(method, model, F.cross_entropy, **opts))
            steps = args.steps or max(2, 1024 // batch)
            times: dict[str, list[float]] = {label: [] for label in labels}
            for s in steppers.values():  # warm-up
                s.step(x, y)
            for _ in range(args.rounds):
                for label, s in steppers.items():
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        s.step(x, y)
                    times[label].append((time.perf_counter() - t0) / steps)
            for label, ts in times.items():
                ratios = [t / b for t, b in zip(ts, times["bp"], strict=True)]
                rows.append({"threads": threads, "batch": batch, "method": label,
                             "median_ms": round(1e3 * statistics.median(ts), 2),
                             "ratio_to_bp": round(statistics.median(ratios), 3),
                             "ratio_min": round(min(ratios), 3),
                             "ratio_max": round(max(ratios), 3),
                             "rounds": args.rounds, "steps_per_round": steps})
    arch = "-".join(map(str, [784, *args.widths, 10]))
    header = ["threads", "method", *(f"batch {b}: ms (× bp, range over rounds)"
                                     for b in args.batches)]
    table = []
    for threads in args.threads:
        for label in labels:
            cells = []
            for b in args.batches:
                r = next(r for r in rows if r["threads"] == threads and r["batch"] == b
                         and r["method"] == label)
                cells.append(f"{r['median_ms']} ({r['ratio_to_bp']}×, "
                             f"{r['ratio_min']}–{r['ratio_max']})")
            table.append([threads, label, *cells])
    text = (f"Gradient estimate only (no optimizer step), MLP {arch}, random inputs; each "
            f"method on its own copy of the model, methods interleaved round by round, median "
            f"over {args.rounds} rounds; the ratio to backprop is the median of the per-round "
            "ratios. *plain* = `torch.func.jvp` of `functional_call` (vmapped over K), the "
            "forward gradient written without the library, timed in the same rounds. fg-w "
            "keeps the K directions of a step (K=8 *redraw*: `keep_directions=False`, drawn "
            "again to form the estimate, the memory of one layer's directions). Targets "
            "(1 thread): fg-w K=1 ≤ 1.2× bp at batch 64, ≤ 0.9× at batch 1024; fg-w "
            "K=1 rank1 ≤ 0.8× at batch 64; fg-w K=8 at least as fast as plain vmap(jvp) K=8. "
            "Why dense fg-w K=1 stays near or above 1× bp at any batch: its one pass with "
            "tangents does the same large matrix products as backprop's forward and backward "
            "(per layer x Wᵀ, ẋ Wᵀ and x Ẇᵀ, against x Wᵀ, δ W and δᵀ x), and adds drawing the "
            "direction and scaling it into `.grad`; at batch 64 that draw alone is close to "
            "half of backprop's step (see *draw only*). rank1 replaces x Ẇᵀ by a matrix-vector "
            "product, about two thirds of backprop's arithmetic (its batch-1024 ratio); at "
            "batch 64 the fixed work of a forward-mode step in Python (drawing each tensor's "
            "factors and signs, the rank-one terms, the outer products written into `.grad`) "
            "adds a few percent of the step on top. "
            "*gaussian-table* rows read each direction as a view of a per-tensor noise table "
            "drawn once (Salimans et al. 2017; `--distribution gaussian-table`, table factor "
            "4: five times the K directions' memory; for one table the expected estimate is "
            "M∇L with M near I, see "
            "`forwardonly/autodiff/noise_table.py`; training quality: `core-table-quality`): "
            "the same passes without the draw; what remains above bp at batch 64 is scaling "
            "each direction into `.grad` (one more pass over the 1.86 M entries, about a "
            "tenth of the step in a profile) and the step's fixed work in Python. "
            "*forward only*: the model's forward pass on the batch without a graph. "
            "*draw only* rows: one direction for every parameter (*gaussian-table*: the "
            "table's views, as fg-w takes them: no draw at all, so its verdict against the "
            "forward pass holds by construction), the library's Gaussian "
            "(16 random bits and a table lookup per entry) against `torch.Generator` + "
            "`normal_` per tensor, its generator before.\n\n" + md_table(header, table)
            + step_time_verdicts(rows))
    res.write("step_time", rows, title=f"Step time, MLP {arch}: estimators against backprop "
              "and a plain torch.func forward gradient", text=text)


MEMORY_METHODS = ["inference", "bp", "fg-w", "fg-w rank1", "zo", "fg-w inplace",
                  "fg-w rank1 inplace", "fg-w inplace halves", "zo inplace"]
# "mmap": large blocks straight from mmap, so freed memory leaves the resident set and the
# peak tracks the live tensors; "default": glibc's own heuristics (what a user gets).
ALLOCATORS = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def _peak_kib() -> int:
    """Peak resident set (KiB): ``VmHWM`` (not inherited through exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(method: str, depth: int, width: int, batch: int) -> None:
    """In a fresh process: build, two steps; print the import-only and the peak RSS (MiB)."""
    torch.set_num_threads(1)
    base = _peak_kib()
    torch.manual_seed(0)
    model = build_model("mlp", (width,), width, widths=[width] * (depth - 1))
    x, y = torch.randn(batch, width), torch.randint(0, width, (batch,))
    for _ in range(2):
        if method == "inference":
            with torch.no_grad():
                F.cross_entropy(model(x), y)
        else:  # "<method> [distribution] [inplace] [halves]"
            name, *rest = method.split()
            dists = [r for r in rest if r not in ("inplace", "halves")]
            opts: dict[str, Any] = {"distribution": dists[0]} if dists else {}
            if "halves" in rest:  # the batch in two pieces (--micro-batch B/2)
                opts["micro_batch"] = (batch + 1) // 2
            est = make_estimator(name, model, F.cross_entropy, **opts)
            if "inplace" in rest:  # --optimizer sgd-inplace: no gradient buffer
                est.sgd_step(x, y, lr=1e-3)
            else:
                est.step(x, y)
    print(json.dumps({"import_mib": base / 1024, "peak_mib": _peak_kib() / 1024}))


def memory(args: argparse.Namespace, res: Results) -> None:
    methods = args.methods or MEMORY_METHODS
    rows = []
    for depth in args.depths:
        for method in methods:
            row: dict[str, Any] = {"depth": depth, "method": method, "params_mib": round(
                depth * (args.width * args.width + args.width) * 4 / 2**20, 1)}
            for alloc, env in ALLOCATORS.items():
                runs = []
                for _ in range(args.repeats):  # fresh processes; glibc's heap varies
                    out = subprocess.run(
                        [sys.executable, "-m", "benchmarks.core", "memory-child", method,
                         str(depth), str(args.width), str(args.batch)], cwd=REPO,
                        capture_output=True, text=True, check=True, env={**os.environ, **env})
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                above = [r["peak_mib"] - r["import_mib"] for r in runs]
                row[f"peak_mib_{alloc}"] = round(statistics.median(
                    r["peak_mib"] for r in runs), 1)
                row[f"above_import_mib_{alloc}"] = round(statistics.median(above), 1)
                row[f"above_import_range_{alloc}"] = f"{min(above):.0f}–{max(above):.0f}"
            rows.append(row)
            print(row, flush=True)
    for r in rows:
        inf = next((q for q in rows if q["depth"] == r["depth"] and q["method"] == "inference"),
                   None)
        for alloc in ALLOCATORS:
            key = f"above_import_mib_{alloc}"
            r[f"ratio_to_inference_{alloc}"] = round(r[key] / inf[key], 3) if inf else ""
    table = [[r["depth"], r["params_mib"], r["method"],
              *(f"{r[f'peak_mib_{a}']:.0f}" for a in ALLOCATORS),
              *(f"{r[f'above_import_mib_{a}']:.0f} [{r[f'above_import_range_{a}']}] "
                f"({r[f'ratio_to_inference_{a}']}×)" for a in ALLOCATORS)] for r in rows]
    header = ["depth", "params MiB", "method", "total peak, default malloc",
              "total peak, mmap malloc", "above imports, default malloc (× inference)",
              "above imports, mmap malloc (× inference)"]
    text = (f"MLP of width {args.width}, batch {args.batch}: peak RSS (MiB) of a fresh process "
            f"that builds the model and runs two steps, the median of {args.repeats} such "
            "processes (the range of *above imports* over them in brackets: glibc's default "
            "heap lands differently from one process to the next); *above imports* subtracts "
            "the peak "
            "after importing torch and forwardonly, so it is the model plus the step's working "
            "memory. *default malloc* is glibc as a user gets it; *mmap malloc* sets "
            "`MALLOC_MMAP_THRESHOLD_=131072` so freed blocks leave the resident set. *inplace* = "
            "`--optimizer sgd-inplace` (no `.grad`; fg-w draws a weight's direction block by "
            "block inside its layer's x Vᵀ, and the update redraws it block by block); "
            "*halves* = `--micro-batch` of half the batch (the same estimate, two pieces). "
            "Target: the sgd-inplace step's own memory ≤ 1.5× inference's with the default "
            "allocator.\n\n"
            + md_table(header, table))
    res.write("memory", rows, title=f"Peak memory of one training step, MLP width "
              f"{args.width}, batch {args.batch}", text=text)


MNIST_RUNS = [
    ("bp", {"method": "bp", "lr": 1e-3}),
    ("fg-w K=1", {"method": "fg-w", "directions": 1, "lr": 3e-4}),
    ("fg-w K=16 rank1", {"method": "fg-w", "directions": 16, "distribution": "rank1",
                         "lr": 3e-4}),
    ("zo K=4", {"method": "zo", "directions": 4, "lr": 3e-4}),
]


def mnist(args: argparse.Namespace, res: Results) -> None:
    from forwardonly.config import from_dict

    rows = []
    for label, opts in MNIST_RUNS:
        tag = label.replace(" ", "").replace("=", "")
        run_dir = res.run_dir(f"mnist-{tag}-lr{opts['lr']}-e{args.epochs}")
        if args.collect_only:  # what the run directory holds (possibly a partial run)
            path = run_dir / "metrics.jsonl"
            if not path.is_file():
                continue
            done = [json.loads(line) for line in path.read_text().splitlines()]
        else:  # a stopped (or finished) run continues from its checkpoint
            cfg = from_dict({"dataset": "mnist", "data_dir": args.data_dir,
                             "widths": args.widths, "batch_size": 64, "epochs": args.epochs,
                             "threads": args.threads, "progress": False, "out": str(run_dir),
                             **opts})
            done = fit(cfg, resume=(run_dir / "checkpoint.pt").is_file()).rows
        rows.append({"method": label, "lr": opts["lr"], "epochs": f"{len(done)}/{args.epochs}",
                     "test_error_pct": round(100 * done[-1]["test_error"], 2),
                     "train_error_pct": round(100 * done[-1]["train_error"], 2),
                     "seconds": round(sum(r["seconds"] for r in done), 1)})
    if not rows:
        raise SystemExit(f"no run directories under {res.dir / 'runs'}")
    arch = "-".join(map(str, [784, *args.widths, 10]))
    text = ("Each run through the library's loop (Adam, cosine schedule, batch 64). Ren et al. "
            "(2023) report FG-W at 9.25% test error (LocalMixer S/1/1).\n\n" + md_table(
                ["method", "lr", "epochs done", "test error %", "train error %", "seconds"],
                [list(r.values()) for r in rows]))
    res.write("mnist", rows, title=f"MNIST after a fixed budget (MLP {arch}, {args.epochs} "
              "epochs)", text=text)


def arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name == "core-step-time":
        p.add_argument("--rounds", type=int, default=7)
        p.add_argument("--steps", type=int, default=None,
                       help="steps per method per round (default: 1024 / batch, at least 2)")
        p.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
        p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                       help="torch thread counts, each measured separately")
        p.add_argument("--widths", type=int, nargs="+", default=[1024, 1024])
        p.add_argument("--methods", nargs="+", choices=list(STEP_METHODS), default=None)
    elif name == "core-memory":
        p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
        p.add_argument("--width", type=int, default=2048)
        p.add_argument("--batch", type=int, default=2048)
        p.add_argument("--repeats", type=int, default=3,
                       help="fresh processes per method and allocator (the median is reported)")
        p.add_argument("--methods", nargs="+", choices=MEMORY_METHODS, default=None)
    else:
        p.add_argument("--epochs", type=int, default=5)
        p.add_argument("--widths", type=int, nargs="+", default=[256, 256])
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--collect-only", action="store_true",
                       help="tabulate the run directories as they are (no training)")
        add_data_dir(p)


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    {"core-step-time": step_time, "core-memory": memory, "core-mnist": mnist}[name](args, res)


if __name__ == "__main__":  # the fresh process of one memory measurement
    if sys.argv[1:2] != ["memory-child"]:
        raise SystemExit("run the benchmarks with: python -m benchmarks NAME")
    memory_child(sys.argv[2], *map(int, sys.argv[3:6]))
