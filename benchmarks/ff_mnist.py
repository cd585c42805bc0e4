"""MNIST accuracy of Forward-Forward (supervised, unsupervised) and of backprop, same network.

Hinton (arXiv 2212.13345): permutation-invariant MNIST, 4 hidden layers × 2000 ReLU, 60 epochs:
supervised FF 1.36% test error, unsupervised FF + linear readout 1.37%, backprop about 1.4%.

    python benchmarks/ff_mnist.py --mode supervised      # FF, hard negatives, goodness readout
    python benchmarks/ff_mnist.py --mode unsupervised    # FF, hybrid negatives, softmax readout
    python benchmarks/ff_mnist.py --mode bp              # backprop baseline, same layers
    python benchmarks/ff_mnist.py --mode supervised --epochs 2 --widths 500 500 --tag quick

Each run appends one CSV row per finished epoch to ``benchmarks/out/ff/<tag>.csv`` and keeps a
checkpoint ``<tag>.pt`` beside it: starting the same command again resumes after the last
finished epoch (stop it any time; partial results stay usable). ``summary.md`` in the same
folder is rewritten after every epoch from all CSVs there. Runs are long on a small CPU; start
them with ``nohup nice -n 10 ... &``.

Two loops (``--loop``):

* ``trainer``: the package's own ``forwardonly.train`` (run directory ``<tag>-run/`` with
  config, metrics, checkpoint; images in [0, 1]; the ``half-linear`` schedule; with
  ``--optimizer sgd`` the head at 10x the learning rate and 3x the weight decay; AdamW for
  ``adam``). It tests after every epoch and has no bfloat16 autocast for ``--mode bp``.
* ``own``: the same ``opt.zero_grad(); est.step(x, y); opt.step()`` written out here (Adam
  with L2 weight decay for ``adam``, the same SGD groups, the same schedule per epoch),
  ``--eval-every``, and bfloat16 autocast for ``--mode bp``; checkpoint ``<tag>.pt``. The
  runs in BENCHMARKS.md used this loop.

``auto`` (the default) takes the trainer when it can run the requested settings.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import forwardonly.ff  # noqa: F401  (registers "ff" and "ff-mlp")
from forwardonly.data import load_dataset
from forwardonly.estimators import make_estimator
from forwardonly.ff import FFNet
from forwardonly.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
FIELDS = [
    "mode", "epoch", "epochs", "lr", "train_loss", "readout_loss", "test_error",
    "test_error_softmax", "epoch_s", "eval_s", "total_s",
]
REFERENCE = {
    "supervised": "1.36 (Hinton, 60 epochs); reference implementation 6.84",
    "unsupervised": "1.37 (Hinton)",
    "bp": "about 1.4 (Hinton)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("supervised", "unsupervised", "bp"), default="supervised")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--widths", type=int, nargs="+", default=[2000, 2000, 2000, 2000])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate; default 1e-3 (FF) or 1e-4 (bp)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam, or sgd as in Hinton's code (momentum 0.9, head at 10x the lr)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="default 0 (adam) or Hinton's 1e-3 on the layers, 3e-3 on the head (sgd)")
    p.add_argument("--negatives", choices=("random", "hard"), default="hard",
                   help="wrong-label negatives of the supervised mode")
    p.add_argument("--readout", choices=("goodness", "softmax"), default="goodness",
                   help="classifier of the supervised mode (unsupervised is always softmax)")
    p.add_argument("--peer-weight", type=float, default=0.03)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the matrix products (FF layers; bp: autocast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ff")
    p.add_argument("--tag", default=None, help="file stem of the outputs; default: the mode")
    p.add_argument("--eval-every", type=int, default=1,
                   help="test every N epochs (and after the last); the goodness readout tries "
                        "every label, so testing costs a third of an epoch")
    p.add_argument("--loop", choices=("auto", "own", "trainer"), default="auto",
                   help="forwardonly.train, or the loop written out in this script")
    return p.parse_args(argv)


def trainer_fields(args: argparse.Namespace) -> dict[str, object]:
    """The forwardonly.train config of this run."""
    fields: dict[str, object] = {
        "dataset": "mnist", "data_dir": str(args.data_dir), "standardize": False,
        "widths": list(args.widths), "optimizer": args.optimizer, "lr": args.lr,
        "momentum": 0.9,
        "weight_decay": args.weight_decay, "schedule": "half-linear",
        "batch_size": args.batch_size,
        "epochs": args.epochs, "seed": args.seed, "threads": args.threads,
        "out": str(args.out / f"{args.tag or args.mode}-run"), "progress": False,
    }
    if args.mode == "bp":
        return {**fields, "model": "mlp", "method": "bp"}
    if args.optimizer == "sgd":  # Hinton: the head learns 10x faster and decays 3x more
        fields.update(head_lr_scale=10.0, head_weight_decay=3 * args.weight_decay)
    return {
        **fields, "model": "ff-mlp", "method": "ff", "ff_mode": args.mode,
        "ff_readout": args.readout if args.mode == "supervised" else "softmax",
        "ff_negatives": args.negatives if args.mode == "supervised" else "hybrid",
        "ff_peer_weight": args.peer_weight, "ff_threshold": args.threshold,
        "ff_precision": args.precision,
    }


def trainer_available(args: argparse.Namespace) -> bool:
    """Whether forwardonly.train exists and its config knows every field this run sets."""
    try:
        from forwardonly.config import TrainConfig
        from forwardonly.train import train  # noqa: F401
    except ImportError:
        return False
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    bf16_bp = args.mode == "bp" and args.precision == "bfloat16"  # no autocast in the trainer
    return set(trainer_fields(args)) <= known and not bf16_bp and args.eval_every == 1


def run_with_trainer(args: argparse.Namespace) -> None:
    """Train through forwardonly.train, resuming its run directory when it has a checkpoint."""
    from forwardonly.config import from_dict
    from forwardonly.train import train

    config = from_dict(trainer_fields(args))
    run_dir = Path(str(config.out))

    def log(message: str) -> None:
        print(message, flush=True)
        write_summary(args.out)

    train(config, resume=(run_dir / "checkpoint.pt").is_file(), log=log)


def build(args: argparse.Namespace, in_shape: tuple[int, int, int], classes: int):
    """Model, estimator and optimizer for ``args.mode``."""
    if args.mode == "bp":
        model = build_model("mlp", in_shape, classes, widths=args.widths)
        est = make_estimator("bp", model, F.cross_entropy, seed=args.seed)
    else:
        model = build_model(
            "ff-mlp", in_shape, classes, widths=args.widths, ff_mode=args.mode,
            ff_readout=args.readout if args.mode == "supervised" else "softmax",
            ff_precision=args.precision, seed=args.seed,
        )
        est = make_estimator(
            "ff", model, F.cross_entropy, seed=args.seed,
            ff_negatives=args.negatives if args.mode == "supervised" else "hybrid",
            ff_peer_weight=args.peer_weight, ff_threshold=args.threshold,
        )
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                               fused=True)
    else:  # Hinton: gradients smoothed with 0.9; the head learns 10x faster, decays 3x more
        head = list(model.head.parameters()) if isinstance(model, FFNet) else []
        ids = {id(p) for p in head}
        body = [p for p in model.parameters() if id(p) not in ids]
        groups = [{"params": body, "lr": args.lr, "weight_decay": args.weight_decay}]
        if head:
            groups.append({"params": head, "lr": 10 * args.lr,
                           "weight_decay": 3 * args.weight_decay})
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
        for group in opt.param_groups:
            group["lr_scale"] = group["lr"] / args.lr
    return model, est, opt


def lr_factor(epoch: int, epochs: int) -> float:
    """Hinton's schedule for 1-based ``epoch``: 1 for the first half, then linear towards 0."""
    return 1.0 if epoch <= epochs / 2 else (1 + 2 * (epochs - epoch)) / epochs


@torch.no_grad()
def test_errors(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(error of the model's own readout, error of the softmax readout) in %, NaN if none."""
    def err(scores_fn) -> float:
        wrong = sum(int((scores_fn(xb).argmax(-1) != yb).sum())
                    for xb, yb in zip(x.split(1000), y.split(1000), strict=True))
        return 100.0 * wrong / len(y)

    main = err(model)
    soft = err(model.readout_logits) if isinstance(model, FFNet) else float("nan")
    return main, soft


def train_epoch(est, opt, x: torch.Tensor, y: torch.Tensor, batch: int, gen: torch.Generator,
                bf16: bool = False):
    """One pass in a random order; returns mean train loss and mean readout loss.

    ``bf16``: run each step's forward and backward under bfloat16 autocast (the optimizer
    step stays in float32)."""
    order = torch.randperm(len(y), generator=gen)
    total, head, steps = 0.0, 0.0, 0
    for start in range(0, len(y) - batch + 1, batch):  # drop the ragged tail
        idx = order[start : start + batch]
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            stats = est.step(x[idx], y[idx])
        opt.step()
        total += stats["loss"]
        head += stats.get("readout_loss", float("nan"))
        steps += 1
    return total / steps, head / steps


def saved_config(state: dict) -> dict:
    """The config stored in a checkpoint (runs from before ``--optimizer`` used Adam)."""
    return {"optimizer": "adam", **state["config"]}


def recipe(ckpt: Path) -> str:
    """Optimizer and precision of an own-loop run, from its checkpoint's config (memory-
    mapped: the weights are not read)."""
    if not ckpt.is_file():
        return "—"
    config = saved_config(torch.load(ckpt, weights_only=False, mmap=True))
    wd = config.get("weight_decay") or 0
    return f"{config['optimizer']} lr {config['lr']:g} wd {wd:g}, {config['precision']}"


def write_summary(out: Path) -> None:
    """Rewrite ``summary.md``: the latest epoch of every run in ``out`` (both loops)."""
    lines = [
        "| run | mode | recipe | epochs done | test error % | softmax-readout error % | "
        "s / epoch (train) | total h | published |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(out.glob("*.csv")):  # this script's own loop
        with path.open() as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        if not rows or reader.fieldnames != FIELDS:  # another script's CSV (ff_speed.py)
            continue
        last = rows[-1]
        tested = [r for r in rows if r["test_error"] not in ("", "nan")]
        mean_epoch = sum(float(r["epoch_s"]) for r in rows) / len(rows)
        err = f"{float(tested[-1]['test_error']):.2f}" if tested else "—"
        if tested and tested[-1] is not last:
            err += f" (epoch {tested[-1]['epoch']})"
        soft = tested[-1]["test_error_softmax"] if tested else ""
        soft = "—" if soft in ("", "nan") else f"{float(soft):.2f}"
        lines.append(
            f"| {path.stem} | {last['mode']} | {recipe(path.with_suffix('.pt'))} | "
            f"{last['epoch']} / {last['epochs']} | {err} | {soft} | {mean_epoch:.0f} | "
            f"{float(last['total_s']) / 3600:.2f} | {REFERENCE.get(last['mode'], '')} |"
        )
    for path in sorted(out.glob("*-run/metrics.csv")):  # forwardonly.train run directories
        import yaml

        config = yaml.safe_load((path.parent / "config.yaml").read_text())["config"]
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        mode = config.get("ff_mode", "bp") if config["method"] == "ff" else "bp"
        last = rows[-1]
        train_s = [float(r["seconds"]) for r in rows]
        lines.append(
            f"| {path.parent.name} | {mode} | {config['optimizer']}, trainer | "
            f"{last['epoch']} / {config['epochs']} | "
            f"{100 * float(last['test_error']):.2f} | — | {sum(train_s) / len(rows):.0f} | "
            f"{sum(train_s) / 3600:.2f} (train only) | {REFERENCE.get(mode, '')} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lr is None:
        args.lr = 1e-4 if args.mode == "bp" else 1e-3
    if args.weight_decay is None:
        args.weight_decay = 1e-3 if args.optimizer == "sgd" else 0.0
    tag = args.tag or args.mode
    args.out.mkdir(parents=True, exist_ok=True)
    if args.loop == "trainer" or (args.loop == "auto" and trainer_available(args)):
        run_with_trainer(args)
        return
    csv_path, ckpt_path = args.out / f"{tag}.csv", args.out / f"{tag}.pt"

    ds = load_dataset("mnist", args.data_dir)
    train_x, train_y = ds.train_x, ds.train_y
    if args.train_limit:
        train_x, train_y = train_x[: args.train_limit], train_y[: args.train_limit]
    torch.manual_seed(args.seed)
    model, est, opt = build(args, ds.in_shape, ds.classes)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    resume_keys = ("mode", "widths", "batch_size", "lr", "epochs", "negatives", "readout",
                   "peer_weight", "threshold", "seed", "train_limit", "weight_decay",
                   "precision", "optimizer")

    start, elapsed = 1, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        saved = saved_config(state)
        if any(saved[k] != config[k] for k in resume_keys):
            raise SystemExit(
                f"{ckpt_path} holds a run with other settings; pass another --tag or delete it"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        est.load_state_dict(state["est"])
        start, elapsed = state["epoch"] + 1, state["total_s"]
        print(f"resuming {tag} after epoch {state['epoch']}", flush=True)
    elif csv_path.exists():
        csv_path.unlink()  # rows without a checkpoint cannot be continued

    for epoch in range(start, args.epochs + 1):
        lr = args.lr * lr_factor(epoch, args.epochs)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        model.train()
        t0 = time.perf_counter()
        # bp with --precision bfloat16: the same bf16 matrix products as the FF layers
        bf16 = args.mode == "bp" and args.precision == "bfloat16"
        loss, head = train_epoch(est, opt, train_x, train_y, args.batch_size, gen, bf16)
        t1 = time.perf_counter()
        model.eval()
        err = err_soft = float("nan")
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            err, err_soft = test_errors(model, ds.test_x, ds.test_y)
        t2 = time.perf_counter()
        elapsed += t2 - t0
        row = {
            "mode": args.mode, "epoch": epoch, "epochs": args.epochs, "lr": f"{lr:.3g}",
            "train_loss": f"{loss:.5f}",
            "readout_loss": "" if math.isnan(head) else f"{head:.5f}",
            "test_error": "" if math.isnan(err) else f"{err:.2f}",
            "test_error_softmax": "" if math.isnan(err_soft) else f"{err_soft:.2f}",
            "epoch_s": f"{t1 - t0:.1f}", "eval_s": f"{t2 - t1:.1f}", "total_s": f"{elapsed:.0f}",
        }
        torch.save(
            {"config": config, "epoch": epoch, "total_s": elapsed, "model": model.state_dict(),
             "opt": opt.state_dict(), "est": est.state_dict()},
            ckpt_path.with_suffix(".tmp"),
        )
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        write_summary(args.out)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
