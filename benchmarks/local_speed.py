"""Step time and peak memory of LG-FG-A against BP and L-BP (and LG-FG-W, FG-A) on
LocalMixer M/8/16, one CIFAR-10 batch of 128, as ratios measured in one run.

- Step time: a child process builds one model and one estimator per method and times
  ``estimator.step`` round-robin (method A, B, C, A, B, C, ...), so a change of load on the
  shared machine hits every method alike; we report the median over the rounds. Measured
  twice, in two children: with glibc's default allocator (what a user gets: freed blocks go
  back to the system and come back as page faults, which cost BP, whose graph holds every
  activation, more than the local methods) and with the heap kept (``MALLOC_MMAP_THRESHOLD_``
  and ``MALLOC_TRIM_THRESHOLD_`` raised so that after the first step nothing faults: the
  arithmetic alone).
- Peak memory: every method runs in a fresh subprocess; the working memory of a step is the
  peak resident set (``VmHWM``; ``ru_maxrss`` where /proc is missing) after ``--mem-steps``
  steps minus the same peak once the model, estimator and batch exist — so it counts the
  activations, gradients and temporaries of a step; the parameters are in the baseline.
  Measured twice: with glibc forced to serve large blocks by mmap (``MALLOC_MMAP_THRESHOLD_``,
  so freed tensors leave the resident set: the peak of live memory) and with its default
  heap (which keeps freed blocks: fragmentation included).

    python -m benchmarks local-speed --rounds 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import add_data_dir, add_threads
from benchmarks.local_common import load
from benchmarks.report import REPO, Results, md_table
from forwardonly import build_model, make_estimator

CONFIGS = {  # label -> (method, options)
    "bp": ("bp", {}),
    "l-bp": ("l-bp", {}),
    "lg-fg-a": ("lg-fg-a", {"distribution": "gaussian"}),
    "lg-fg-a (rademacher)": ("lg-fg-a", {"distribution": "rademacher"}),
    "fg-a": ("fg-a", {"distribution": "gaussian"}),
    "lg-fg-w": ("lg-fg-w", {}),
}


# Memory. "mmap": glibc serves every block over 64 KiB by mmap and unmaps it when freed, so
# the resident set follows the live tensors; "default": glibc's own heuristics, whose heap
# keeps freed blocks (what a user of this process would see, fragmentation included).
ALLOCATORS = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}
# Time. "default": glibc's own heuristics; "kept": nothing is returned to the system, so
# after the first step no allocation page-faults (the arithmetic of the step alone).
TIMING_ALLOCATORS = {"default": {}, "kept": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                             "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                                             "MALLOC_TOP_PAD_": str(1 << 28)}}


def batch_file(folder: Path, batch: int, data_dir: str | None) -> Path:
    """The first ``batch`` CIFAR-10 training images, saved for the child processes."""
    data = load("cifar10", data_dir)
    path = folder / f"batch_{batch}.pt"
    torch.save({"x": data.train_x[:batch].clone(), "y": data.train_y[:batch].clone()}, path)
    return path


def build(preset: str, label: str, x: torch.Tensor):
    method, options = CONFIGS[label]
    model = build_model("local-mixer", tuple(x.shape[1:]), 10, preset=preset, seed=0)
    return model, make_estimator(method, model, F.cross_entropy, **options)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_kib() -> int:
    """Peak resident set of this process (KiB): ``VmHWM`` where Linux has it (it belongs to
    the address space, so unlike ``ru_maxrss`` it does not inherit the parent's peak through
    exec), else ``ru_maxrss``."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(preset: str, label: str, path: str, steps: int, threads: int) -> None:
    """Run in a fresh process: print the working-memory peak of ``steps`` steps (MiB)."""
    torch.set_num_threads(threads)
    data = torch.load(path, weights_only=True)
    x, y = data["x"], data["y"]
    model, est = build(preset, label, x)
    base = rss_peak_kib()
    for _ in range(steps):
        est.step(x, y)
    peak = rss_peak_kib()
    print(json.dumps({"label": label, "base_mib": base / 1024, "peak_mib": peak / 1024,
                      "work_mib": (peak - base) / 1024}))


def timing_child(preset: str, labels: list[str], path: str, rounds: int, threads: int) -> None:
    """Run in a fresh process: print the median step time of every method (interleaved)."""
    torch.set_num_threads(threads)
    data = torch.load(path, weights_only=True)
    x, y = data["x"], data["y"]
    runs = {label: build(preset, label, x) for label in labels}
    times: dict[str, list[float]] = {label: [] for label in labels}
    for label in labels:  # warm-up
        runs[label][1].step(x, y)
    for _ in range(rounds):
        for label in labels:
            t0 = time.perf_counter()
            runs[label][1].step(x, y)
            times[label].append(time.perf_counter() - t0)
    print(json.dumps({label: statistics.median(v) for label, v in times.items()}))


def child(args: argparse.Namespace, env: dict[str, str], *extra: str) -> dict:
    """Run a measurement in a fresh process (``python -m benchmarks.local_speed``); its
    last JSON line."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.local_speed", "--preset",
                          args.preset, "--threads", str(args.threads), "--mem-steps",
                          str(args.mem_steps), "--rounds", str(args.rounds), *extra],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def arguments(name: str, ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="M/8/16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--mem-steps", type=int, default=2)
    add_threads(ap)
    ap.add_argument("--labels", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add_data_dir(ap)


def lg_fg_a_verdict(rows: list[dict]) -> str:
    """The target (LG-FG-A's step ≤ 1.0× BP's, default allocator), by how much, and why."""
    got = {r["method"]: r["step_vs_bp"] for r in rows}
    parts = []
    for label in ("lg-fg-a", "lg-fg-a (rademacher)"):
        if label in got:
            over = got[label] - 1
            verdict = "met" if over <= 0 else f"{over:.0%} over"
            parts.append(f"{label} {got[label]:.2f}× ({verdict})")
    if not parts:
        return ""
    head = "\n\nTarget: LG-FG-A's step ≤ 1.0× BP's (default allocator): " + "; ".join(parts)
    if all(got[label] <= 1.0 for label in ("lg-fg-a", "lg-fg-a (rademacher)") if label in got):
        return head + "."
    floor = f" (L-BP: {got['l-bp']:.2f}×)" if "l-bp" in got else ""
    return (head + ". Why it stays above: in matrix products LG-FG-A does what L-BP does "
            "(a forward product, a tangent product in place of the input-gradient product, "
            "a weight-gradient product), and L-BP already pays for the block heads' LayerNorm and "
            f"losses, which BP does not have{floor}. On top, LG-FG-A draws a tangent for "
            "every unit of every layer (46 M numbers per step at M/8/16 and batch 128; signs "
            "cost far less to draw than Gaussian entries) and makes a few more elementwise passes "
            "(adding the tangent, the masks, the products with the derivatives, one more "
            "LayerNorm product per layer).")


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    if "bp" not in args.labels:
        raise SystemExit("--labels must include bp: every ratio is to BP")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(batch_file(Path(tmp), args.batch, args.data_dir))
        memory: dict[str, dict[str, float]] = {}
        for label in args.labels:
            memory[label] = {alloc: child(args, env, "--child", label, path)["work_mib"]
                             for alloc, env in ALLOCATORS.items()}
            print(f"memory {label}: {memory[label]} MiB", flush=True)
        step: dict[str, dict[str, float]] = {}
        for alloc, env in TIMING_ALLOCATORS.items():
            step[alloc] = child(args, env, "--timing-child", path, "--labels", *args.labels)
            print(f"step time, {alloc} allocator: {step[alloc]}", flush=True)

    rows = []
    for label in args.labels:
        rows.append({"preset": args.preset, "batch": args.batch, "threads": args.threads,
                     "method": label, "step_s": step["default"][label],
                     "step_vs_bp": step["default"][label] / step["default"]["bp"],
                     "step_s_heap_kept": step["kept"][label],
                     "step_vs_bp_heap_kept": step["kept"][label] / step["kept"]["bp"],
                     "work_mib": memory[label]["mmap"],
                     "mem_vs_bp": memory[label]["mmap"] / memory["bp"]["mmap"],
                     "work_mib_default_malloc": memory[label]["default"],
                     "mem_vs_bp_default_malloc": memory[label]["default"]
                     / memory["bp"]["default"],
                     "rounds": args.rounds})
    text = (f"LocalMixer {args.preset}, one CIFAR-10 batch of {args.batch}, {args.threads} "
            f"CPU thread(s), median of {args.rounds} interleaved rounds, with glibc's default "
            "allocator and with the heap kept (no page faults after the first step); memory = "
            f"peak RSS growth over {args.mem_steps} steps in a fresh process, with malloc "
            "serving large blocks by mmap and with glibc's default.\n\n" + md_table(
                ["method", "step (s)", "step / BP", "step, heap kept (s)", "/ BP",
                 "memory (MiB)", "memory / BP", "memory, default malloc (MiB)", "/ BP"],
                [[r["method"].upper(), f"{r['step_s']:.3f}", f"{r['step_vs_bp']:.2f}",
                  f"{r['step_s_heap_kept']:.3f}", f"{r['step_vs_bp_heap_kept']:.2f}",
                  f"{r['work_mib']:.0f}", f"{r['mem_vs_bp']:.2f}",
                  f"{r['work_mib_default_malloc']:.0f}", f"{r['mem_vs_bp_default_malloc']:.2f}"]
                 for r in rows]) + lg_fg_a_verdict(rows))
    stem = f"{args.preset.replace('/', '-')}_b{args.batch}_t{args.threads}"
    res.write(stem, rows, title=f"LocalMixer {args.preset} step time and peak memory: LG-FG-A "
              "against BP and L-BP", text=text)


def child_main() -> None:
    """A fresh process of one measurement (started by :func:`child`)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--mem-steps", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--labels", nargs="+", default=list(CONFIGS))
    ap.add_argument("--child", nargs=2, metavar=("LABEL", "BATCH_FILE"))
    ap.add_argument("--timing-child", metavar="BATCH_FILE")
    a = ap.parse_args()
    if a.child:
        memory_child(a.preset, a.child[0], a.child[1], a.mem_steps, a.threads)
    elif a.timing_child:
        timing_child(a.preset, a.labels, a.timing_child, a.rounds, a.threads)
    else:
        raise SystemExit("run the benchmarks with: python -m benchmarks local-speed")


if __name__ == "__main__":
    child_main()
