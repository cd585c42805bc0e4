"""Short learning-rate sweep for the Table 3 methods on MNIST (the paper's learning rates are
not in its main text; this picks ours). Each (preset, method, lr) trains a few epochs on the
full training set with the Table 3 recipe; the CSV gets one row per epoch.

    nice -n 10 .venv/bin/python benchmarks/local_lr_sweep.py --presets M/1/16 --epochs 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from forwardonly.train import TrainingDiverged
from local_common import METHODS, OUT, train_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["M/1/16"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(OUT / "lr_sweep.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.presets:
        for method in args.methods:
            for lr in args.lrs:
                tag = f"sweep_{preset.replace('/', '-')}_{method}_lr{lr:g}_e{args.epochs}"
                try:
                    train_run(preset=preset, method=method, dataset="mnist",
                              epochs=args.epochs, lr=lr, warmup_epochs=1,
                              csv_path=Path(args.csv), run_dir=OUT / "ckpt" / tag,
                              train_eval=5000)
                except TrainingDiverged as exc:
                    print(f"diverged: {exc}")


if __name__ == "__main__":
    main()
