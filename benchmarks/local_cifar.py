"""CIFAR-10, LocalMixer M/8/16: LG-FG-A against BP and L-BP (Ren et al., Table 3: LG-FG-A
30.68 % test error, BP 33.62 %, L-BP 30.75 % after the paper's full schedule).

The same recipe as the MNIST table (batch 128, SGD momentum 0.9, warmup then cosine, weight
decay 1e-4 on the weights) plus random horizontal flips (``--augment hflip``), as the paper's
input pipeline has, through ``forwardonly.train``. Every epoch appends a row to the CSV and
writes a checkpoint in the run's directory; a run resumes from its checkpoint, and
``--chunk N`` (the trainer's ``--stop-after``) stops after N epochs of the current call — so
a long schedule runs as a series of short calls (e.g. 10-minute GPU sessions):

    # CPU: a fixed small budget, in the background (one method per process, one per core)
    nohup nice -n 10 python -m benchmarks local-cifar --epochs 6 --methods lg-fg-a &
    nohup nice -n 10 python -m benchmarks local-cifar --epochs 6 --methods bp l-bp &
    # GPU: the paper-length schedule in chunks; repeat the same command until it is done
    python -m benchmarks local-cifar --device cuda --epochs 200 --chunk 20 --tag gpu200
    python -m benchmarks local-cifar --epochs 6 --report   # table + plot from the CSV

Results: ``benchmarks/results/local-cifar/<tag>.csv``, ``.md``, ``.png``; the run
directories of the library's loop under ``runs/``.
"""

from __future__ import annotations

import argparse
import csv

from benchmarks.common import add_data_dir, add_threads, set_threads
from benchmarks.local_common import PAPER, train_run
from benchmarks.report import Results

# peak learning rates: the MNIST sweep's choices (local-lr-sweep); no CIFAR sweep fits the CPU
LRS = {"bp": 0.1, "l-bp": 0.1, "lg-fg-a": 0.03}
TITLES = {"cpu6": "CIFAR-10, LocalMixer M/8/16: LG-FG-A against BP and L-BP",
          "cpu6-rademacher": "CIFAR-10, LocalMixer M/8/16: LG-FG-A with Rademacher tangents"}


def read_rows(csv_path) -> list[dict[str, str]]:
    """The CSV's rows, grouped by method (LG-FG-A, BP, L-BP, then any other), then by epoch:
    runs of several methods in parallel append their epochs interleaved."""
    rows = [r for r in csv.DictReader(csv_path.open())] if csv_path.exists() else []
    methods = dict.fromkeys(["lg-fg-a", "bp", "l-bp", *(r["method"] for r in rows)])
    order = {m: i for i, m in enumerate(methods)}
    return sorted(rows, key=lambda r: (order[r["method"]], int(r["epoch"])))


def report(csv_path, tag: str) -> str:
    rows = read_rows(csv_path)
    lines = [f"CIFAR-10, LocalMixer M/8/16 (run `{tag}`): test / train error (%) per epoch. "
             "Train error on the first 10,000 training images.", "",
             "| Method | epoch | test err | train err | train loss | epoch time (min) | "
             "paper (full schedule) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER.get(("M/8/16", r["method"]))
        lines.append(f"| {r['method'].upper()} | {r['epoch']}/{r['epochs']} | "
                     f"{float(r['test_error']):.2f} | {float(r['train_error']):.2f} | "
                     f"{float(r['train_loss']):.3f} | {float(r['epoch_seconds']) / 60:.1f} | "
                     f"{paper[0]:.2f} / {paper[1]:.2f} |")
    return "\n".join(lines) + "\n"


def plot(csv_path, png_path, tag: str) -> None:
    """Test and train error per epoch, one line per method, the paper's full-schedule test
    errors as dotted levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        epochs = [int(r["epoch"]) for r in mine]
        color = f"C{i}"
        ax.plot(epochs, [float(r["test_error"]) for r in mine], "o-", color=color,
                label=f"{method.upper()} test")
        ax.plot(epochs, [float(r["train_error"]) for r in mine], "o--", color=color,
                alpha=0.5, label=f"{method.upper()} train")
        paper = PAPER.get(("M/8/16", method))
        if paper:
            ax.axhline(paper[0], color=color, linestyle=":", linewidth=1)
    ax.set(xlabel="epoch", ylabel="error (%)")
    ax.set_title(f"CIFAR-10, LocalMixer M/8/16, run {tag}\n(dotted: the paper's test error "
                 "after its full schedule)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def arguments(name: str, ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--methods", nargs="+", default=["lg-fg-a", "bp", "l-bp"],
                    choices=list(LRS))
    ap.add_argument("--epochs", type=int, default=3, help="length of the cosine schedule")
    ap.add_argument("--chunk", type=int, default=None, help="stop after this many epochs")
    ap.add_argument("--warmup", type=float, default=None,
                    help="warmup epochs (default: 1, or 5 for schedules of 50+ epochs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--distribution", default="gaussian")
    ap.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tag", default=None, help="run name (CSV, run directories)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true",
                    help="only rewrite the markdown table and the plot from the CSV")
    add_threads(ap)
    add_data_dir(ap)


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    set_threads(args.threads)
    tag = args.tag or f"cpu{args.epochs}"
    warmup = args.warmup if args.warmup is not None else (5.0 if args.epochs >= 50 else 1.0)
    csv_path = res.path(f"{tag}.csv")
    title = TITLES.get(tag, f"CIFAR-10, LocalMixer M/8/16, run {tag}")

    def write() -> None:
        res.write(tag, [], title=title, text=report(csv_path, tag), csv_rows=False)
        plot(csv_path, res.png(tag), tag)

    for method in [] if args.report else args.methods:
        train_run(preset="M/8/16", method=method, dataset="cifar10", data_dir=args.data_dir,
                  epochs=args.epochs, lr=LRS[method], warmup_epochs=warmup, seed=args.seed,
                  distribution=args.distribution, device=args.device, csv_path=csv_path,
                  run_dir=res.run_dir(f"{tag}_{method}"), stop_after=args.chunk,
                  augment=["hflip"] if args.flip else [], extra={"tag": tag})
        write()
    write()
