"""``forwardonly`` command line: train | eval | compare | experiment.

Examples::

    forwardonly train --config configs/quickstart.yaml --out runs/demo
    forwardonly train --out runs/demo --resume                 # continue exactly where it stopped
    forwardonly train --out runs/demo --resume --epochs 40     # ... and train it further
    forwardonly eval runs/demo
    forwardonly compare --methods fg-w zo bp --config configs/quickstart.yaml
    forwardonly experiment dimension-curse --out runs/curse
    torchrun --nproc-per-node 2 -m forwardonly train --distributed data --resume auto --out runs/dp

Only what a command needs is imported: ``forwardonly --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, default_of, field_type, fields, from_dict, load_file

DESCRIPTION = """\
Train neural networks without backpropagating through them: forward gradients (fg-w),
activity perturbation with local losses (fg-a, lg-fg-a, ...), zeroth order / MeZO (zo),
Hinton's Forward-Forward (ff), and backprop (bp) as the baseline.

Start with:  forwardonly train --config configs/quickstart.yaml
Every setting: forwardonly train --help
"""

COMMANDS = {
    "train": "train one model; writes a run directory (config, metrics, plot, checkpoint)",
    "eval": "evaluate a run directory's checkpoint",
    "compare": "train several methods with the same settings and print them side by side",
    "experiment": "the essay's experiments: dimension-curse, estimator-quality, latency "
                  "(CSV + PNG + summary)",
}
# Each kind of error a user can cause, printed as one message (no traceback).
USER_ERRORS = ("forwardonly.config:ConfigError", "forwardonly.data:DataError",
               "forwardonly.autodiff:ForwardModeError",
               "forwardonly.train:TrainingDiverged", "forwardonly.train:RunWriteError",
               "forwardonly.train:OutOfMemory", "forwardonly.train.checkpoint:CheckpointError")


def _registry_help() -> dict[str, str]:
    """``--method`` and ``--model`` help listing every registered name."""
    import forwardonly  # noqa: F401  (every model and method registered)

    from .estimators import ESTIMATORS
    from .models import MODELS

    def first_line(obj: Any) -> str:
        """The docstring's first sentence, without reST markup."""
        paragraph = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
        sentence = re.split(r"(?<=[.;])\s", paragraph)[0].rstrip(".;")
        return re.sub(r":\w+:`~?([^`]+)`|``([^`]+)``", lambda m: m[1] or m[2], sentence)

    methods = "; ".join(f"{n} = {first_line(c)}" for n, c in sorted(ESTIMATORS.items()))
    models = "; ".join(f"{n} = {first_line(b)}" for n, b in sorted(MODELS.items()))
    return {"method": f"How gradients are obtained: {methods}.",
            "model": f"The network: {models}."}


def _add_config_flags(parser: argparse.ArgumentParser, with_registries: bool) -> None:
    parser.add_argument("--config", type=Path, help="YAML or TOML file with any of the keys "
                        "below (flags given on the command line override it).")
    group = parser.add_argument_group("training settings (also valid as config-file keys)")
    registry_help = _registry_help() if with_registries else {}
    for f in fields():
        base, is_list, _ = field_type(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{registry_help.get(f.name, f.metadata['help'])} " \
                    f"(default: {default_of(f.name)})"
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=base, nargs="+" if is_list else None,
                               default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper())


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave explicitly: the config file's keys, then the flags."""
    values: dict[str, Any] = load_file(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in fields() if hasattr(args, f.name)})
    return values


def _train_config(given: dict[str, Any], resume: bool | str) -> TrainConfig:
    """A new run's config (defaults + ``given``), or, when resuming, the run's own config with
    ``given`` on top (the run decides every setting the user did not give)."""
    from .train import resume_config
    from .train.run_dir import has_checkpoint

    out = given.get("out")
    if resume is True or (resume == "auto" and out and has_checkpoint(out)):
        if not out:
            raise ConfigError("--resume needs --out: the run directory to continue")
        return resume_config(out, given)
    return from_dict(given)


def _cmd_train(args: argparse.Namespace) -> int:
    from .launch import train

    cfg = _train_config(given_settings(args), args.resume)
    if cfg.distributed:  # an error also goes to the error file torchrun's summary shows
        from .distributed import record_errors

        train = record_errors(train)
    result = train(cfg, resume=args.resume)
    if _is_writer(cfg) and result.rows:
        if math.isnan(result.test_error):  # --eval-test end, and the last row was not an end
            print(f"test error not measured at the last row (--eval-test end); forwardonly "
                  f"eval {result.run_dir} measures it  (run directory: {result.run_dir})")
        else:
            print(f"test error {100 * result.test_error:.2f}%  "
                  f"(run directory: {result.run_dir})")
    return 0


def _is_writer(cfg: TrainConfig) -> bool:
    import os

    return not cfg.distributed or os.environ.get("RANK", "0") == "0"


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train import error_rate, load_run

    cfg, data, _, est, state = load_run(args.run_dir, data_dir=args.data_dir,
                                        device=args.device)
    test = error_rate(est, data.test_x, data.test_y, cfg.eval_batch_size)
    train = error_rate(est, data.train_x, data.train_y, cfg.eval_batch_size)
    where = f"epoch {state['epoch']}"
    per_epoch = state.get("steps_per_epoch")
    if per_epoch and state["step"] % per_epoch:  # a checkpoint inside an epoch
        where = (f"step {state['step']} (epoch {state['epoch'] + 1}, batch "
                 f"{state['step'] % per_epoch} of {per_epoch})")
    print(f"{args.run_dir}: {where}, {cfg.method} on {cfg.dataset}: "
          f"test error {100 * test:.2f}% (accuracy {100 * (1 - test):.2f}%), "
          f"train error {100 * train:.2f}%")
    return 0


def compare_configs(given: dict[str, Any], methods: list[str]) -> list[TrainConfig]:
    """One config per method, all validated before any training. A method option the
    settings give (e.g. ``directions``) goes to the methods that take it only."""
    from .config import METHOD_OPTIONS, takes
    from .estimators import ESTIMATORS

    problems = [f"unknown method {m!r} (valid: {', '.join(sorted(ESTIMATORS))})"
                for m in methods if m not in ESTIMATORS]
    if len(set(methods)) != len(methods):
        problems.append(f"--methods lists a method twice: {' '.join(methods)}")
    if problems:
        raise ConfigError("compare: " + "; ".join(problems))
    root = Path(given.get("out") or time.strftime("runs/compare-%Y%m%d-%H%M%S"))
    configs = []
    for method in methods:
        own = {k: v for k, v in given.items()
               if k not in METHOD_OPTIONS or takes(ESTIMATORS[method], k)}
        try:
            configs.append(from_dict({**own, "method": method, "out": str(root / method)}))
        except ConfigError as exc:
            raise ConfigError(f"compare, method {method}: {exc}") from exc
    _check_buildable(configs)
    return configs


def _check_buildable(configs: list[TrainConfig]) -> None:
    """Build every config's model and estimator once (on the data's shapes), so a method that
    cannot train the model is reported before the first one trains."""
    from .train import build
    from .train.builders import load_data

    data = load_data(configs[0])
    problems = []
    for cfg in configs:
        try:
            build(cfg, data)
        except ConfigError as exc:
            problems.append(f"method {cfg.method}: {exc}")
    if problems:
        raise ConfigError("compare: " + "; ".join(problems))


def _cmd_compare(args: argparse.Namespace) -> int:
    from .launch import train
    from .train.run_dir import plan_run

    configs = compare_configs(given_settings(args), args.methods)
    for cfg in configs:
        plan_run(cfg, resume=False)  # refuse an existing run before training anything
    results = []
    for cfg in configs:
        print(f"== {cfg.method} ==")
        results.append((cfg.method, train(cfg)))
    print(f"\n{'method':<10} {'test accuracy':>14} {'test error':>11} {'seconds':>8}")
    for method, r in results:
        secs = sum(row["seconds"] for row in r.rows)
        if math.isnan(r.test_error):  # not measured (--eval-test end, no end in this call)
            acc, err = f"{'-':>14}", f"{'-':>11}"
        else:
            acc, err = f"{100 * (1 - r.test_error):>13.2f}%", f"{100 * r.test_error:>10.2f}%"
        print(f"{method:<10} {acc} {err} {secs:>8.1f}")
    print(f"(run directories under {Path(configs[0].out or '.').parent}/)")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    import importlib

    from .config import ConfigError

    try:
        importlib.import_module(args.experiment_module).run(args)
    except ValueError as exc:  # the experiments' checks of their settings: a user error
        raise ConfigError(f"experiment {args.experiment}: {exc}") from exc
    return 0


def _resume_arg(value: str) -> bool | str:
    if value == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {value!r}")


def build_parser(command: str | None = None, full_help: bool = False,
                 experiment: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` given, only its subparser is filled in (the others then
    need no imports: ``forwardonly --help`` does not load torch), and with ``experiment``
    (a known name) only that experiment's module is imported."""
    parser = argparse.ArgumentParser(prog="forwardonly", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text)
               for name, text in COMMANDS.items()}

    p = parsers["train"]
    p.description = ("Train a model with any method. Writes config.yaml, metrics.csv/.jsonl, "
                     "learning_curve.png and checkpoint.pt (every epoch, atomically) into "
                     "--out. With --resume, the run continues with its own settings: give "
                     "only what may change (e.g. more --epochs or --max-steps).")
    if command in (None, "train"):
        _add_config_flags(p, full_help)
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_arg,
                   help="continue the run in --out from its last checkpoint, with the run's "
                   "own settings; '--resume auto' continues it if there is one and starts it "
                   "otherwise (for torchrun --max-restarts)")
    p.set_defaults(func=_cmd_train)

    p = parsers["eval"]
    p.add_argument("run_dir", type=Path, help="a directory written by forwardonly train")
    p.add_argument("--data-dir", help="where the dataset files are, if not where they were")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=_cmd_eval)

    p = parsers["compare"]
    p.description = ("Train each --methods entry with otherwise identical settings (and seed) "
                     "and print their test accuracy side by side. Every method's settings are "
                     "checked before the first one trains.")
    if command in (None, "compare"):
        _add_config_flags(p, full_help)
    p.add_argument("--methods", nargs="+", default=["fg-w", "bp"],
                   help="methods to compare (default: fg-w bp)")
    p.set_defaults(func=_cmd_compare)

    p = parsers["experiment"]
    if command in (None, "experiment"):
        import importlib

        from .experiments import EXPERIMENTS

        exp_sub = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
        chosen = {experiment: EXPERIMENTS[experiment]} if experiment in EXPERIMENTS \
            else EXPERIMENTS  # all of them for the list in --help (or an unknown name)
        for name, module_path in chosen.items():
            module = importlib.import_module(module_path)
            doc = (module.__doc__ or "").strip()
            e = exp_sub.add_parser(name, help=doc.splitlines()[0] if doc else name,
                                   description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(e)
            e.set_defaults(func=_cmd_experiment, experiment_module=module_path)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    import importlib

    kinds: list[type[BaseException]] = [FileNotFoundError]
    for spec in USER_ERRORS:
        module, _, name = spec.partition(":")
        if module in sys.modules or module.startswith("forwardonly.config"):
            kinds.append(getattr(importlib.import_module(module), name))
    if "forwardonly.distributed" in sys.modules:
        kinds.append(sys.modules["forwardonly.distributed"].RankFailure)
    return tuple(kinds)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    words = [a for a in argv if not a.startswith("-")]
    experiment = words[1] if command == "experiment" and len(words) > 1 else None
    parser = build_parser(command if command in COMMANDS else "",
                          full_help=any(a in ("-h", "--help") for a in argv),
                          experiment=experiment)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("forwardonly: interrupted; the last checkpoint (of the last finished epoch, "
              "or of the last --checkpoint-every step) is kept (continue with --resume)",
              file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"forwardonly: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
