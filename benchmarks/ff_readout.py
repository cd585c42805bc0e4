"""Refit the linear softmax readout of a finished Forward-Forward run on its frozen features.

Hinton's protocol for unsupervised FF: train the layers, then fit a linear softmax classifier
on the normalized activities of the last three hidden layers. The head trained alongside the
layers chased moving features; this refits it once the layers are final
(:mod:`forwardonly.ff.readout`: L-BFGS on the L2-regularized cross-entropy, the L2 weight
chosen on the last 10,000 training images, then the head fitted on all 60,000). The test set
is used once, for the reported error. The run is a library run directory, read with
``forwardonly.train.load_run`` (checkpoint loaded with ``weights_only=True``):

    python -m benchmarks ff-readout --tag unsupervised          # an ff-mnist run
    python -m benchmarks ff-readout --run-dir runs/ff-unsup     # a `forwardonly train` run

Writes ``benchmarks/results/ff-readout/<tag>.md`` (and ``.csv``, ``.json``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import add_data_dir, add_threads, set_threads
from benchmarks.report import RESULTS, Results, md_table


def arguments(name: str, ap: argparse.ArgumentParser) -> None:
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--tag", help="an ff-mnist run: its run directory's name")
    which.add_argument("--run-dir", type=Path, help="any `--method ff` run directory")
    ap.add_argument("--runs", type=Path, default=None,
                    help="where --tag is looked up (default: the ff-mnist results' runs/)")
    add_threads(ap)
    add_data_dir(ap)


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    from forwardonly.ff.readout import readout_error, readout_features, refit_head
    from forwardonly.train import load_run

    set_threads(args.threads)
    if args.run_dir is None:
        runs = args.runs or Path(args.out or RESULTS) / "ff-mnist" / "runs"
        args.run_dir = runs / args.tag
    if not (args.run_dir / "checkpoint.pt").is_file():
        raise SystemExit(f"{args.run_dir} holds no checkpoint.pt: train it first "
                         "(python -m benchmarks ff-mnist --tag ...)")
    config, ds, model, _, state = load_run(args.run_dir, data_dir=args.data_dir)
    if config.method != "ff":
        raise SystemExit(f"{args.run_dir} trained --method {config.method}, not ff: it has no "
                         "FF readout to refit")
    tag = args.run_dir.name
    t0 = time.perf_counter()
    before = readout_error(readout_features(model, ds.test_x), ds.test_y,
                           model.head.weight, model.head.bias)
    report = refit_head(model, ds.train_x, ds.train_y)
    after = readout_error(readout_features(model, ds.test_x), ds.test_y,
                          model.head.weight, model.head.bias)
    seconds = time.perf_counter() - t0
    rows = [{"readout": "trained alongside the layers", "test_error_pct": round(100 * before, 2)},
            {"readout": f"refitted on the final features (L2 {report['weight_decay']:g})",
             "test_error_pct": round(100 * after, 2)}]
    text = "\n".join([
        f"Run `{tag}` ({config.ff_mode}, {state['epoch']}/{config.epochs} epochs, widths "
        f"{config.widths}): linear softmax readout on the normalized activities of hidden "
        f"layers {model.readout_from + 1}..{len(model.layers)}.",
        "",
        md_table(["readout", "test error %"], [list(r.values()) for r in rows]),
        "",
        f"Held-out error (last {report['held_out']:,} training images) per L2 weight: "
        + ", ".join(f"{lam:g}: {100 * e:.2f}%" for lam, e in report["held_out_errors"].items())
        + f". Refit time {seconds:.0f} s.",
    ])
    res.write(tag, rows, title="Forward-Forward: the linear readout refitted on frozen "
              "features", text=text, notes={"run_dir": str(args.run_dir),
                                            "refit": {k: str(v) for k, v in report.items()}})
