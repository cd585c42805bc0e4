"""``forwardonly experiment dimension-curse`` against the essay's own script, whole commands.

The essay's picture: for n = 4..79, 100,000 pairs of independent N(0, Iₙ) vectors, a
histogram of |cos(x, y)| on [0, 1] in 100 bins, one curve per n (7.6 million pairs). Two
commands draw it, each in a fresh process, so that starting Python and importing count alike:

- *forwardonly*: ``python -m forwardonly experiment dimension-curse --out TMP`` with its
  defaults, as a user runs it (what the ``forwardonly`` script runs; the repository's ``src``
  first on the path): the essay's panel, the large-n panel, two CSVs and the PNG;
- *essay script*: :data:`ESSAY_SCRIPT`, the essay's script written the straightforward way
  (numpy ``randn`` pairs, ``np.histogram``, a pyplot figure with one curve per n, saved to a
  PNG), run as ``python essay_script.py``.

Beside them, *start-up only* times ``python -m forwardonly experiment dimension-curse --help``:
what the command costs before it computes anything (Python and the CLI's imports; the
experiment itself imports numpy and matplotlib, not torch).

The thread count is set for both through ``OMP_NUM_THREADS`` (and the BLAS variables), one
measurement per ``--threads`` value; per round the commands run one after the other, the order
alternating between rounds, after an untimed warm-up of each. The ratio is the median of the
per-round ratios *essay script / forwardonly*, with its range.

    python -m benchmarks dimension-curse                    # threads 1 and all cores, 3 rounds
    python -m benchmarks dimension-curse --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import REPO, Results, md_table

ESSAY_PAIRS, ESSAY_N_MIN, ESSAY_N_MAX = 100_000, 4, 79

# The essay's script as its author would write it (not optimized); {pairs} and {n_stop} are
# filled with 100000 and 80 unless a quick check asks for less.
ESSAY_SCRIPT = '''\
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

plt.figure(figsize=(8, 5))
for n in range(4, {n_stop}):
    x = np.random.randn({pairs}, n)
    y = np.random.randn({pairs}, n)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    hist, edges = np.histogram(np.abs(cos), bins=100, range=(0, 1))
    plt.plot(edges[:-1], hist, color=(n / 80, 1 - n / 80, 1))
plt.xlabel("|cos(x, y)|")
plt.ylabel("count")
plt.savefig("dimension_curse.png")
'''

SIDES = ("forwardonly", "essay script", "start-up only")


def arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="thread counts (OMP_NUM_THREADS for both commands), each measured "
                   "separately")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each command")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")
    p.add_argument("--pairs", type=int, default=ESSAY_PAIRS,
                   help="pairs per n on both sides (a quick check; the comparison is "
                   f"{ESSAY_PAIRS:,})")
    p.add_argument("--n-max", type=int, default=ESSAY_N_MAX,
                   help=f"largest n on both sides (a quick check; the comparison is "
                   f"{ESSAY_N_MAX})")


def commands(args: argparse.Namespace, work: Path) -> dict[str, tuple[list[str], Path]]:
    """Each side's command line and its working directory (``work/<side>``)."""
    size: list[str] = []  # the defaults unless a quick check shrinks both sides alike
    if args.pairs != ESSAY_PAIRS:
        size += ["--pairs", str(args.pairs)]
    if args.n_max != ESSAY_N_MAX:
        size += ["--n-max", str(args.n_max)]
    ours = [sys.executable, "-m", "forwardonly", "experiment", "dimension-curse"]
    dirs = {side: work / side.replace(" ", "-") for side in SIDES}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    script = dirs["essay script"] / "essay_script.py"
    script.write_text(ESSAY_SCRIPT.format(pairs=args.pairs, n_stop=args.n_max + 1))
    return {
        "forwardonly": ([*ours, "--out", str(dirs["forwardonly"] / "out"), *size],
                        dirs["forwardonly"]),
        "essay script": ([sys.executable, script.name], dirs["essay script"]),
        "start-up only": ([*ours, "--help"], dirs["start-up only"]),
    }


def environment(threads: int) -> dict[str, str]:
    """The caller's environment with ``threads`` set for OpenMP, the BLAS libraries and torch,
    and the repository's ``src`` first on the path."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one fresh process running ``cmd``, and its output."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def check_outputs(cmds: dict[str, tuple[list[str], Path]], args: argparse.Namespace) -> None:
    """Both sides drew their picture: the essay's PNG; ours the PNG and every n's counts."""
    import csv

    png = b"\x89PNG\r\n\x1a\n"
    ours = cmds["forwardonly"][1] / "out"
    for path in (cmds["essay script"][1] / "dimension_curse.png", ours / "dimension_curse.png"):
        if path.read_bytes()[:8] != png:
            raise SystemExit(f"{path} is not a PNG")
    with (ours / "dimension_curse_histograms.csv").open() as fh:
        counts: dict[int, int] = {}
        for r in csv.DictReader(fh):
            counts[int(r["n"])] = counts.get(int(r["n"]), 0) + int(r["count"])
    want = dict.fromkeys(range(ESSAY_N_MIN, args.n_max + 1), args.pairs)
    if counts != want:
        raise SystemExit(f"forwardonly's histograms hold {sum(counts.values()):,} pairs, not "
                         f"{sum(want.values()):,}")


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    rows: list[dict[str, Any]] = []
    phases: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dimension-curse-") as tmp:
        cmds = commands(args, Path(tmp))
        for threads in args.threads:
            env = environment(threads)
            for _ in range(args.warmup):
                for cmd, cwd in cmds.values():
                    timed(cmd, cwd, env)
            times: dict[str, list[float]] = {side: [] for side in SIDES}
            phases[threads] = []
            for r in range(args.rounds):
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                    seconds, stdout = timed(*cmds[side], env)
                    times[side].append(seconds)
                    found = re.search(r"sampled and binned in ([0-9.]+) s", stdout)
                    if side == "forwardonly" and found:
                        phases[threads].append(float(found[1]))
            check_outputs(cmds, args)
            ratios = [e / o for e, o in zip(times["essay script"], times["forwardonly"],
                                            strict=True)]
            # no command that starts like forwardonly's can beat this: essay / start-up alone
            ceiling = statistics.median(times["essay script"]) / statistics.median(
                times["start-up only"])
            for side, ts in times.items():
                ours = side == "forwardonly"
                rows.append({
                    "threads": threads, "command": side,
                    "median_s": round(statistics.median(ts), 2),
                    "min_s": round(min(ts), 2), "max_s": round(max(ts), 2),
                    "essay_over_ours": round(statistics.median(ratios), 2) if ours else "",
                    "ratio_min": round(min(ratios), 2) if ours else "",
                    "ratio_max": round(max(ratios), 2) if ours else "",
                    "essay_panel_s": round(statistics.median(phases[threads]), 2)
                    if ours and phases[threads] else "",
                    "essay_over_startup": round(ceiling, 2) if side == "start-up only" else "",
                    "pairs": args.pairs * (args.n_max - ESSAY_N_MIN + 1),
                    "rounds": args.rounds,
                })
    table = [[r["threads"], r["command"], f"{r['median_s']} ({r['min_s']}–{r['max_s']})",
              r["essay_panel_s"],
              f"{r['essay_over_ours']}× ({r['ratio_min']}–{r['ratio_max']})"
              if r["essay_over_ours"] != "" else
              f"({r['essay_over_startup']}× for start-up alone)"
              if r["essay_over_startup"] != "" else ""] for r in rows]
    pairs = args.pairs * (args.n_max - ESSAY_N_MIN + 1)
    text = (
        f"The essay's picture, |cos| of {args.pairs:,} independent Gaussian pairs per n for "
        f"n = {ESSAY_N_MIN}..{args.n_max} ({pairs:,} pairs), drawn by two whole commands, each "
        "in a fresh process: *forwardonly* = `python -m forwardonly experiment dimension-curse "
        "--out TMP` with its defaults (also the large-n panel up to n = 10⁶, two CSVs and a "
        "two-panel PNG); *essay script* = the essay's script written the straightforward way "
        "(numpy `randn` pairs, `np.histogram`, one pyplot curve per n, a PNG; its text is "
        "`ESSAY_SCRIPT` in `benchmarks/dimension_curse.py`). *start-up only* = the same "
        "command with `--help`: Python and the CLI's imports, before any work (the experiment "
        "is numpy and matplotlib: it never imports torch); essay / start-up is the most any "
        "command that starts this way could reach. Threads "
        "set for both through `OMP_NUM_THREADS`; the commands interleaved, order alternating, "
        f"{args.rounds} rounds after {args.warmup} warm-up; seconds are wall-clock medians "
        f"(range); *essay panel s* is forwardonly's own report of sampling and binning the "
        f"{pairs:,} pairs; *essay / forwardonly* is the median of the per-round ratios "
        "(range). "
        "Target: ≥ 5×.\n\n"
        + md_table(["threads", "command", "wall s (range)", "essay panel s",
                    "essay / forwardonly"], table))
    res.write("speed", rows, title="dimension-curse: the whole command against the essay's "
              "script", text=text)
