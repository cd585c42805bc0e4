"""Table 3 of Ren et al. (ICLR 2023), MNIST columns: BP, L-BP, LG-BP, FG-W, FG-A, LG-FG-W,
LG-FG-A on LocalMixer S/1/1 and M/1/16, plus the same networks with the backbone frozen at
initialisation and only the heads trained ("heads-only").

Recipe: batch 128, SGD momentum 0.9, 1 warmup epoch then cosine decay, weight decay 1e-4 on
the weights, no augmentation; one direction per step for the forward-gradient methods (the
paper's setting); learning rates from ``local-lr-sweep`` (``LRS`` below). Every run goes
through the library's loop in its run directory (``benchmarks/results/local-table3/runs/``);
every epoch appends a row to ``table3_mnist.csv``, so a stopped run resumes where it was and
partial results are usable:

    nohup nice -n 10 python -m benchmarks local-table3 --epochs 50 &
    python -m benchmarks local-table3 --report   # markdown from the CSV so far
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from benchmarks.common import add_data_dir, add_threads, set_threads
from benchmarks.local_common import PAPER, train_run
from benchmarks.report import Results

METHODS = ("lg-fg-a", "bp", "l-bp", "lg-bp", "fg-a", "lg-fg-w", "fg-w", "fg-w-mixer",
           "heads-only")
LABELS = {"fg-w": "FG-W (generic: heads perturbed too)",
          "fg-w-mixer": "FG-W (paper's: heads exact)", "heads-only": "heads only (frozen)"}
# peak learning rates chosen on 5-epoch runs of M/1/16 (local-lr-sweep), used for both sizes
LRS = {"bp": 0.1, "l-bp": 0.1, "lg-bp": 0.1, "fg-w": 1e-4, "fg-a": 0.01, "lg-fg-w": 0.03,
       "lg-fg-a": 0.03, "fg-w-mixer": 0.03, "heads-only": 0.1}
# where S/1/1's own 5-epoch sweep disagreed with M/1/16's (G = 1: 8x the noise per loss)
LR_PRESET: dict[tuple[str, str], float] = {}
STEM = "table3_mnist"
TITLE = "Table 3 of Ren et al. (2023), MNIST columns"


def report(csv_path: Path, epochs: int) -> str:
    """Markdown table of the latest row of every (preset, method, schedule length) run."""
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    last: dict[tuple[str, str, int], dict[str, str]] = {}
    seconds: dict[tuple[str, str, int], float] = {}
    for r in rows:
        key = (r["preset"], r["method"], int(r["epochs"]))
        last[key] = r
        seconds[key] = seconds.get(key, 0.0) + float(r["epoch_seconds"])
    presets = ("S/1/1", "M/1/16")
    schedules = sorted({k[2] for k in last} | {epochs})
    lines = ["Test / train error (%) on MNIST after the epochs shown (of a cosine schedule of "
             "the given length; fewer means the run is still going). Train error on the first "
             "10,000 training images; time: training only, 1 CPU thread on a shared machine. "
             "Paper: Table 3.", "",
             "| Method | schedule | " + " | ".join(f"{p} ours | {p} epochs (min) | {p} paper"
                                                   for p in presets) + " |",
             "|---|---|" + "---|---|---|" * len(presets)]
    for method in METHODS:
        for sched in schedules:
            if not any((p, method, sched) in last for p in presets) and sched != epochs:
                continue
            cells = []
            for p in presets:
                r = last.get((p, method, sched))
                paper = PAPER.get((p, method))
                paper_s = f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "—"
                if r is None:
                    cells += ["—", "—", paper_s]
                    continue
                cells += [f"{float(r['test_error']):.2f} / {float(r['train_error']):.2f}",
                          f"{r['epoch']}/{r['epochs']} ({seconds[(p, method, sched)] / 60:.0f})",
                          paper_s]
            label = LABELS.get(method, method.upper())
            lines.append(f"| {label} | {sched} ep | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def arguments(name: str, ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--presets", nargs="+", default=["M/1/16", "S/1/1"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true", help="only write the markdown table")
    add_threads(ap)
    add_data_dir(ap)


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    csv_path = res.path(f"{STEM}.csv")
    if not args.report:
        set_threads(args.threads)
        for method in args.methods:
            for preset in args.presets:
                tag = f"{preset.replace('/', '-')}_{method}_e{args.epochs}_s{args.seed}"
                train_run(preset=preset, method=method, dataset="mnist",
                          data_dir=args.data_dir, epochs=args.epochs,
                          lr=LR_PRESET.get((preset, method), LRS[method]), warmup_epochs=1,
                          seed=args.seed, csv_path=csv_path, run_dir=res.run_dir(tag))
                res.write(STEM, [], title=TITLE, text=report(csv_path, args.epochs),
                          csv_rows=False)
    res.write(STEM, [], title=TITLE, text=report(csv_path, args.epochs), csv_rows=False)
