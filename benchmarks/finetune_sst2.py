"""Forward-only fine-tuning of a pretrained transformer: all-MiniLM-L6-v2 on SST-2.

``python -m benchmarks finetune-sst2 --section memory|speed|accuracy`` (no ``--section``: all
three). Every method is one entry of :data:`METHODS`, a set of ``forwardonly train`` options, so
the three sections measure the same configurations:

``memory``: peak resident set of one training step in a fresh process (``batch`` random token
ids of exactly ``length`` tokens, two steps, one thread, glibc's default malloc). Besides the
total it reports the step's own memory: the peak above the resident set once the imports, the
model, its estimator and optimizer exist (the high-water mark is reset there through
``/proc/self/clear_refs``, so loading the weights does not count as a step).

``speed``: one training step (estimate + optimizer update) of each method on its own copy of
the model, methods interleaved round by round in one process, thread count set; the median of
the per-round ratios to ``bp`` (full fine-tuning with AdamW) and their range.

``accuracy``: every run goes through the library's loop (:func:`benchmarks.common.fit`) in a
run directory under ``runs/`` (resumable), learning rate constant so that a run extended with
more epochs is the run that was always that long. For each method the candidate learning rates
train ``--sweep-epochs`` epochs; the one with the best dev accuracy there is continued to
``--epochs``; test accuracy is reported for that one only.

All rows go to ``finetune_sst2.csv`` with the columns of :data:`COLUMNS`; each section also
keeps its own table (``memory.csv``, ``speed.csv``, ``accuracy.csv``, ``sweep.csv``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import add_data_dir, fit
from benchmarks.core import _peak_kib
from benchmarks.report import REPO, Results, md_table, read_csv, write_csv

COLUMNS = ["method", "setting", "train_examples", "steps", "dev_accuracy", "test_accuracy",
           "peak_rss_mib", "inference_rss_mib", "seconds"]
LAST = ["encoder.encoder.layer.5.*", "head.*"]  # the last encoder layer and the head
# BitFit's subspace (Ben Zaken et al. 2022) and the LayerNorms: 31,490 parameters of 22.7 M
BITFIT = ["*.bias", "*LayerNorm*", "head.*"]
# the LayerNorms alone (9,984 parameters) and the head
LAYERNORM = ["*LayerNorm*", "head.*"]
# zeroth order on the last layer (rank-4 directions) with the exact head at 10x the rate
ZO_SUBSPACE: dict[str, Any] = {"method": "zo", "distribution": "lowrank", "exact_head": True,
                               "train_params": LAST, "optimizer": "adam",
                               "head_lr_scale": 10.0}
# label -> (forwardonly train options, candidate learning rates for the dev sweep)
METHODS: dict[str, tuple[dict[str, Any], list[float]]] = {
    "probe": ({"method": "bp", "optimizer": "adam", "train_params": ["head.*"]},
              [1e-3, 1e-2]),
    "bp": ({"method": "bp", "optimizer": "adam"}, [2e-5, 1e-4]),
    "zo": ({"method": "zo", "optimizer": "sgd-inplace"}, [1e-5, 1e-4]),
    # MeZO with the head trained exactly, in place: the head's exact gradient needs a far
    # larger rate than the zeroth-order estimate (1000x); only a head-sized .grad exists
    "zo exact-head": ({"method": "zo", "exact_head": True, "optimizer": "sgd-inplace",
                       "head_lr_scale": 1000.0}, [1e-5, 1e-4]),
    "fg-w": ({"method": "fg-w", "optimizer": "sgd-inplace"}, [1e-5, 1e-4]),
    # the head learns at 10x the body's rate: with lr 1e-3 it gets the probe's chosen 1e-2
    "zo subspace": (ZO_SUBSPACE, [1e-4, 1e-3]),
    # memory and speed only: "zo subspace" running its frozen prefix (embeddings, layers 0-4)
    # at every evaluation, as before the prefix was recorded and replayed (ESTIMATOR_OPTIONS)
    "zo subspace, no prefix reuse": (ZO_SUBSPACE, [1e-4, 1e-3]),
    "fg-w subspace": ({"method": "fg-w", "distribution": "lowrank", "exact_head": True,
                       "train_params": LAST, "optimizer": "adam", "head_lr_scale": 10.0},
                      [1e-4, 1e-3]),
    # forward gradient on the biases and LayerNorms of every layer (the exact head beside):
    # 1/57 of the last layer's dimensions, spread over the whole encoder
    "fg-w bitfit": ({"method": "fg-w", "exact_head": True, "train_params": BITFIT,
                     "optimizer": "adam"}, [1e-3, 3e-3]),
    # forward gradient on the LayerNorms alone: a third of BitFit's dimensions
    "fg-w layernorm": ({"method": "fg-w", "exact_head": True, "train_params": LAYERNORM,
                        "optimizer": "adam"}, [1e-3, 3e-3]),
    # backprop restricted to the same subspaces: what they reach with exact gradients
    "bp bitfit": ({"method": "bp", "optimizer": "adam", "train_params": BITFIT},
                  [1e-4, 1e-3]),
    "bp layernorm": ({"method": "bp", "optimizer": "adam", "train_params": LAYERNORM},
                     [1e-4, 1e-3]),
    # LP-FT (Kumar et al. 2022): start from the chosen linear probe's run ("init_from":
    # "probe" is resolved to it), then fine-tune the last layer and the head forward-only
    "zo subspace LP-FT": ({"method": "zo", "distribution": "lowrank", "exact_head": True,
                           "train_params": LAST, "optimizer": "adam", "init_from": "probe"},
                          [1e-4, 1e-3]),
    "fg-w subspace LP-FT": ({"method": "fg-w", "distribution": "lowrank", "exact_head": True,
                             "train_params": LAST, "optimizer": "adam", "init_from": "probe"},
                            [1e-4, 1e-3]),
    # memory and speed only (the estimate is fg-w's): the batch in two pieces of 8, the
    # tangents of one piece at a time
    "fg-w micro-batch": ({"method": "fg-w", "optimizer": "sgd-inplace", "micro_batch": 8},
                         [1e-5, 1e-4]),
    # memory and speed only by default: does a low-rank direction shrink fg-w's tangents?
    "fg-w lowrank": ({"method": "fg-w", "distribution": "lowrank", "optimizer": "sgd-inplace"},
                     [1e-5, 1e-4]),
}
# estimator options that have no `forwardonly train` flag, set on the built estimator
ESTIMATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "zo subspace, no prefix reuse": {"reuse_prefix": False},
}
ACCURACY_METHODS = ["probe", "bp", "zo", "zo exact-head", "fg-w", "zo subspace",
                    "fg-w subspace", "fg-w bitfit", "fg-w layernorm", "bp bitfit",
                    "bp layernorm", "zo subspace LP-FT", "fg-w subspace LP-FT"]
# memory and speed: an LP-FT variant's step is its plain variant's
STEP_METHODS = [label for label in METHODS if not label.endswith("LP-FT")]
FORWARD_ONLY = ["zo", "zo exact-head", "fg-w", "zo subspace", "fg-w subspace", "fg-w bitfit",
                "fg-w layernorm", "zo subspace LP-FT", "fg-w subspace LP-FT"]


def describe(label: str) -> str:
    """The method's options as ``forwardonly train`` flags."""
    opts = METHODS[label][0]
    parts = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif key == "init_from":
            parts.append(f"{flag} RUN (the chosen linear probe's run)")
        elif isinstance(value, list):
            parts.append(flag + " " + " ".join(f"'{v}'" for v in value))
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    parts += [f"(estimator option {key}={value!r})"
              for key, value in ESTIMATOR_OPTIONS.get(label, {}).items()]
    return " ".join(parts)


# -- building one method's step (memory and speed) ------------------------------------------

def step_config(label: str, args: argparse.Namespace, lr: float = 1e-5) -> Any:
    from forwardonly.config import from_dict

    opts, _ = METHODS[label] if label != "inference" else ({"method": "bp"}, [])
    return from_dict({"dataset": "sst2", "model": args.model, "model_path": args.model_path,
                      "lr": lr, "seed": 0, "threads": 1, "progress": False, **opts})


def build_step(label: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, step)`` for ``label``: ``step(x, y)`` is one training step as the library's
    loop takes it (estimate + optimizer update; ``sgd-inplace``: the estimator's in-place
    update), or a no-grad forward pass and loss for ``inference``."""
    import torch.nn.functional as F

    from forwardonly.models import build_model
    from forwardonly.train.builders import estimator_for, freeze_except, make_optimizer

    cfg = step_config(label, args)
    torch.manual_seed(0)
    model = build_model(cfg.model, (args.length,), 2, **cfg.model_options())
    if label == "inference":
        model.eval()

        def infer(x: torch.Tensor, y: torch.Tensor) -> None:
            with torch.no_grad():
                F.cross_entropy(model(x), y)
        return model, infer
    freeze_except(model, cfg.train_params)
    est = estimator_for(cfg, model)
    for key, value in ESTIMATOR_OPTIONS.get(label, {}).items():
        if not hasattr(est, key):
            raise AttributeError(f"{label}: the {cfg.method} estimator has no option {key!r}")
        setattr(est, key, value)
    opt = make_optimizer(cfg, model)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if cfg.optimizer == "sgd-inplace":  # no gradient buffer (MeZO)
            est.sgd_step(x, y, cfg.lr)
        else:
            opt.zero_grad(set_to_none=False)
            est.step(x, y)
            opt.step()
    return model, step


def fixed_batch(model: Any, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` rows of exactly ``length`` random non-special token ids, and labels."""
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.encoder.config.vocab_size)
    low = min(1000, vocab // 2)  # past the special tokens of BERT-style vocabularies
    x = torch.randint(low, vocab, (batch, length), generator=gen)
    return x, torch.randint(0, 2, (batch,), generator=gen)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return _peak_kib()


def _reset_peak() -> bool:
    """Reset the high-water mark (``VmHWM``) to the current resident set; False if the
    kernel does not allow it (then the peak includes loading the model)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(label: str, args: argparse.Namespace) -> None:
    """In a fresh process: imports, the model and its step, two steps; print the RSS (MiB)."""
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (the imports count as the baseline)

    import forwardonly.models.text  # noqa: F401

    imports = _rss_kib()
    model, step = build_step(label, args)
    x, y = fixed_batch(model, args.batch, args.length)
    gc.collect()
    reset = _reset_peak()
    ready = _rss_kib()
    for _ in range(2):
        step(x, y)
    print(json.dumps({"imports_mib": imports / 1024, "ready_mib": ready / 1024,
                      "peak_mib": _peak_kib() / 1024, "peak_reset": reset}))


def memory(args: argparse.Namespace, res: Results) -> list[dict[str, Any]]:
    labels = ["inference", *(args.methods or STEP_METHODS)]
    rows = []
    for label in labels:
        cmd = [sys.executable, "-m", "benchmarks.finetune_sst2", "memory-child", label,
               "--model", args.model, "--batch", str(args.batch), "--length", str(args.length)]
        if args.model_path:
            cmd += ["--model-path", args.model_path]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "src"),
                                                        env.get("PYTHONPATH")) if p)
        runs = []
        for _ in range(args.repeats):  # fresh processes; the median of each figure
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"memory measurement of {label} failed:\n"
                                   f"{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = {k: statistics.median(q[k] for q in runs) for k in ("imports_mib", "ready_mib")}
        r["peak_mib"] = statistics.median(q["peak_mib"] for q in runs)
        r["step_mib"] = statistics.median(q["peak_mib"] - q["ready_mib"] for q in runs)
        r["peak_reset"] = all(q["peak_reset"] for q in runs)
        spread = [round(q["peak_mib"], 1) for q in runs]
        rows.append({"method": label, "options": "" if label == "inference" else describe(label),
                     "batch": args.batch, "length": args.length,
                     "imports_mib": round(r["imports_mib"], 1),
                     "ready_mib": round(r["ready_mib"], 1),
                     "peak_mib": round(r["peak_mib"], 1),
                     "step_mib": round(r["step_mib"], 1),
                     "peak_reset": r["peak_reset"], "repeats": args.repeats,
                     "peak_min": min(spread), "peak_max": max(spread)})
        print(rows[-1], flush=True)
    inf = rows[0]
    for r in rows:
        r["peak_ratio"] = round(r["peak_mib"] / inf["peak_mib"], 3)
        r["step_ratio"] = round(r["step_mib"] / inf["step_mib"], 2) if inf["step_mib"] > 0 else ""
    table = [[r["method"], r["imports_mib"], r["ready_mib"],
              f"{r['peak_mib']} ({r['peak_min']}–{r['peak_max']})",
              f"{r['peak_ratio']}×", r["step_mib"], f"{r['step_ratio']}×"] for r in rows]
    text = (f"`--model {args.model}`, batch {args.batch} × {args.length} tokens, one thread, "
            f"glibc's default malloc, {args.repeats} fresh processes per method (medians; "
            "the peak's range over them in brackets), each: imports (torch, transformers, "
            "forwardonly), then the model with its estimator and optimizer (*ready*), then two "
            "training steps. *peak* is the total resident set (what the operating system "
            "sees); *step* is the peak above *ready* (the step's working memory plus what it "
            "allocates for good: gradients, optimizer moments). Target: zo and fg-w "
            "in place (`--optimizer sgd-inplace`) ≤ 1.1× inference's peak.\n\n"
            + md_table(["method", "after imports MiB", "ready MiB", "peak MiB (range)",
                        "peak × inference", "step MiB", "step × inference"], table)
            + "\n\n" + memory_verdict(rows) + "\n\nOptions per method: "
            + "; ".join(f"*{r['method']}*: `{r['options']}`" for r in rows[1:]) + ".")
    res.write("memory", rows, title=f"Fine-tuning MiniLM: peak memory of one training step "
              f"(batch {args.batch} × {args.length} tokens)", text=text,
              notes={"section": "memory"})
    return rows


def memory_verdict(rows: list[dict[str, Any]]) -> str:
    out = []
    for label in ("zo", "fg-w", "fg-w micro-batch"):
        r = next((q for q in rows if q["method"] == label), None)
        if r is not None:
            met = "met" if r["peak_ratio"] <= 1.1 else "not met"
            out.append(f"{label} in place: {r['peak_ratio']}× inference's peak ({met}); its "
                       f"step's own memory {r['step_ratio']}× inference's")
    bp = next((q for q in rows if q["method"] == "bp"), None)
    if bp is not None:
        out.append(f"bp + AdamW: {bp['peak_ratio']}× (step {bp['step_ratio']}×)")
    return "Target ≤ 1.1×: " + "; ".join(out) + "." if out else ""


# -- speed ------------------------------------------------------------------------------------

def speed(args: argparse.Namespace, res: Results) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    labels = ["inference", *(args.methods or STEP_METHODS)]
    if "bp" not in labels:
        labels.append("bp")
    steppers, batch = {}, None
    for label in labels:  # each method on its own copy of the model
        model, step = build_step(label, args)
        batch = batch or fixed_batch(model, args.batch, args.length)
        steppers[label] = step
    assert batch is not None
    x, y = batch
    for step in steppers.values():  # warm-up
        step(x, y)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(args.rounds):
        for label, step in steppers.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            times[label].append((time.perf_counter() - t0) / args.steps)
    rows = []
    for label, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["bp"], strict=True)]
        rows.append({"method": label, "options": "" if label == "inference" else describe(label),
                     "threads": args.threads, "batch": args.batch, "length": args.length,
                     "median_s": round(statistics.median(ts), 4),
                     "ratio_to_bp": round(statistics.median(ratios), 3),
                     "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                     "rounds": args.rounds, "steps_per_round": args.steps})
    table = [[r["method"], f"{1e3 * r['median_s']:.0f}",
              f"{r['ratio_to_bp']}× ({r['ratio_min']}–{r['ratio_max']})"] for r in rows]
    text = (f"`--model {args.model}`, batch {args.batch} × {args.length} tokens, "
            f"{args.threads} thread(s): one training step (gradient estimate and the optimizer "
            "update; *inference* = a no-grad forward pass and loss), each method on its own "
            f"copy of the model, methods interleaved round by round, median over {args.rounds} "
            f"rounds of {args.steps} step(s); the ratio is the median of the per-round ratios "
            "to bp (range over rounds).\n\n"
            + md_table(["method", "ms per step", "× bp (range)"], table))
    res.write("speed", rows, title=f"Fine-tuning MiniLM: step time against backprop (batch "
              f"{args.batch} × {args.length} tokens, {args.threads} thread)", text=text,
              notes={"section": "speed"})
    return rows


# -- accuracy ---------------------------------------------------------------------------------

def run_config(label: str, lr: float, epochs: int, per_class: int | None,
               args: argparse.Namespace, run_dir: Path, res: Results) -> Any:
    from forwardonly.config import from_dict

    opts, _ = METHODS[label]
    if opts.get("init_from") == "probe":  # the chosen probe run of this training set
        best = choose("probe", args.lrs or METHODS["probe"][1], per_class, args, res)
        if best is None:
            raise SystemExit(f"{label} starts from the linear probe: run --methods probe first")
        opts = {**opts, "init_from": str(res.run_dir(run_tag("probe", best, per_class, args)))}
    return from_dict({
        "dataset": "sst2", "data_dir": args.data_dir, "model": args.model,
        "model_path": args.model_path, "train_subset": per_class, "max_length": 128,
        "batch_size": args.batch, "epochs": epochs, "lr": lr, "schedule": "constant",
        "eval_batch_size": 32, "train_eval_size": 256, "threads": args.threads, "seed": 0,
        "epoch_size": args.full_epoch_size if per_class is None else None,
        "progress": False, "out": str(run_dir), **opts})


def run_tag(label: str, lr: float, per_class: int | None, args: argparse.Namespace) -> str:
    size = f"full-e{args.full_epoch_size}" if per_class is None else f"k{per_class}"
    return f"{size}-b{args.batch}-{label.replace(' ', '-')}-lr{lr:g}"


def done_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_to(label: str, lr: float, epochs: int, per_class: int | None,
             args: argparse.Namespace, res: Results) -> list[dict[str, Any]]:
    """Train (or continue) one run to ``epochs`` epochs; its metrics rows."""
    from forwardonly.train.fit import TrainingDiverged

    run_dir = res.run_dir(run_tag(label, lr, per_class, args))
    rows = done_rows(run_dir)
    if len(rows) >= epochs or (run_dir / "DIVERGED").is_file() or args.collect_only:
        return rows
    print(f"== {label} lr {lr:g}: epoch {len(rows)} -> {epochs} ({run_dir})", flush=True)
    cfg = run_config(label, lr, epochs, per_class, args, run_dir, res)
    try:
        return fit(cfg, resume=(run_dir / "checkpoint.pt").is_file()).rows
    except TrainingDiverged as exc:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "DIVERGED").write_text(str(exc) + "\n")
        print(f"   diverged: {exc}", flush=True)
        return done_rows(run_dir)


def accuracy(args: argparse.Namespace, res: Results) -> None:
    labels = args.methods or ACCURACY_METHODS
    sizes = [None if k == 0 else k for k in args.per_class]
    for per_class in sizes:
        for label in labels:
            lrs = args.lrs or METHODS[label][1]
            for lr in lrs:  # the sweep: every candidate for --sweep-epochs
                train_to(label, lr, sweep_epochs(per_class, args), per_class, args, res)
            best = choose(label, lrs, per_class, args, res)
            if best is not None:  # the chosen one, continued
                train_to(label, best, args.epochs, per_class, args, res)
            write_accuracy(args, res)  # after every method: partial results are kept
    write_accuracy(args, res)


def choose(label: str, lrs: list[float], per_class: int | None, args: argparse.Namespace,
           res: Results) -> float | None:
    """The candidate learning rate with the best dev accuracy after ``--sweep-epochs``."""
    scored = []
    for lr in lrs:
        rows = done_rows(res.run_dir(run_tag(label, lr, per_class, args)))
        if len(rows) >= sweep_epochs(per_class, args):
            scored.append((rows[sweep_epochs(per_class, args) - 1]["val_error"], lr))
    if len(scored) < len(lrs) and not scored:
        return None
    return min(scored)[1] if scored else None


def sweep_epochs(per_class: int | None, args: argparse.Namespace) -> int:
    """Epochs each candidate learning rate trains before the choice on dev."""
    return args.full_sweep_epochs if per_class is None else args.sweep_epochs


def steps_per_epoch(per_class: int | None, args: argparse.Namespace) -> int:
    n = args.full_epoch_size if per_class is None else 2 * per_class
    return math.ceil(n / args.batch)


def write_accuracy(args: argparse.Namespace, res: Results) -> None:
    """The sweep and result tables from what the run directories hold now."""
    sweep, final = [], []
    for per_class in [None if k == 0 else k for k in args.per_class]:
        n_train = 67349 if per_class is None else 2 * per_class
        spe = steps_per_epoch(per_class, args)
        for label in METHODS:
            lrs = args.lrs or METHODS[label][1]
            best = choose(label, lrs, per_class, args, res)
            for lr in lrs:
                run_dir = res.run_dir(run_tag(label, lr, per_class, args))
                rows = done_rows(run_dir)
                diverged = (run_dir / "DIVERGED").is_file()
                if not rows and not diverged:
                    continue
                swept = min(sweep_epochs(per_class, args), len(rows))
                at = rows[swept - 1] if rows else None
                sweep.append({"method": label, "train_examples": n_train, "lr": lr,
                              "steps": swept * spe,
                              "dev_accuracy": "" if at is None else
                              round(100 * (1 - at["val_error"]), 2),
                              "diverged": diverged, "chosen": lr == best})
                if lr != best:
                    continue
                last = rows[-1]
                final.append({
                    "method": label, "setting": f"lr {lr:g}, batch {args.batch}, "
                    f"{len(rows)} epoch(s); {describe(label)}",
                    "train_examples": n_train, "steps": len(rows) * spe,
                    "dev_accuracy": round(100 * (1 - last["val_error"]), 2),
                    "test_accuracy": round(100 * (1 - last["test_error"]), 2),
                    "seconds": round(sum(r["seconds"] for r in rows), 1)})
    if not sweep:
        print("no accuracy runs yet")
        return
    write_csv(res.path("sweep.csv"), sweep)
    sweep_md = md_table(["method", "train examples", "lr", "steps", "dev accuracy %",
                         "chosen"],
                        [[r["method"], r["train_examples"], f"{r['lr']:g}", r["steps"],
                          "diverged" if r["diverged"] else r["dev_accuracy"],
                          "✓" if r["chosen"] else ""] for r in sweep])
    table = md_table(["method", "train examples", "steps", "dev accuracy %", "test accuracy %",
                      "train seconds", "setting"],
                     [[r["method"], r["train_examples"], r["steps"], r["dev_accuracy"],
                       r["test_accuracy"], r["seconds"], r["setting"]] for r in final])
    text = ("all-MiniLM-L6-v2 (mean pooling, linear head) on SST-2 through the library's loop: "
            f"batch {args.batch}, constant learning rate, dropout off, one thread, seed 0. dev = "
            "GLUE dev (872, the validation split: learning rates are chosen on it); test = the "
            "1,821 labelled test sentences, reported for the chosen learning rate only. *steps* "
            "= optimizer steps taken (the budget differs per method: each ran what fitted "
            "this 2-core machine; runs continue with `--resume`). Train seconds exclude "
            "evaluation.\n\n" + table + "\n\n" + accuracy_verdict(final, sweep) + "\n\n"
            f"Learning-rate sweep (dev accuracy after {args.sweep_epochs} epoch(s) on K per "
            f"class, {args.full_sweep_epochs} epoch(s) of {args.full_epoch_size} examples on "
            "the full set; the ✓ row was continued):\n\n" + sweep_md)
    res.write("accuracy", final, title="Fine-tuning MiniLM on SST-2: dev and test accuracy "
              "at a stated step budget", text=text, notes={"section": "accuracy"})
    combine(res)


def accuracy_verdict(final: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> str:
    """The targets per training-set size. bp is taken at its best dev accuracy in any of its
    runs (the chosen one, or a sweep candidate that did better): the stricter yardstick."""
    lines = []
    for n in sorted({r["train_examples"] for r in final}):
        rows = {r["method"]: r for r in final if r["train_examples"] == n}
        fo = [rows[m] for m in FORWARD_ONLY if m in rows]
        if not fo or "probe" not in rows or "bp" not in rows:
            continue
        best = max(fo, key=lambda r: r["dev_accuracy"])
        probe = rows["probe"]["dev_accuracy"]
        bp_runs = [r["dev_accuracy"] for r in sweep if r["method"] == "bp"
                   and r["train_examples"] == n and r["dev_accuracy"] != ""]
        bp = max([rows["bp"]["dev_accuracy"], *bp_runs])
        gain, gap = best["dev_accuracy"] - probe, bp - best["dev_accuracy"]
        lines.append(
            f"{n} training examples: best forward-only on dev = *{best['method']}* "
            f"{best['dev_accuracy']}% after {best['steps']} steps; linear probe {probe}%, bp "
            f"{bp}% (its best dev accuracy in any run). Beats the probe by ≥ 3 points: "
            f"{'met' if gain >= 3 else 'not met'} ({gain:+.2f}); within 2 points of bp: "
            f"{'met' if gap <= 2 else 'not met'} (gap {gap:.2f}).")
    return "\n\n".join(lines)


def combine(res: Results) -> None:
    """``finetune_sst2.csv``: every section's rows in one set of columns."""
    mem = {r["method"]: r for r in read_csv(res.dir / "memory.csv")}
    inf = mem.get("inference")
    rows = []
    for r in read_csv(res.dir / "memory.csv"):
        rows.append({"method": r["method"], "setting": f"memory of one step, batch {r['batch']}"
                     f" x {r['length']} tokens; step above ready {r['step_mib']} MiB "
                     f"({r['step_ratio']}x inference)", "peak_rss_mib": r["peak_mib"],
                     "inference_rss_mib": inf["peak_mib"] if inf else ""})
    for r in read_csv(res.dir / "speed.csv"):
        rows.append({"method": r["method"], "setting": f"step time, batch {r['batch']} x "
                     f"{r['length']} tokens, {r['threads']} thread(s): {r['ratio_to_bp']}x bp "
                     f"({r['ratio_min']}-{r['ratio_max']})",
                     "steps": int(r["rounds"]) * int(r["steps_per_round"]),
                     "seconds": r["median_s"]})
    for r in read_csv(res.dir / "accuracy.csv"):
        m = mem.get(r["method"])
        rows.append({**r, "peak_rss_mib": m["peak_mib"] if m else "",
                     "inference_rss_mib": inf["peak_mib"] if m and inf else ""})
    write_csv(res.path("finetune_sst2.csv"), [{c: r.get(c, "") for c in COLUMNS} for r in rows])


# -- command line -----------------------------------------------------------------------------

def arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--section", choices=["memory", "speed", "accuracy"], action="append",
                   help="what to measure (repeatable; default: memory, speed, accuracy)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="methods (default: all; speed adds bp, memory inference)")
    p.add_argument("--model", default="minilm", help="minilm, or hf with --model-path")
    p.add_argument("--model-path", default=None)
    p.add_argument("--batch", type=int, default=16, help="batch size (every section)")
    p.add_argument("--length", type=int, default=64,
                   help="tokens per example in the memory and speed sections")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=3,
                   help="memory: fresh processes per method (the median is reported)")
    p.add_argument("--rounds", type=int, default=5, help="speed: rounds")
    p.add_argument("--steps", type=int, default=2, help="speed: steps per method per round")
    p.add_argument("--per-class", type=int, nargs="+", default=[512],
                   help="accuracy: training examples per class (0 = the full training set)")
    p.add_argument("--full-epoch-size", type=int, default=4096,
                   help="accuracy on the full training set (--per-class 0): examples per "
                        "epoch (--epoch-size; an evaluation every 256 steps at batch 16)")
    p.add_argument("--sweep-epochs", type=int, default=2,
                   help="accuracy: epochs each candidate learning rate trains before the "
                        "choice on dev")
    p.add_argument("--full-sweep-epochs", type=int, default=1,
                   help="accuracy: --sweep-epochs on the full training set (epochs of "
                        "--full-epoch-size examples)")
    p.add_argument("--epochs", type=int, default=10,
                   help="accuracy: epochs of the chosen learning rate (continued with resume)")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="accuracy: candidate learning rates (default: per method)")
    p.add_argument("--collect-only", action="store_true",
                   help="accuracy: tabulate the run directories as they are (no training)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: batch 2 x 8 tokens, 1 round of 1 step, 1 epoch of 2 steps on "
                        "2 examples per class, one learning rate (checks the wiring only)")
    add_data_dir(p)


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    if args.smoke:
        args.batch, args.length, args.rounds, args.steps, args.repeats = 2, 8, 1, 1, 1
        args.per_class, args.sweep_epochs, args.epochs = [2], 1, 1
        args.lrs = args.lrs or [1e-5]
    sections = args.section or ["memory", "speed", "accuracy"]
    if "memory" in sections:
        memory(args, res)
    if "speed" in sections:
        speed(args, res)
    if "accuracy" in sections:
        accuracy(args, res)
    combine(res)


if __name__ == "__main__":  # the fresh process of one memory measurement
    if sys.argv[1:2] != ["memory-child"]:
        raise SystemExit("run the benchmarks with: python -m benchmarks finetune-sst2")
    child = argparse.ArgumentParser()
    child.add_argument("label")
    child.add_argument("--model", default="minilm")
    child.add_argument("--model-path", default=None)
    child.add_argument("--batch", type=int, default=16)
    child.add_argument("--length", type=int, default=64)
    a = child.parse_args(sys.argv[2:])
    memory_child(a.label, a)
