"""Does reading directions from a noise table train as well as drawing them afresh?

``fg-w`` with ``--distribution gaussian`` (every step draws new Gaussian directions) against
``--distribution gaussian-table`` (each step's directions are a window of a table drawn once;
:mod:`forwardonly.autodiff.noise_table`) at several table sizes, with everything else equal:
the same recipe, the same seeds, each run through the library's loop. No setting is chosen
from the results (one fixed learning rate for all), so the test error is reported directly:
mean and standard deviation over seeds, with the final epoch's training loss.

    python -m benchmarks core-table-quality                     # digits, K = 1 and 8, ~5 min
    python -m benchmarks core-table-quality --dataset mnist --widths 256 256 --batch-size 64 \
        --lr 3e-4 --epochs 5 --seeds 3 --directions 1 --table-factors 4
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from benchmarks.common import add_data_dir, fit
from benchmarks.report import Results, md_table


def arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--widths", type=int, nargs="+", default=[32])
    p.add_argument("--directions", type=int, nargs="+", default=[1, 8])
    p.add_argument("--table-factors", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    add_data_dir(p)


def variants(factors: list[int]) -> list[tuple[str, dict[str, Any]]]:
    """(label, fg-w options): fresh Gaussian draws, then one table per factor."""
    return [("gaussian", {"distribution": "gaussian"})] + [
        (f"gaussian-table ×{f}", {"distribution": "gaussian-table", "table_factor": f})
        for f in factors]


def summary(label: str, k: int, runs: list[dict[str, float]]) -> dict[str, Any]:
    """One row: mean and standard deviation over the seeds' last epochs."""
    def stat(key: str, scale: float = 1.0) -> tuple[float, float]:
        values = [scale * r[key] for r in runs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return round(statistics.mean(values), 3), round(sd, 3)

    test, loss, sec = stat("test_error", 100.0), stat("train_loss"), stat("seconds")
    return {"directions": k, "distribution": label, "seeds": len(runs),
            "test_error_pct": test[0], "test_error_sd": test[1],
            "train_loss": loss[0], "train_loss_sd": loss[1], "epoch_seconds": sec[0]}


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    from forwardonly.config import from_dict

    rows = []
    for k in args.directions:
        for label, opts in variants(args.table_factors):
            last = []
            for seed in range(args.seeds):
                widths = "x".join(map(str, args.widths))
                tag = f"{args.dataset}-w{widths}-b{args.batch_size}-lr{args.lr:g}-k{k}-" \
                      f"{opts['distribution']}{opts.get('table_factor', '')}-s{seed}-" \
                      f"e{args.epochs}"
                run_dir = res.run_dir(tag)
                cfg = from_dict({
                    "dataset": args.dataset, "data_dir": args.data_dir, "model": "mlp",
                    "widths": args.widths, "method": "fg-w", "directions": k,
                    "optimizer": "adam", "lr": args.lr, "batch_size": args.batch_size,
                    "epochs": args.epochs, "seed": seed, "threads": args.threads,
                    "progress": False, "out": str(run_dir), **opts})
                done = fit(cfg, resume=(run_dir / "checkpoint.pt").is_file()).rows
                last.append({**done[-1], "seconds": sum(r["seconds"] for r in done) / len(done)})
            rows.append(summary(label, k, last))
            print(rows[-1], flush=True)
    arch = "-".join(map(str, ["in", *args.widths, 10]))
    table = [[r["directions"], r["distribution"],
              f"{r['test_error_pct']} ± {r['test_error_sd']}",
              f"{r['train_loss']} ± {r['train_loss_sd']}", r["epoch_seconds"]] for r in rows]
    text = (f"fg-w on {args.dataset}, MLP {arch}, Adam at lr {args.lr} (cosine), batch "
            f"{args.batch_size}, {args.epochs} epochs, seeds 0–{args.seeds - 1}, "
            f"{args.threads} thread(s); only the directions differ. *gaussian*: new Gaussian "
            "directions every step; *gaussian-table ×f*: each step's K directions are a "
            "window of a per-tensor table of f·K·n entries drawn once (n: the tensor's "
            "entries), at an offset from the step's seed. Mean ± standard deviation over the "
            "seeds of the last epoch's test error and mean training loss; *s/epoch* includes "
            "evaluation.\n\n" + md_table(
                ["K", "directions", "test error %", "train loss", "s/epoch"], table))
    res.write(f"table_quality_{args.dataset}", rows, text=text,
              title=f"Noise-table directions against fresh draws (fg-w, {args.dataset})")
