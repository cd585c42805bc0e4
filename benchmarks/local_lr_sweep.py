"""Short learning-rate sweep for the Table 3 methods on MNIST (the paper's learning rates are
not in its main text; this picks ours). Each (preset, method, lr) trains a few epochs on the
full training set with the Table 3 recipe through the library's loop; the CSV
(``benchmarks/results/local-lr-sweep/lr_sweep.csv``) gets one row per epoch.

    nice -n 10 python -m benchmarks local-lr-sweep --presets M/1/16 --epochs 5
"""

from __future__ import annotations

import argparse
import csv

from benchmarks.common import add_data_dir, add_threads, set_threads
from benchmarks.local_common import METHODS, train_run
from benchmarks.report import Results, md_table
from forwardonly.train import TrainingDiverged


def arguments(name: str, ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--presets", nargs="+", default=["M/1/16"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--epochs", type=int, default=5)
    add_threads(ap)
    add_data_dir(ap)


def report(csv_path) -> str:
    """The last epoch of every (preset, method, lr) run."""
    last: dict[tuple[str, str, str], dict[str, str]] = {}
    if csv_path.is_file():
        for r in csv.DictReader(csv_path.open()):
            last[(r["preset"], r["method"], r["lr"])] = r
    return ("Test / train error (%) after the epochs shown, Table 3 recipe, train error on the "
            "first 5,000 training images.\n\n" + md_table(
                ["preset", "method", "lr", "epoch", "test err", "train err"],
                [[p, m, lr, f"{r['epoch']}/{r['epochs']}", f"{float(r['test_error']):.2f}",
                  f"{float(r['train_error']):.2f}"] for (p, m, lr), r in sorted(last.items())]))


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    set_threads(args.threads)
    csv_path = res.path("lr_sweep.csv")
    for preset in args.presets:
        for method in args.methods:
            for lr in args.lrs:
                tag = f"sweep_{preset.replace('/', '-')}_{method}_lr{lr:g}_e{args.epochs}"
                try:
                    train_run(preset=preset, method=method, dataset="mnist",
                              data_dir=args.data_dir, epochs=args.epochs, lr=lr,
                              warmup_epochs=1, csv_path=csv_path, run_dir=res.run_dir(tag),
                              train_eval=5000)
                except TrainingDiverged as exc:
                    print(f"diverged: {exc}")
    res.write("lr_sweep", [], title="Learning-rate sweep of the Table 3 methods (MNIST)",
              text=report(csv_path), csv_rows=False)
