"""``forwardonly`` command line: train | eval | compare | experiment.

Examples::

    forwardonly train --dataset digits --method fg-w --epochs 2 --out runs/demo
    forwardonly train --config configs/mnist-fgw.yaml --seed 1
    forwardonly train --out runs/demo --resume
    forwardonly eval runs/demo
    forwardonly compare --methods fg-w bp --epochs 20
    forwardonly experiment dimension-curse --out runs/curse
    torchrun --nproc-per-node 2 -m forwardonly train --distributed data --method fg-w --out runs/dp
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from .autodiff import ForwardModeError
from .config import ConfigError, TrainConfig, field_type, fields, from_dict, load_file
from .data import DataError
from .distributed.watchdog import RankFailure
from .train import TrainingDiverged
from .train.checkpoint import CheckpointError

DESCRIPTION = """\
Train neural networks without backpropagating through them.

Methods (--method): bp = backprop (the baseline); fg-w = forward gradient with weight
perturbation (one forward-mode pass gives the exact directional derivative d = ∇L·v, the
estimate is d·v); fg-sign = step along -sign(d)·v; zo = zeroth order / MeZO (two forward
passes); zo-sign = the essay's sign-of-loss-difference rule; plus every registered method.
"""


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML or TOML file with any of the keys "
                        "below (flags given on the command line override it).")
    group = parser.add_argument_group("training settings (also valid as config-file keys)")
    for f in fields():
        base, is_list, _ = field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=base, nargs="+" if is_list else None,
                               default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the config file, then the flags given explicitly."""
    values: dict[str, Any] = load_file(args.config) if args.config else {}
    given = {f.name: getattr(args, f.name) for f in fields() if hasattr(args, f.name)}
    return from_dict({**values, **given})


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume)
    if not cfg.distributed or os.environ.get("RANK", "0") == "0":  # rank 0 speaks for all
        print(f"test error {100 * result.test_error:.2f}%  (run directory: {result.run_dir})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train import error_rate, load_run

    cfg, data, _, est, state = load_run(args.run_dir, data_dir=args.data_dir,
                                        device=args.device)
    test = error_rate(est, data.test_x, data.test_y, cfg.eval_batch_size, cfg.device)
    train = error_rate(est, data.train_x, data.train_y, cfg.eval_batch_size, cfg.device)
    print(f"{args.run_dir}: epoch {state['epoch']}, {cfg.method} on {cfg.dataset}: "
          f"test error {100 * test:.2f}% (accuracy {100 * (1 - test):.2f}%), "
          f"train error {100 * train:.2f}%")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .train import train

    base = config_from_args(args)
    root = Path(base.out or time.strftime("runs/compare-%Y%m%d-%H%M%S"))
    results = []
    for method in args.methods:
        cfg = from_dict({"method": method, "out": str(root / method)}, base=base)
        print(f"== {method} ==")
        results.append((method, train(cfg, resume=False)))
    print(f"\n{'method':<10} {'test accuracy':>14} {'test error':>11} {'seconds':>8}")
    for method, r in results:
        secs = sum(row["seconds"] for row in r.rows)
        print(f"{method:<10} {100 * (1 - r.test_error):>13.2f}% {100 * r.test_error:>10.2f}% "
              f"{secs:>8.1f}")
    print(f"(run directories under {root}/)")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    module = importlib.import_module(args.experiment_module)
    module.run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forwardonly", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one model; writes a run directory",
                       description="Train a model with any method. Writes config.yaml, "
                       "metrics.csv/.jsonl, learning_curve.png and checkpoint.pt (every "
                       "epoch, atomically) into --out.")
    _add_config_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory's checkpoint")
    p.add_argument("run_dir", type=Path, help="a directory written by forwardonly train")
    p.add_argument("--data-dir", help="where the dataset files are, if not where they were")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="train several methods with the same settings",
                       description="Train each --methods entry with otherwise identical "
                       "settings (and seed) and print their test accuracy side by side.")
    _add_config_flags(p)
    p.add_argument("--methods", nargs="+", default=["fg-w", "bp"],
                   help="methods to compare (default: fg-w bp)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("experiment", help="the essay's experiments (CSV + PNG + summary)")
    exp_sub = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    from .experiments import EXPERIMENTS

    for name, module_path in EXPERIMENTS.items():
        module = importlib.import_module(module_path)
        doc = (module.__doc__ or "").strip()
        e = exp_sub.add_parser(name, help=doc.splitlines()[0] if doc else name,
                               description=doc,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(e)
        e.set_defaults(func=_cmd_experiment, experiment_module=module_path)
    return parser


def main(argv: list[str] | None = None) -> int:
    import forwardonly  # noqa: F401  (registers every model and method)

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ForwardModeError, TrainingDiverged, CheckpointError,
            FileNotFoundError, RankFailure) as exc:
        print(f"forwardonly: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forwardonly: interrupted; the last finished epoch's checkpoint is kept "
              "(continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
