"""Refit the linear softmax readout of a finished ``ff_mnist.py`` run on its frozen features.

Hinton's protocol for unsupervised FF: train the layers, then fit a linear softmax classifier
on the normalized activities of the last three hidden layers. The head trained alongside the
layers chased moving features; this refits it once the layers are final
(:mod:`forwardonly.ff.readout`: L-BFGS on the L2-regularized cross-entropy, the L2 weight
chosen on the last 10,000 training images, then the head fitted on all 60,000). The test set
is used once, for the reported error.

    python benchmarks/ff_readout.py --tag unsupervised
    python benchmarks/ff_readout.py --tag supervised-sgd
    python benchmarks/ff_readout.py --run-dir runs/ff-unsup    # a `forwardonly train` run

Writes ``<tag>-readout.md`` (in ``--out``, or in the run directory) and prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ff_mnist import DEFAULT_DATA, ROOT, build
from forwardonly.data import load_dataset
from forwardonly.ff.readout import readout_error, readout_features, refit_head


def load_script_run(out: Path, tag: str, data_dir: Path):
    """An ``ff_mnist.py`` run: (model, data set, epochs done, description)."""
    ckpt = out / f"{tag}.pt"
    if not ckpt.is_file():
        raise SystemExit(f"no checkpoint {ckpt}: run benchmarks/ff_mnist.py with --tag {tag} "
                         "first")
    state = torch.load(ckpt, weights_only=False)
    run = argparse.Namespace(**state["config"])
    if run.mode == "bp":
        raise SystemExit("a backprop run has no FF readout to refit")
    ds = load_dataset("mnist", data_dir)
    model, _, _ = build(run, ds.in_shape, ds.classes)
    model.load_state_dict(state["model"])
    return model, ds, f"{run.mode}, {state['epoch']}/{run.epochs} epochs, widths {run.widths}"


def load_trainer_run(run_dir: Path):
    """A ``forwardonly train`` run directory: (model, data set, epochs done, description)."""
    from forwardonly.train import load_run

    config, ds, model, _, state = load_run(run_dir)
    if config.method != "ff":
        raise SystemExit(f"{run_dir} trained --method {config.method}, not ff")
    return model, ds, (f"{config.ff_mode}, {state['epoch']}/{config.epochs} epochs, widths "
                       f"{config.widths}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--tag", help="an ff_mnist.py run: its tag (file stem in --out)")
    which.add_argument("--run-dir", type=Path, help="a `forwardonly train --method ff` run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ff")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run_dir is not None:
        model, ds, about = load_trainer_run(args.run_dir)
        args.out, args.tag = args.run_dir, args.run_dir.name
        command = f"--run-dir {args.run_dir}"
    else:
        model, ds, about = load_script_run(args.out, args.tag, args.data_dir)
        command = f"--tag {args.tag}"

    t0 = time.perf_counter()
    before = readout_error(readout_features(model, ds.test_x), ds.test_y,
                        model.head.weight, model.head.bias)
    report = refit_head(model, ds.train_x, ds.train_y)
    test_feats = readout_features(model, ds.test_x)
    after = readout_error(test_feats, ds.test_y, model.head.weight, model.head.bias)
    seconds = time.perf_counter() - t0
    lines = [
        f"Run `{args.tag}` ({about}): linear softmax readout on the normalized activities of "
        f"hidden layers {model.readout_from + 1}..{len(model.layers)}.",
        "",
        "| readout | test error % |",
        "|---|---|",
        f"| trained alongside the layers | {100 * before:.2f} |",
        f"| refitted on the final features (L2 {report['weight_decay']:g}) | "
        f"{100 * after:.2f} |",
        "",
        f"Held-out error (last {report['held_out']:,} training images) per L2 weight: "
        + ", ".join(f"{lam:g}: {100 * e:.2f}%" for lam, e in report["held_out_errors"].items())
        + f". Refit time {seconds:.0f} s. Command: `python benchmarks/ff_readout.py "
        f"{command}`.",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / f"{args.tag}-readout.md").write_text(text)
    (args.out / f"{args.tag}-readout.json").write_text(json.dumps(
        {"before": before, "after": after, **report}, default=str, indent=1))
    print(text)


if __name__ == "__main__":
    main()
