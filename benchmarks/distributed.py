"""Distributed benchmarks: bytes per step and step time, data parallel and pipeline stages.

    python -m benchmarks distributed --sections data      [--processes 1 2 4] [--steps 20]
    python -m benchmarks distributed --sections stages    [--stages 4] [--steps 12]
    python -m benchmarks distributed                      # both

Every measurement is a real ``torchrun --standalone`` group on this machine (gloo, one thread
per process) running the package's own workers on MNIST batches, with the MLP of the core
benchmarks (784-1024-1024-10, P = 1,863,690) for ``data`` and a deeper one (784-1024×4-10) cut
into pipeline stages for ``stages``. Results go to benchmarks/results/distributed/:

- ``data.csv`` / ``data.md``: seed-synchronized fg-w and zo vs DDP backprop, per process count:
  payload bytes each rank hands to collectives per step (counted at the calls, and in DDP's
  communication hook), the ring-algorithm wire bytes derived from them, and the median step
  time (rank 0, after warm-up). The global batch is fixed (strong scaling).
- ``stages.csv`` / ``stages.md``: a stage-sharded step, forward gradient vs backprop through
  the same stages: median step time and the bytes each stage sends to the next. (The
  ``timeline.*`` files hold an earlier per-phase timeline, recorded by a hook the workers no
  longer carry.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import add_data_dir
from benchmarks.report import REPO, Results, md_table

DATA_METHODS = [  # label, method, options
    ("bp (DDP)", "bp", {}),
    ("fg-w K=1", "fg-w", {"directions": 1}),
    ("fg-w K=16", "fg-w", {"directions": 16}),
    ("zo K=1", "zo", {"directions": 1}),
]
STAGE_METHODS = [("bp", "bp", {}), ("fg-w K=1", "fg-w", {"directions": 1}),
                 ("fg-w K=4 rank1", "fg-w", {"directions": 4, "distribution": "rank1"})]


# -- one rank (run by torchrun) -----------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    from forwardonly import build_model, load_dataset, make_estimator
    from forwardonly.data import standardize
    from forwardonly.distributed import DataParallelWorker, StageWorker

    torch.set_num_threads(1)
    options = json.loads(args.options)
    data = standardize(load_dataset("mnist", args.data_dir))
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train_x), generator=gen)
    w: Any = (DataParallelWorker if args.mode == "data" else StageWorker)("cpu", 300.0)
    w.start({"benchmark": args.mode})
    try:
        torch.manual_seed(0)
        model = build_model("mlp", (1, 28, 28), 10, widths=args.widths)
        params = sum(p.numel() for p in model.parameters())
        w.attach(model, lambda m: make_estimator(args.method, m, F.cross_entropy, seed=0,
                                                 **options))
        opt = torch.optim.SGD([p for p in w.module.parameters() if p.requires_grad], lr=1e-3)
        times, traffic = [], []
        for step in range(args.warmup + args.steps):
            idx = order[step * args.batch:(step + 1) * args.batch]
            w.barrier("step start")  # every rank starts the step together
            w.reset_traffic()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            w.step(data.train_x[idx], data.train_y[idx])
            opt.step()
            t1 = time.perf_counter()
            counts = w.reset_traffic()
            if step >= args.warmup:
                times.append(t1 - t0)
                traffic.append({op: vars(c) for op, c in counts.items()})
        result = {"rank": w.rank, "world": w.world_size, "times": times, "traffic": traffic,
                  "params": params, "timeline": [], "stages": w.describe().splitlines()}
    except BaseException as exc:
        w.finish(exc)
        raise
    w.finish(None)
    Path(f"{args.json}.{result['rank']}").write_text(json.dumps(result))


def launch(processes: int, mode: str, method: str, options: dict[str, Any],
           widths: list[int], batch: int, steps: int, warmup: int, data_dir: str | None
           ) -> list[dict[str, Any]]:
    """Run one torchrun group; every rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
               "--nproc-per-node", str(processes), "-m", "benchmarks.distributed", "worker",
               "--mode", mode, "--method", method, "--options", json.dumps(options),
               "--widths", *map(str, widths), "--batch", str(batch), "--steps", str(steps),
               "--warmup", str(warmup), "--json", out,
               *(["--data-dir", data_dir] if data_dir else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(processes)]


# -- data parallel: bytes and step time ---------------------------------------------------------
def wire_bytes(op: str, payload: int, world: int) -> float:
    """Bytes one rank sends on the wire for ``payload`` bytes with a ring algorithm."""
    if world == 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (world - 1) / world * payload  # reduce-scatter + all-gather
    if op == "all_gather":
        return (world - 1) * payload  # its own block travels to everyone
    return float(payload)


def data_section(a: argparse.Namespace, res: Results) -> None:
    rows = []
    for processes in a.processes:
        for label, method, options in DATA_METHODS:
            ranks = launch(processes, "data", method, options, [1024, 1024], a.batch, a.steps,
                           a.warmup, a.data_dir)
            r0 = ranks[0]
            per_step = r0["traffic"][-1]  # identical every step
            payload = sum(c["sent"] for c in per_step.values())
            wire = sum(wire_bytes(op, c["sent"], processes) for op, c in per_step.items())
            ops = ", ".join(f"{c['calls']}× {op}" for op, c in sorted(per_step.items()))
            rows.append({"method": label, "processes": processes, "global_batch": a.batch,
                         "params": r0["params"],
                         "step_ms": round(1e3 * statistics.median(r0["times"]), 2),
                         "payload_bytes_per_rank": payload,
                         "wire_bytes_per_rank_ring": round(wire),
                         "collectives": ops or "none"})
            print(rows[-1], flush=True)
    p = rows[0]["params"]
    text = (f"Payload = bytes each rank hands to collectives per step, counted at the calls "
            f"(DDP: in its communication hook); 4·P = {4 * p:,}. Wire = what a ring algorithm "
            f"sends per rank for that payload. Step time: median of {a.steps} steps on rank 0 "
            f"(one thread per process). This machine has {os.cpu_count()} CPU cores: with "
            "more processes than free cores the step time cannot fall; the byte counts do not "
            "depend on the machine.\n\n" + md_table(
                ["method", "processes", "step (ms)", "payload / rank / step (B)",
                 "wire / rank / step, ring (B)", "collectives per step"],
                [[r["method"], r["processes"], f"{r['step_ms']:.1f}",
                  f"{r['payload_bytes_per_rank']:,}", f"{r['wire_bytes_per_rank_ring']:,}",
                  r["collectives"]] for r in rows]))
    res.write("data", rows, title="Distributed data parallel: bytes per step and step time "
              f"(MLP 784-1024-1024-10, P = {p:,}; global batch {a.batch}; gloo on one machine)",
              text=text)


# -- stages: step time and bytes ---------------------------------------------------------------
def stages_section(a: argparse.Namespace, res: Results) -> None:
    widths = [1024] * 4
    rows, describe = [], []
    for label, method, options in STAGE_METHODS:
        ranks = launch(a.stages, "stages", method, options, widths, a.batch, a.steps,
                       a.warmup, a.data_dir)
        describe = ranks[0]["stages"]
        rows.append({"method": label, "stages": a.stages,
                     "step_ms": round(1e3 * statistics.median(ranks[0]["times"]), 3),
                     "bytes_sent_per_stage": [r["traffic"][-1].get("send", {}).get("sent", 0)
                                              for r in ranks]})
        print(rows[-1], flush=True)
    text = ("Stages: " + "; ".join(describe) + f".\n\nStep time: median of {a.steps} steps "
            "on rank 0 (one thread per process); bytes: what each stage sends to the next per "
            "step (activations, and tangents for forward gradient).\n\n" + md_table(
                ["method", "stages", "step (ms)", "bytes sent per stage per step"],
                [[r["method"], r["stages"], f"{r['step_ms']:.1f}",
                  " / ".join(f"{b:,}" for b in r["bytes_sent_per_stage"])] for r in rows]))
    res.write("stages", rows, title="Stage-sharded step: forward gradient vs backprop through "
              f"the same {a.stages} stages (MLP 784-1024×4-10, batch {a.batch}, gloo, one "
              "process per stage)", text=text)


def arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", nargs="+", choices=("data", "stages"),
                   default=["data", "stages"])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    add_data_dir(p)


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    if "data" in args.sections:
        data_section(args, res)
    if "stages" in args.sections:
        stages_section(args, res)


def worker_main() -> None:
    """One rank, started by torchrun (``python -m benchmarks.distributed worker ...``)."""
    p = argparse.ArgumentParser()
    p.add_argument("section", choices=("worker",))
    p.add_argument("--mode", choices=("data", "stages"), required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--options", default="{}")
    p.add_argument("--widths", type=int, nargs="+", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", required=True)
    worker(p.parse_args())


if __name__ == "__main__":
    worker_main()
