"""The device check: what ``benchmarks/device_check.sh`` runs, one stage per call.

    python -m benchmarks.device_check env        --out DIR [--smoke]
    python -m benchmarks.device_check throughput --out DIR [--smoke] [--budget S]
    python -m benchmarks.device_check cifar      --out DIR [--smoke] [--budget S]
    python -m benchmarks.device_check summary    --out DIR

Stages (the test suite and the ``torchrun`` run are started by the shell script itself):

- ``env``: GPU name, torch / CUDA / cuDNN / NCCL / Python versions, date -> ``env.json``.
- ``throughput``: images/s and peak ``torch.cuda.max_memory_allocated`` per method on
  LocalMixer M/8/16 and L/8/64 (bp, l-bp, lg-fg-a, fg-a, lg-fg-w, fg-w), Forward-Forward 4×2000
  (with backprop on an MLP of the same widths as its reference), and an MLP 2×1024 (bp, fg-w,
  fg-a, zo); at batch 128 eager, then the largest batch that fits (doubling, eager), then
  batch 128 compiled (``torch.compile`` of every method's step alike), each phase
  time-boxed; ratios to bp of the same group, batch and mode -> ``throughput.csv`` (one row
  appended as each is measured, so a stopped stage keeps what it measured).
- ``cifar``: one resumable chunk of the CIFAR-10 M/8/16 schedule (200 epochs, the paper's
  settings as in ``benchmarks/local_cifar.py``) for lg-fg-a and bp, continuing the runs kept
  in ``benchmarks/results/gpu-cifar/`` (``cifar-<method>.tar``: the run directory with its
  checkpoint); new epochs run while the time box allows another one. Writes ``cifar.csv`` and
  ``cifar-<method>.tar`` under DIR: copy them back into ``benchmarks/results/gpu-cifar/``
  and commit, and the next GPU session continues from there.
- ``summary``: ``summary.md`` from what the stages left.

``--smoke`` runs every stage on the CPU at tiny sizes (a 2-block LocalMixer on 8×8 inputs,
batch 8, a few steps, the embedded digits in place of CIFAR-10), so the script is known to
work before a GPU sees it. Everything written goes under ``--out DIR``; what stays there at
the end is at most 8 files (what the device machine hands back): ``summary.md``,
``summary.json``, ``device_check.log``, ``tests.log``, ``throughput.csv``, ``cifar.csv``,
``cifar-lg-fg-a.tar``, ``cifar-bp.tar``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # the library from this checkout, installed or not
    sys.path.insert(0, str(REPO / "src"))

from forwardonly.estimators import make_estimator  # noqa: E402
from forwardonly.models import build_model  # noqa: E402
from forwardonly.train.worker import speed_up  # noqa: E402

#: Where the CIFAR-10 chunks persist between GPU sessions (committed).
CIFAR_HOME = REPO / "benchmarks" / "results" / "gpu-cifar"
CIFAR_METHODS = ("lg-fg-a", "bp")
CIFAR_EPOCHS = 200
LOCAL_METHODS = ("bp", "l-bp", "lg-fg-a", "fg-a", "lg-fg-w", "fg-w")


# -- environment ---------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported())
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info["nccl"] = f"unavailable ({exc})"
    try:
        import forwardonly

        info["forwardonly"] = forwardonly.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


# -- throughput ----------------------------------------------------------------------------
def rows_to_measure(smoke: bool) -> list[dict[str, Any]]:
    """(group, model, options, input shape, method) of every throughput row."""
    if smoke:
        mixer = [("LocalMixer tiny", {"preset": "tiny", "blocks": 2})]
        ff_widths, mlp_widths, shape, mnist = [16] * 4, [32, 32], (3, 8, 8), (1, 8, 8)
    else:
        mixer = [("LocalMixer M/8/16", {"preset": "M/8/16"}),
                 ("LocalMixer L/8/64", {"preset": "L/8/64"})]
        ff_widths, mlp_widths, shape, mnist = [2000] * 4, [1024, 1024], (3, 32, 32), (1, 28, 28)
    rows = [{"group": g, "model": "local-mixer", "options": o, "shape": shape, "method": m}
            for g, o in mixer for m in LOCAL_METHODS]
    ff = f"FF {len(ff_widths)}x{ff_widths[0]}"
    rows += [{"group": ff, "model": "ff-mlp", "options": {"widths": ff_widths},
              "shape": mnist, "method": "ff"},
             {"group": ff, "model": "mlp", "options": {"widths": ff_widths}, "shape": mnist,
              "method": "bp"}]
    mlp = f"MLP {len(mlp_widths)}x{mlp_widths[0]}"
    rows += [{"group": mlp, "model": "mlp", "options": {"widths": mlp_widths}, "shape": mnist,
              "method": m} for m in ("bp", "fg-w", "fg-a", "zo")]
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(row: dict[str, Any], batch: int, *, compiled: bool, device: torch.device,
            warmup: int, steps: int, precision: str = "float32") -> dict[str, Any]:
    """Images/s and peak memory of ``steps`` training steps (SGD) after ``warmup`` ones."""
    torch.manual_seed(0)
    model = build_model(row["model"], row["shape"], 10, **row["options"]).to(device)
    est = make_estimator(row["method"], model, F.cross_entropy, seed=0)
    speed_up(est, compile=compiled, precision=precision, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *row["shape"], device=device, generator=gen)
    y = torch.randint(0, 10, (batch,), device=device, generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        est.step(x, y)
        opt.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    return {"images_per_s": round(batch * steps / seconds, 1),
            "step_ms": round(1e3 * seconds / steps, 3), "peak_mib": round(peak, 1),
            "warmup_s": round(warm_s, 2)}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def throughput(out: Path, smoke: bool, budget: float, precision: str, log) -> None:
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # speed, as users train
        torch.backends.cudnn.allow_tf32 = True
    start = time.monotonic()
    deadline = start + budget
    base_batch, max_batch = (8, 32) if smoke else (128, 32768)
    warmup, steps = (1, 2) if smoke else (3, 10)
    csv_path = out / "throughput.csv"
    fields = ["group", "method", "mode", "precision", "batch", "images_per_s", "step_ms",
              "peak_mib", "warmup_s", "ratio_images_per_s_to_bp", "ratio_peak_mib_to_bp",
              "status", "device"]
    with csv_path.open("w", newline="") as fh:
        csv.DictWriter(fh, fieldnames=fields).writeheader()
    bp_ref: dict[tuple[str, str, int], dict[str, Any]] = {}

    def record(row: dict[str, Any], mode: str, batch: int, result: dict[str, Any]) -> None:
        key = (row["group"], mode, batch)
        if row["method"] == "bp" and result.get("status") == "ok":
            bp_ref[key] = result
        ref = bp_ref.get(key)
        line = {"group": row["group"], "method": row["method"], "mode": mode,
                "precision": precision, "batch": batch, "device": str(device), **result}
        if ref and result.get("status") == "ok":
            line["ratio_images_per_s_to_bp"] = round(
                result["images_per_s"] / ref["images_per_s"], 3)
            if not math.isnan(ref["peak_mib"]):
                line["ratio_peak_mib_to_bp"] = round(result["peak_mib"] / ref["peak_mib"], 3)
        with csv_path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore").writerow(line)
        shown = {k: line.get(k) for k in ("images_per_s", "peak_mib",
                                          "ratio_images_per_s_to_bp", "status")}
        log(f"  {row['group']:<18} {row['method']:<8} {mode:<8} b{batch:<6} {shown}")

    def attempt(row: dict[str, Any], mode: str, batch: int, phase_end: float) -> bool:
        if time.monotonic() > phase_end:
            record(row, mode, batch, {"status": "skipped (time box)"})
            return False
        try:
            result = measure(row, batch, compiled=mode == "compiled", device=device,
                             warmup=warmup + (3 if mode == "compiled" else 0), steps=steps,
                             precision=precision)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record(row, mode, batch, {**result, "status": "ok"})
            return True
        except Exception as exc:  # noqa: BLE001 - one row's failure is that row's result
            if device.type == "cuda":
                torch.cuda.empty_cache()
            status = "out of memory" if _is_oom(exc) else \
                f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
            record(row, mode, batch, {"status": status})
            return False

    rows = rows_to_measure(smoke)
    # bp first in each group, so every other row has its reference
    rows.sort(key=lambda r: (r["group"], r["method"] != "bp"))
    log(f"throughput on {device}: {len(rows)} rows; budget {budget:.0f}s")
    # phase 1: batch base, eager (cheap: every row)
    for row in rows:
        attempt(row, "eager", base_batch, deadline)
    # phase 2: the largest batch that fits (eager, doubling), within 40% of what is left
    phase_end = time.monotonic() + 0.4 * max(0.0, deadline - time.monotonic())
    for row in rows:
        batch, largest = base_batch, None
        while batch * 2 <= max_batch and time.monotonic() < phase_end:
            batch *= 2
            if not attempt(row, "eager", batch, phase_end):
                break
            largest = batch
        log(f"  {row['group']} {row['method']}: largest batch run {largest or base_batch}")
    # phase 3: compiled at batch base, most informative first (bp and lg-fg-a of M/8/16)
    order = sorted(rows, key=lambda r: (r["group"] != "LocalMixer M/8/16",
                                        r["method"] not in ("bp", "lg-fg-a"), r["group"]))
    if smoke:  # compiling takes seconds per row on a CPU: one row shows the path works
        order = [r for r in rows if r["group"].startswith("MLP") and r["method"] == "bp"]
    for row in order:
        attempt(row, "compiled", base_batch, deadline)
    log(f"throughput done in {time.monotonic() - start:.0f}s -> {csv_path}")


# -- CIFAR-10 chunk ------------------------------------------------------------------------
class _TimeBox(Exception):
    """Raised from the trainer's log after an epoch (its checkpoint written) to end a chunk."""


def cifar(out: Path, smoke: bool, budget: float, data_dir: str | None, home: Path,
          log) -> None:
    from benchmarks.local_cifar import LRS
    from benchmarks.local_common import train_run

    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    work = out / "work" / "cifar"
    work.mkdir(parents=True, exist_ok=True)
    csv_path = out / "cifar.csv"
    if (home / "cifar.csv").is_file():
        shutil.copy(home / "cifar.csv", csv_path)
    dataset, preset, epochs = ("digits", "tiny", 4) if smoke else ("cifar10", "M/8/16",
                                                                   CIFAR_EPOCHS)
    if not smoke:
        found = _find_cifar(data_dir)
        if found is None:
            log("cifar: SKIPPED: no CIFAR-10 files (data_batch_1.bin[.gz] ...) under "
                "--data-dir, $FORWARDONLY_DATA, shared/data or ../shared/data")
            return
        data_dir = str(found)
    per_method = budget / len(CIFAR_METHODS)
    for method in CIFAR_METHODS:
        run_dir = work / method
        archive = home / f"cifar-{method}.tar"
        if archive.is_file() and not run_dir.exists():
            with tarfile.open(archive) as tar:
                tar.extractall(work, filter="data")
            log(f"cifar {method}: continuing the run kept in {archive}")
        t0 = time.monotonic()
        epoch_s: list[float] = []

        def on_epoch(message: str, t0: float = t0, epoch_s: list[float] = epoch_s,
                     method: str = method) -> None:
            log(f"cifar {message}")
            if "loss" in message and "test err" in message:  # an epoch's line: checkpointed
                epoch_s.append(time.monotonic() - t0 - sum(epoch_s))
                if time.monotonic() - t0 + max(epoch_s) > per_method:
                    raise _TimeBox

        try:
            train_run(preset=preset, method=method, dataset=dataset, data_dir=data_dir,
                      epochs=epochs, lr=LRS[method], warmup_epochs=5.0 if not smoke else 1.0,
                      seed=0, device=device, csv_path=csv_path, run_dir=run_dir,
                      train_eval=10_000 if not smoke else 200, augment=["hflip"],
                      extra={"tag": "gpu200" if not smoke else "smoke"}, log=on_epoch)
        except _TimeBox:
            log(f"cifar {method}: time box reached after {len(epoch_s)} epoch(s) of this call")
        with tarfile.open(out / f"cifar-{method}.tar", "w") as tar:
            tar.add(run_dir, arcname=method)
    log(f"cifar: rows in {csv_path}; archives cifar-<method>.tar in {out}")


def _find_cifar(data_dir: str | None) -> Path | None:
    roots = [data_dir, os.environ.get("FORWARDONLY_DATA"), REPO / "shared" / "data",
             REPO.parent / "shared" / "data"]
    for root in roots:
        if not root:
            continue
        for d in (Path(root), Path(root) / "cifar10"):
            if any((d / f"data_batch_1.bin{s}").is_file() for s in ("", ".gz")):
                return d
    return None


# -- summary -------------------------------------------------------------------------------
def summary(out: Path) -> None:
    """``summary.md`` and ``summary.json`` (environment, stages' exit status and seconds)."""
    lines = ["# forwardonly device check", ""]
    env_path, status = out / "work" / "env.json", out / "work" / "stages.tsv"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    stages = [dict(zip(("stage", "exit_status", "seconds"), line.split("\t"), strict=False))
              for line in (status.read_text().splitlines() if status.is_file() else [])]
    if stages:
        lines += ["| stage | exit status | seconds |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {s.get('exit_status')} | {s.get('seconds')} |"
                  for s in stages]
        lines.append("")
    (out / "summary.json").write_text(json.dumps({"environment": env, "stages": stages},
                                                 indent=1) + "\n")
    tput = out / "throughput.csv"
    if tput.is_file():
        rows = list(csv.DictReader(tput.open()))
        lines += ["## Throughput and peak memory", "",
                  "| group | method | mode | batch | images/s | peak MiB | × bp images/s | "
                  "× bp memory | status |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['group']} | {r['method']} | {r['mode']} | {r['batch']} | "
                         f"{r['images_per_s']} | {r['peak_mib']} | "
                         f"{r['ratio_images_per_s_to_bp']} | {r['ratio_peak_mib_to_bp']} | "
                         f"{r['status']} |")
        lines.append("")
    cif = out / "cifar.csv"
    if cif.is_file():
        rows = list(csv.DictReader(cif.open()))
        lines += ["## CIFAR-10 M/8/16 (200-epoch schedule), epochs done so far", "",
                  "| method | epoch | test err % | train err % | epoch s |",
                  "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['epoch']}/{r['epochs']} | {r['test_error']} | "
                         f"{r['train_error']} | {r['epoch_seconds']} |")
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device_check",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["env", "throughput", "cifar", "summary"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    ap.add_argument("--budget", type=float, default=180.0, help="seconds for this stage")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 folder or data root")
    ap.add_argument("--home", type=Path, default=None,
                    help="folder keeping the CIFAR-10 runs between sessions (default: "
                         "benchmarks/results/gpu-cifar; with --smoke: none)")
    args = ap.parse_args(argv)
    if args.home is None:
        args.home = args.out / "work" / "no-home" if args.smoke else CIFAR_HOME
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))

    def log(message: str) -> None:
        print(message, flush=True)

    if args.stage == "env":
        info = environment()
        (args.out / "work").mkdir(exist_ok=True)
        (args.out / "work" / "env.json").write_text(json.dumps(info, indent=1) + "\n")
        log(json.dumps(info))
    elif args.stage == "throughput":
        throughput(args.out, args.smoke, args.budget, args.precision, log)
    elif args.stage == "cifar":
        cifar(args.out, args.smoke, args.budget, args.data_dir, args.home, log)
    else:
        summary(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
