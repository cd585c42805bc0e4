"""Core benchmarks: step time and peak memory of the estimators, MNIST accuracy after a budget.

Run through ``python benchmarks/run.py`` (which writes BENCHMARKS.md); each section can also
be run alone::

    python benchmarks/core.py step-time   [--rounds 7]
    python benchmarks/core.py memory      [--depths 2 4 8 16 32]
    python benchmarks/core.py mnist       [--epochs 5]

Results go to benchmarks/results/core_<section>.csv and .md.
Timings are ratios to a backprop step measured in the same process, methods interleaved
round by round, medians over rounds (the machine is shared; absolute times are noisy).
Peak memory is the peak resident set size (``ru_maxrss``) of a fresh process that builds the
model and runs two steps, with glibc told to serve large blocks by mmap so freed memory leaves
the resident set; it includes the interpreter and torch (~the same for all rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import forwardonly
from forwardonly import build_model, make_estimator

RESULTS = Path(__file__).resolve().parent / "results"

STEP_METHODS = [
    ("bp", "bp", {}),
    ("fg-w K=1", "fg-w", {"directions": 1}),
    ("fg-w K=1 rademacher", "fg-w", {"directions": 1, "distribution": "rademacher"}),
    ("fg-w K=1 rank1", "fg-w", {"directions": 1, "distribution": "rank1"}),
    ("fg-w K=4", "fg-w", {"directions": 4}),
    ("fg-w K=16", "fg-w", {"directions": 16}),
    ("fg-w K=16 rank1", "fg-w", {"directions": 16, "distribution": "rank1"}),
    ("zo K=1", "zo", {"directions": 1}),
]


def write(name: str, rows: list[dict], md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    (RESULTS / f"core_{name}.csv").write_text("\n".join(lines) + "\n")
    (RESULTS / f"core_{name}.md").write_text(md)
    print(md)


def step_time(rounds: int, batches: list[int]) -> None:
    rows = []
    for batch in batches:
        torch.manual_seed(0)
        model = build_model("mlp", (1, 28, 28), 10, widths=[1024, 1024])
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        ests = {label: make_estimator(m, model, F.cross_entropy, **o)
                for label, m, o in STEP_METHODS}
        steps = max(3, 2048 // batch)
        times: dict[str, list[float]] = {label: [] for label in ests}
        for est in ests.values():  # warm-up
            est.step(x, y)
        for _ in range(rounds):
            for label, est in ests.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    est.step(x, y)
                times[label].append((time.perf_counter() - t0) / steps)
        bp = statistics.median(times["bp"])
        for label, ts in times.items():
            med = statistics.median(ts)
            rows.append({"batch": batch, "method": label, "median_ms": round(1e3 * med, 2),
                         "ratio_to_bp": round(med / bp, 3)})
    md = ["### Step time (MLP 784-1024-1024-10; gradient estimate only, ratio to backprop)\n",
          f"Median over {rounds} interleaved rounds; target: fg-w K=1 ≤ 1.0× bp, "
          "stretch ≤ 0.7×.\n",
          "| method | " + " | ".join(f"batch {b}: ms (× bp)" for b in batches) + " |",
          "|---|" + "---|" * len(batches)]
    for label, _, _ in STEP_METHODS:
        cells = [next(f"{r['median_ms']} ({r['ratio_to_bp']}×)" for r in rows
                      if r["batch"] == b and r["method"] == label) for b in batches]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    write("step_time", rows, "\n".join(md) + "\n")


MEMORY_METHODS = ["inference", "bp", "fg-w", "fg-w rank1", "zo", "fg-w inplace",
                  "fg-w rank1 inplace", "zo inplace"]
# Large blocks straight from mmap, so freed memory leaves the resident set at once and the
# peak RSS tracks the peak of live tensors (not glibc's heap fragmentation).
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def memory_child(method: str, depth: int, width: int, batch: int) -> None:
    """Runs in a fresh process: build, two steps, print the peak RSS in MiB."""
    torch.manual_seed(0)
    model = build_model("mlp", (width,), width, widths=[width] * (depth - 1))
    x, y = torch.randn(batch, width), torch.randint(0, width, (batch,))
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(2):
        if method == "inference":
            with torch.no_grad():
                F.cross_entropy(model(x), y)
        else:  # "<method> [distribution] [inplace]"
            name, *rest = method.split()
            dists = [r for r in rest if r != "inplace"]
            opts = {"distribution": dists[0]} if dists else {}
            est = make_estimator(name, model, F.cross_entropy, **opts)
            if "inplace" in rest:  # optimizer sgd-inplace: no gradient buffer
                est.sgd_step(x, y, lr=1e-3)
            else:
                est.step(x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_after_model_mib": rss_model, "peak_mib": peak}))


def memory(depths: list[int], width: int, batch: int) -> None:
    rows = []
    for depth in depths:
        for method in MEMORY_METHODS:
            out = subprocess.run(
                [sys.executable, __file__, "memory-child", method, str(depth), str(width),
                 str(batch)], capture_output=True, text=True, check=True, env=MALLOC_ENV)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"depth": depth, "method": method,
                         "params_mib": round(depth * (width * width + width) * 4 / 2**20, 1),
                         "peak_mib": round(r["peak_mib"], 1)})
            print(rows[-1], flush=True)
    for r in rows:
        inf = next(q["peak_mib"] for q in rows if q["depth"] == r["depth"]
                   and q["method"] == "inference")
        r["ratio_to_inference"] = round(r["peak_mib"] / inf, 3)
    md = [f"### Peak memory of one training step (MLP width {width}, batch {batch})\n",
          "Peak RSS of a fresh process (MiB; includes ~the interpreter and torch); "
          "ratio to plain inference at the same depth. Target: fg-w and zo ≤ 1.3× "
          "inference at every depth. *inplace* = `--optimizer sgd-inplace` (the update is "
          "redrawn into the parameters; no `.grad`); the others fill `.grad` for a "
          "`torch.optim` optimizer.\n",
          "| depth | params MiB | " + " | ".join(MEMORY_METHODS) + " |",
          "|---|---|" + "---|" * len(MEMORY_METHODS)]
    for depth in depths:
        sel = {r["method"]: r for r in rows if r["depth"] == depth}
        cells = [f"{sel[m]['peak_mib']:.0f} ({sel[m]['ratio_to_inference']}×)"
                 for m in MEMORY_METHODS]
        md.append(f"| {depth} | {sel['bp']['params_mib']} | " + " | ".join(cells) + " |")
    write("memory", rows, "\n".join(md) + "\n")


MNIST_RUNS = [
    ("bp", {"method": "bp", "lr": 1e-3}),
    ("fg-w K=1", {"method": "fg-w", "directions": 1, "lr": 3e-4}),
    ("fg-w K=16 rank1", {"method": "fg-w", "directions": 16, "distribution": "rank1",
                         "lr": 3e-4}),
    ("zo K=4", {"method": "zo", "directions": 4, "lr": 3e-4}),
]


def mnist(epochs: int, data_dir: str, widths: list[int], collect_only: bool = False) -> None:
    from forwardonly.config import from_dict

    rows = []
    for label, opts in MNIST_RUNS:
        tag = label.replace(" ", "").replace("=", "")
        out = RESULTS / "runs" / f"mnist-{tag}-lr{opts['lr']}-e{epochs}"
        cfg = from_dict({"dataset": "mnist", "data_dir": data_dir, "widths": widths,
                         "batch_size": 64, "epochs": epochs, "progress": False,
                         "out": str(out), **opts})
        if collect_only:  # report what the run directories hold (possibly partial runs)
            if not (out / "metrics.jsonl").exists():
                continue
            done = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        else:  # a stopped (or finished) run continues from its checkpoint
            done = forwardonly.train(cfg, resume=(out / "checkpoint.pt").exists()).rows
        rows.append({"method": label, "epochs": f"{len(done)}/{epochs}", "lr": opts["lr"],
                     "test_error_pct": round(100 * done[-1]["test_error"], 2),
                     "train_error_pct": round(100 * done[-1]["train_error"], 2),
                     "seconds": round(sum(r["seconds"] for r in done), 1)})
    arch = "-".join(str(w) for w in [784, *widths, 10])
    md = [f"### MNIST after a fixed budget (MLP {arch}, Adam, cosine, batch 64, "
          f"{epochs} epochs)\n",
          "Ren et al. (2023) report FG-W at 9.25% test error (LocalMixer S/1/1); target: "
          "fg-w ≤ 9.25%.\n",
          "| method | lr | epochs done | test error % | train error % | seconds |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['lr']} | {r['epochs']} | {r['test_error_pct']} | "
           f"{r['train_error_pct']} | {r['seconds']} |" for r in rows]
    write("mnist", rows, "\n".join(md) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="section", required=True)
    s = sub.add_parser("step-time")
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    s = sub.add_parser("memory")
    s.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    s.add_argument("--width", type=int, default=2048)
    s.add_argument("--batch", type=int, default=2048)
    s = sub.add_parser("memory-child")
    s.add_argument("method")
    s.add_argument("depth", type=int)
    s.add_argument("width", type=int)
    s.add_argument("batch", type=int)
    s = sub.add_parser("mnist")
    s.add_argument("--epochs", type=int, default=5)
    s.add_argument("--widths", type=int, nargs="+", default=[256, 256])
    s.add_argument("--collect-only", action="store_true",
                   help="tabulate the run directories as they are (no training)")
    s.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2]
                                             / "shared" / "data" / "mnist"))
    a = p.parse_args()
    if a.section == "step-time":
        step_time(a.rounds, a.batches)
    elif a.section == "memory":
        memory(a.depths, a.width, a.batch)
    elif a.section == "memory-child":
        memory_child(a.method, a.depth, a.width, a.batch)
    else:
        mnist(a.epochs, a.data_dir, a.widths, a.collect_only)


if __name__ == "__main__":
    main()
