"""Seconds per MNIST epoch of Forward-Forward training, 784-1000-1000-1000 at batch 100.

The issue's yardstick: the best-known public PyTorch FF implementation takes 48 s per epoch
of this configuration on this machine; the target is 24 s. One epoch here is 600 steps of
``opt.zero_grad(); est.step(x, y); opt.step()`` over the 60,000 training images (supervised,
hard negatives with their neutral-label pass, the softmax head trained alongside, Adam), then
the test-set evaluation by trying all 10 labels, timed separately.

    python benchmarks/ff_speed.py                         # float32 and bfloat16, torch's threads
    python benchmarks/ff_speed.py --threads 1 --precision float32
    python benchmarks/ff_speed.py --negatives random --steps 200

Wall time depends on what else runs on the machine, so the process CPU time is printed too
(equal to wall time × threads on an idle machine), with the load average at the start. The
table also goes to ``benchmarks/out/ff/speed.md`` and ``speed.csv`` (for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from forwardonly.ff import FFNet, ForwardForward

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[1000, 1000, 1000])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--negatives", choices=("random", "hard"), default="hard")
    p.add_argument("--precision", nargs="+", default=["float32", "bfloat16"],
                   choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--steps", type=int, default=None, help="steps to time (default: one epoch)")
    p.add_argument("--no-eval", action="store_true", help="skip timing the test evaluation")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ff",
                   help="folder of speed.md / speed.csv")
    return p.parse_args(argv)


def load(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """MNIST train images, labels, test images; random stand-ins if the files are missing."""
    try:
        from forwardonly.data import load_dataset

        ds = load_dataset("mnist", data_dir)
        return ds.train_x, ds.train_y, ds.test_x, "MNIST"
    except Exception as err:  # speed does not depend on pixel values
        g = torch.Generator().manual_seed(0)
        print(f"(MNIST not loaded: {err}; timing on random images of the same shape)")
        return (torch.rand(60000, 1, 28, 28, generator=g),
                torch.randint(0, 10, (60000,), generator=g),
                torch.rand(10000, 1, 28, 28, generator=g), "random")


def time_epoch(args: argparse.Namespace, precision: str, data) -> dict[str, float]:
    train_x, train_y, test_x, _ = data
    net = FFNet((1, 28, 28), 10, args.widths, precision=precision, seed=0)
    est = ForwardForward(net, ff_negatives=args.negatives, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    B = args.batch_size
    steps = args.steps or len(train_y) // B
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))

    def step(i: int) -> None:
        idx = order[(i * B) % len(train_y) : (i * B) % len(train_y) + B]
        opt.zero_grad()
        est.step(train_x[idx], train_y[idx])
        opt.step()

    for i in range(5):  # warm-up: allocator, kernels
        step(i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    scale = (len(train_y) // B) / steps  # per full epoch
    out = {"epoch_wall_s": wall * scale, "epoch_cpu_s": cpu * scale,
           "ms_per_step": 1e3 * wall / steps}
    if not args.no_eval:
        t = time.perf_counter()
        with torch.no_grad():
            for chunk in test_x.split(1000):
                net(chunk).argmax(-1)
        out["eval_wall_s"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load(args.data_dir)
    load1, load5, _ = os.getloadavg()
    widths = "-".join(str(w) for w in [784, *args.widths])
    lines = [
        f"FF {widths}, batch {args.batch_size}, {args.negatives} negatives, {data[3]} data, "
        f"{torch.get_num_threads()} torch thread(s), load average {load1:.1f} / {load5:.1f} "
        f"on {os.cpu_count()} CPUs at the start. Yardstick: the best-known public PyTorch "
        "implementation takes 48 s per epoch of this configuration here; target 24 s. "
        "Command: `python benchmarks/ff_speed.py "
        + (f"--threads {args.threads}" if args.threads else "") + "`.",
        "",
        "| precision | s / epoch (wall) | CPU s / epoch | ms / step | test eval s (wall) |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for precision in args.precision:
        r = time_epoch(args, precision, data)
        rows.append({"precision": precision, **r})
        ev = f"{r['eval_wall_s']:.1f}" if "eval_wall_s" in r else "—"
        lines.append(f"| {precision} | {r['epoch_wall_s']:.1f} | {r['epoch_cpu_s']:.1f} | "
                     f"{r['ms_per_step']:.1f} | {ev} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")
    with (args.out / "speed.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
