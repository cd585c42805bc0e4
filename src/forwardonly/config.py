"""The training configuration: one typed dataclass that *is* the CLI and the config-file schema.

Every field becomes a ``forwardonly train --flag`` (underscores as dashes) with the help text
in its metadata; a YAML or TOML file holds the same keys. Unknown keys and wrongly typed
values are errors, all reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A configuration problem; the message lists every problem found."""


@dataclass
class TrainConfig:
    # data
    dataset: str = _f("digits", "Dataset: digits (embedded, no download), mnist, fashion-mnist, "
                      "kmnist (IDX files), cifar10 (binary version).")
    data_dir: str | None = _f(None, "Directory holding the dataset files (or a root with "
                              "<dataset>/ folders); defaults to $FORWARDONLY_DATA.")
    standardize: bool = _f(True, "Map each channel to zero mean, unit variance using the "
                           "training split's statistics.")
    augment: list[str] = _f([], "Training augmentation, applied in order: hflip (mirror "
                            "left-right with probability 1/2), shift (translate by up to 2 "
                            "pixels, edges repeated).")
    max_length: int = _f(128, "Text datasets: tokens per example at most (longer texts are "
                         "cut); batches are padded only to their longest example.")
    train_subset: int | None = _f(None, "Train on K examples per class, drawn from the seed "
                                  "(MeZO's few-shot setting); unset: the whole training set.")
    # model
    model: str = _f("mlp", "Model: mlp, cnn (and any other registered model).")
    widths: list[int] = _f([256, 256], "MLP hidden widths, e.g. --widths 1024 1024.")
    activation: str = _f("relu", "Hidden activation: relu, gelu, tanh, sigmoid, silu, "
                         "leaky_relu.")
    channels: list[int] = _f([16, 32], "CNN channels per conv block.")
    preset: str = _f("M/1/16", "LocalMixer preset (model local-mixer), by the paper's names "
                     "blocks/patches/groups: S/1/1, M/1/16, M/8/16, L/8/64, tiny.")
    blocks: int | None = _f(None, "LocalMixer: override the preset's number of blocks.")
    patches: int | None = _f(None, "LocalMixer: override the preset's patches per side.")
    width: int | None = _f(None, "LocalMixer: override the preset's channel count.")
    groups: int | None = _f(None, "LocalMixer: override the preset's channel groups.")
    model_path: str | None = _f(None, "Model hf: the directory of a Hugging Face encoder "
                                "(config, weights and tokenizer files), read with no network.")
    train_params: list[str] = _f([], "Train only the parameters whose names match one of these "
                                 "patterns (fnmatch globs, e.g. 'head.*' "
                                 "'encoder.encoder.layer.5.*': MiniLM's head and last layer); "
                                 "the others stay frozen. A pattern that matches nothing is an "
                                 "error that lists the names. Unset: every parameter.")
    init_from: str | None = _f(None, "Start from the model weights of another run: its "
                               "directory or its checkpoint.pt (e.g. a linear probe's run, "
                               "then fine-tune the encoder from it: LP-FT). The model must "
                               "have the same shape; optimizer, schedule and step count start "
                               "afresh.")
    # method
    method: str = _f("fg-w", "How gradients are obtained: bp (backprop), fg-w (forward "
                     "gradient, weight perturbation), fg-sign, zo (zeroth order / MeZO), "
                     "zo-sign, and every other registered estimator.")
    directions: int = _f(1, "K: random directions averaged per step (fg-*, zo*).")
    distribution: str = _f("gaussian", "Direction distribution: gaussian, rademacher, rank1 "
                           "(V = b aᵀ per weight matrix), lowrank (rank --direction-rank), "
                           "gaussian-table (fg-w, fg-sign: Gaussian directions read as views "
                           "of a noise table drawn once, at an offset chosen each step: no "
                           "random numbers per step; for one table the expected estimate is "
                           "M∇L with M near I rather than ∇L, and it takes (--table-factor + "
                           "1) × K × the parameters of memory).")
    direction_rank: int = _f(4, "Rank r of the lowrank directions (--distribution lowrank): "
                             "V = B Aᵀ/√r per weight matrix, still E[vvᵀ] = I.")
    table_factor: int = _f(4, "Size of each tensor's noise table (--distribution "
                           "gaussian-table) in entries per entry of its K directions. For one "
                           "table the directions' second moment is a fixed matrix M "
                           "(eigenvalues of mean 1, spread about 1/√factor; at 1 some are near "
                           "0): larger is closer to fresh draws and costs more memory.")
    exact_head: bool = _f(False, "zo, fg-w: train the model's linear head with its exact "
                          "gradient (it needs only the pooled features, no backprop into the "
                          "encoder) and perturb only the rest.")
    epsilon: float = _f(1e-3, "Perturbation size for zeroth-order methods.")
    micro_batch: int | None = _f(None, "zo, fg-w: evaluate each batch in pieces of at most "
                                 "this many examples with the same directions (the same "
                                 "estimate, the activation memory of one piece; gradient "
                                 "accumulation for the forward-only methods). Unset: whole "
                                 "batches.")
    freeze_backbone: bool = _f(False, "Local methods: train only the linear heads (the "
                               "backbone stays at its initialization) — a baseline.")
    # Forward-Forward (method ff, model ff-mlp)
    ff_mode: str = _f("supervised", "FF: supervised (label in the first pixels) or "
                      "unsupervised (hybrid-image negatives + linear readout).")
    ff_goodness: str = _f("sum", "FF goodness of a layer: sum or mean of squared activities.")
    ff_loss: str = _f("softplus", "FF layer loss: softplus (logistic, with threshold) or "
                      "symmetric (positive minus negative goodness).")
    ff_threshold: float | None = _f(None, "FF goodness threshold (default: the layer width "
                                    "for sum goodness, 1 for mean).")
    ff_temperature: float = _f(1.0, "FF: temperature of the logistic loss.")
    ff_negatives: str | None = _f(None, "FF negatives: random or hard wrong labels "
                                  "(supervised), hybrid (unsupervised); default per mode.")
    ff_readout: str | None = _f(None, "FF prediction: goodness (try every label) or softmax "
                                "(linear readout on normalized activities); default per mode.")
    ff_readout_from: int | None = _f(None, "FF: the readout uses the last N hidden layers.")
    ff_peer_weight: float = _f(0.03, "FF: weight of the peer-normalization term.")
    ff_blur_steps: int = _f(10, "FF: blur iterations of the hybrid-image mask.")
    ff_label_scale: float = _f(1.0, "FF: value written into the label pixels.")
    ff_normalize_input: bool = _f(True, "FF: length-normalize each layer's input.")
    ff_precision: str = _f("float32", "FF: compute precision, float32 or bfloat16.")
    # optimisation
    optimizer: str = _f("adam", "Optimizer: adam (AdamW, torch's fused kernel where the device "
                        "has it), sgd (with --momentum), or sgd-inplace: plain "
                        "SGD applied inside the estimator with no gradient buffer (fg-w and "
                        "zo redraw their directions into the parameters: about the memory of "
                        "inference, as in MeZO).")
    lr: float = _f(1e-3, "Peak learning rate.")
    momentum: float = _f(0.9, "SGD momentum (ignored by adam).")
    weight_decay: float = _f(0.0, "Weight decay (decoupled for adam: AdamW).")
    decay_biases: bool = _f(True, "Apply weight decay to biases and other 1-D parameters "
                            "too; --no-decay-biases decays the weights only (the LocalMixer "
                            "paper's recipe).")
    head_lr_scale: float = _f(1.0, "Learning-rate multiplier of the model's linear readout "
                              "`head` (FF networks; Hinton's code uses 10).")
    head_weight_decay: float | None = _f(None, "Weight decay of the model's readout `head` "
                                         "(unset: --weight-decay; Hinton's FF code uses 3x).")
    schedule: str = _f("cosine", "Learning-rate schedule after warmup: cosine, constant, or "
                       "half-linear (constant for the first half of the steps after warmup, "
                       "then linear to zero: Hinton's FF schedule).")
    warmup_epochs: float = _f(0.0, "Linear warmup length in epochs (fractions allowed).")
    clip_grad: float | None = _f(None, "Clip the gradient estimate's global norm to this value.")
    batch_size: int = _f(64, "Training mini-batch size.")
    epochs: int = _f(10, "Number of passes over the training set (of --epoch-size examples "
                     "each, when set).")
    epoch_size: int | None = _f(None, "Examples per epoch: each epoch trains on the first N "
                                "of its own shuffle of the training set (another random N "
                                "every epoch), then evaluates and checkpoints. On a large "
                                "set: a step budget of epochs x N / batch-size and an "
                                "evaluation every N examples. Unset: the whole set.")
    max_steps: int | None = _f(None, "Stop after N optimizer steps in all (counted across "
                               "epochs and resumes), in the middle of an epoch if need be: "
                               "that part-epoch is evaluated, written as a metrics row and "
                               "checkpointed, and --resume with a larger --max-steps "
                               "continues it from the next batch. With --epochs, whichever "
                               "comes first ends the run; the learning-rate schedule spans "
                               "the steps the run will take (a larger --max-steps on resume "
                               "lengthens a decaying schedule, as more --epochs does). Unset: "
                               "--epochs alone.")
    checkpoint_every: int | None = _f(None, "Also write the checkpoint every N optimizer "
                                      "steps inside an epoch (no evaluation, no metrics "
                                      "row), so that a killed run loses at most N steps: "
                                      "--resume continues from the batch after it, "
                                      "bit-identically. Unset: at the end of each epoch "
                                      "(and at a --max-steps stop) only.")
    eval_batch_size: int = _f(1000, "Batch size for evaluation (no effect on results).")
    train_eval_size: int | None = _f(None, "Measure the train error on the first N training "
                                     "examples only (unset: all of them, which on large sets "
                                     "costs a good part of an epoch).")
    eval_test: str = _f("every", "When to measure the test error: every (each epoch) or end "
                        "(only at the last epoch or stop of each call: --epochs, --max-steps "
                        "or --stop-after; the other metrics rows leave test_error empty). "
                        "The validation split, when the data has one, is measured every "
                        "epoch either way: a sweep chooses on it and needs test only at the "
                        "end.")
    stop_after: int | None = _f(None, "Stop after this many epochs of this call, keeping the "
                                "checkpoint; continue later with --resume (the schedule "
                                "still spans --epochs): runs split into short sessions.")
    # run
    seed: int = _f(0, "Seed of everything: initialisation, shuffling, directions.")
    device: str = _f("cpu", "Device: cpu or cuda (cuda:N).")
    threads: str | int | None = _f(
        "auto", "CPU threads for torch: a positive integer, or auto: one thread when a step is "
        "small (batch size × parameters under 4M multiply-adds), else torch's default capped "
        "at the cores the 1-minute load average leaves idle (at least one), shared among the "
        "processes of a machine. Threads cost more than they save on busy cores: on a "
        "shared 2-core machine the quickstart epoch took 0.46 s with one thread and 3.5 s "
        "with torch's default of two. (null in a config file: torch's own choice.)",
        parse=lambda name, value, problems: _threads_value(name, value, problems))
    compile: bool = _f(False, "Compile each training and evaluation step with torch.compile "
                       "(every method alike, backprop included, so speed ratios stay fair). "
                       "The first steps are slow while it compiles; worth it on a GPU, "
                       "rarely on a CPU.")
    precision: str = _f("float32", "Compute precision of each step: float32 (the default) or "
                        "bfloat16 (torch.autocast: matrix products in bfloat16, losses and "
                        "normalizations in float32, .grad stored in float32; methods: bp, "
                        "l-bp, lg-bp, fg-w and fg-sign with 2+ directions). For GPUs with "
                        "bfloat16 units; on a CPU without them it is several times slower. "
                        "See docs/gpu.md.")
    out: str | None = _f(None, "Run directory (config, metrics, plot, checkpoint); default "
                         "runs/<dataset>-<method>-s<seed>-<date-time>.")
    progress: bool = _f(True, "Show a progress bar per epoch.")
    # distributed
    distributed: str | None = _f(None, "Train on several processes started by torchrun "
                                 "(torchrun --nproc-per-node N -m forwardonly train "
                                 "--distributed data ...): data = every rank takes a shard of "
                                 "each batch and only the K directional derivatives travel "
                                 "(fg-w, fg-sign, zo, zo-sign; DDP for bp); stages = the "
                                 "model's layers split into pipeline stages, one per rank "
                                 "(fg-w, fg-sign, bp). Rank 0 writes the run directory.")
    dist_timeout: float = _f(60.0, "Seconds a rank may wait for the others (one collective, "
                             "send or receive) before the run stops with an error naming the "
                             "rank that stopped responding (a rank that dies ends the job at "
                             "once through torchrun). Must exceed the longest pause between "
                             "collectives (rank 0 writing a checkpoint).")

    def validate(self) -> None:
        from .autodiff import DISTRIBUTIONS
        from .data import DATASETS
        from .estimators import ESTIMATORS
        from .models import MODELS

        problems: list[str] = []

        def one_of(name: str, value: str, valid: typing.Iterable[str]) -> None:
            valid = sorted(valid)
            if value not in valid:
                problems.append(f"{name} must be one of {', '.join(valid)}; got {value!r}")

        one_of("dataset", self.dataset, DATASETS)
        problems += self._data_model_problems()
        one_of("model", self.model, MODELS)
        one_of("method", self.method, ESTIMATORS)
        one_of("distribution", self.distribution, DISTRIBUTIONS)
        if self.distribution == "gaussian-table" and self.method not in ("fg-w", "fg-sign"):
            problems.append(f"distribution gaussian-table (a noise table kept across steps) is "
                            f"an option of method fg-w and fg-sign, not {self.method}; use "
                            f"--distribution gaussian")
        if self.table_factor != default_of("table_factor") \
                and self.distribution != "gaussian-table":
            problems.append(f"--table-factor has no effect with --distribution "
                            f"{self.distribution} (it sizes the noise table of "
                            f"--distribution gaussian-table); drop it")
        one_of("optimizer", self.optimizer, ("adam", "sgd", "sgd-inplace"))
        if self.optimizer == "sgd-inplace" and self.clip_grad is not None:
            problems.append("clip_grad needs a gradient buffer; it cannot be combined with "
                            "optimizer sgd-inplace")
        one_of("schedule", self.schedule, ("cosine", "constant", "half-linear"))
        for name in self.augment:
            one_of("augment", name, ("hflip", "shift"))
        for name in ("directions", "batch_size", "epochs", "eval_batch_size", "max_length",
                     "direction_rank", "table_factor"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1; got {getattr(self, name)}")
        for name in ("lr", "epsilon", "head_lr_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                problems.append(f"{name} must be a positive number; got {v}")
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                problems.append(f"{name} must be a non-negative number; got {v}")
        if self.head_weight_decay is not None and not (
                math.isfinite(self.head_weight_decay) and self.head_weight_decay >= 0):
            problems.append(f"head_weight_decay must be a non-negative number when set; "
                            f"got {self.head_weight_decay}")
        if not self.decay_biases and (self.head_lr_scale != 1.0
                                      or self.head_weight_decay is not None):
            problems.append("--no-decay-biases cannot be combined with --head-lr-scale / "
                            "--head-weight-decay; use one of the two")
        if self.optimizer == "sgd-inplace" and not self.decay_biases:
            problems.append("--no-decay-biases needs a torch optimizer; use optimizer sgd or "
                            "adam")
        if self.optimizer == "sgd-inplace" and self.head_lr_scale != 1.0 \
                and self.method in ("zo", "zo-sign", "fg-w", "fg-sign") and not self.exact_head:
            problems.append(f"with --optimizer sgd-inplace, {self.method} updates the head in "
                            f"place at the body's rate; --head-lr-scale needs --exact-head "
                            f"there (the head's exact gradient gets its own rate)")
        if self.optimizer == "sgd-inplace" and self.head_weight_decay is not None:
            problems.append("head_weight_decay needs a torch optimizer; use optimizer sgd or "
                            "adam (sgd-inplace takes --head-lr-scale)")
        if self.optimizer != "sgd" and self.momentum != default_of("momentum"):
            problems.append(f"--momentum has no effect with --optimizer {self.optimizer} (it "
                            f"is an option of optimizer sgd); drop it")
        if self.warmup_epochs > self.epochs:
            problems.append(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        one_of("eval_test", self.eval_test, EVAL_TEST)
        for name in ("train_eval_size", "stop_after", "train_subset", "epoch_size",
                     "max_steps", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                problems.append(f"{name} must be at least 1 when set; got {v}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            problems.append(f"clip_grad must be positive when set; got {self.clip_grad}")
        if self.distributed is not None:
            one_of("distributed", self.distributed, ("data", "stages"))
            if self.optimizer == "sgd-inplace":
                problems.append("optimizer sgd-inplace is single-process only; use sgd or "
                                "adam with --distributed")
            if self.augment:
                problems.append("augment is single-process only; drop it with --distributed")
            if self.exact_head:
                problems.append("exact_head is single-process only; drop it with "
                                "--distributed")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            problems.append(f"dist_timeout must be a positive number of seconds; "
                            f"got {self.dist_timeout}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"device must be cpu or cuda[:N]; got {self.device!r}")
        elif self.device.startswith("cuda"):
            problems += _cuda_problems(self.device)
        one_of("precision", self.precision, PRECISIONS)
        if self.precision == "bfloat16" and self.method in BF16_REFUSED:
            problems.append(f"--precision bfloat16 is not supported with --method "
                            f"{self.method}: {BF16_REFUSED[self.method]}; it runs with "
                            f"--method {', '.join(BF16_METHODS)}")
        if self.precision == "bfloat16" and self.method in ("fg-w", "fg-sign") \
                and self.directions == 1:
            problems.append("--precision bfloat16 needs --directions 2 or more with --method "
                            f"{self.method}: the one-direction path's Linear rule "
                            "(autodiff/rules.linear_jvp) mixes bfloat16 and float32")
        if self.distributed == "stages" and (self.compile or self.precision != "float32"):
            problems.append("compile and precision bfloat16 are not supported with "
                            "--distributed stages (its stages run their own forward passes); "
                            "drop them or use --distributed data")
        if not (self.threads is None or self.threads == "auto"
                or isinstance(self.threads, int) and not isinstance(self.threads, bool)
                and self.threads >= 1):
            problems.append(f"threads must be at least 1 or 'auto'; got {self.threads!r}")
        problems += self.option_problems()
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def _data_model_problems(self) -> list[str]:
        """Text data goes with a text model and image data with an image model."""
        from .data import DATASETS, TEXT_DATASETS
        from .models import MODELS
        from .models.text import TEXT_MODELS

        if self.dataset not in DATASETS or self.model not in MODELS:
            return []
        text_data, text_model = self.dataset in TEXT_DATASETS, self.model in TEXT_MODELS
        if text_data and not text_model:
            return [f"dataset {self.dataset} is text: train it with a text model (--model "
                    f"{' or '.join(TEXT_MODELS)}), not --model {self.model}"]
        if text_model and not text_data:
            return [f"model {self.model} reads text: train it on a text dataset (--dataset "
                    f"{' or '.join(TEXT_DATASETS)}), not --dataset {self.dataset}"]
        if not text_data and self.max_length != default_of("max_length"):
            return [f"--max-length has no effect with --dataset {self.dataset} (it cuts the "
                    f"texts of {', '.join(TEXT_DATASETS)}); drop it"]
        return []

    def option_problems(self) -> list[str]:
        """Model and method options set (away from their defaults) that the chosen model or
        method does not take: they would be silently ignored."""
        from .estimators import ESTIMATORS
        from .models import MODELS

        problems = []
        for kind, names, chosen, registry in (
                ("method", METHOD_OPTIONS, self.method, ESTIMATORS),
                ("model", MODEL_OPTIONS, self.model, MODELS)):
            if chosen not in registry:
                continue  # reported by validate()
            for name in names:
                if getattr(self, name) == default_of(name) or takes(registry[chosen], name):
                    continue
                users = sorted(k for k, v in registry.items() if takes(v, name))
                problems.append(f"--{name.replace('_', '-')} has no effect with --{kind} "
                                f"{chosen} (it is an option of {kind} "
                                f"{', '.join(users) or 'none'}); drop it")
        return problems

    def method_options(self) -> dict[str, Any]:
        """The settings the chosen method's estimator takes, by parameter name."""
        from .estimators import ESTIMATORS

        cls = ESTIMATORS[self.method]
        return {param_name(n): getattr(self, n) for n in (*METHOD_OPTIONS, "seed")
                if takes(cls, n)}

    def model_options(self) -> dict[str, Any]:
        """The settings the chosen model's builder takes, by parameter name."""
        from .models import MODELS

        builder = MODELS[self.model]
        return {param_name(n): getattr(self, n) for n in (*MODEL_OPTIONS, "seed")
                if takes(builder, n)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: When ``--eval-test`` measures the test error.
EVAL_TEST = ("every", "end")
#: Compute precisions of ``--precision`` (autocast dtype; float32: no autocast).
PRECISIONS = ("float32", "bfloat16")
#: Methods measured to train under bfloat16 autocast (their losses track float32's).
BF16_METHODS = ("bp", "fg-w", "fg-sign", "l-bp", "lg-bp")
_LN_JVP = ("the LocalMixer's LayerNorm forward rule (models/local_norm.ln_jvp) mixes a "
           "bfloat16 tangent with float32 statistics")
#: Methods refused under bfloat16 autocast, and why.
BF16_REFUSED = {
    "zo": "finite differences with epsilon 1e-3 are below bfloat16's resolution (the loss "
          "stops falling)",
    "zo-sign": "finite differences with epsilon 1e-3 are below bfloat16's resolution",
    "fg-a": _LN_JVP, "lg-fg-a": _LN_JVP, "lg-fg-w": _LN_JVP, "fg-w-mixer": _LN_JVP,
    "ff": "Forward-Forward sets its own precision: use --ff-precision bfloat16",
}

# Settings that belong to a model or a method: passed only to the ones whose signature takes
# them (under the parameter name of ``param_name``), and rejected when set for others.
MODEL_OPTIONS = ("model_path", "widths", "activation", "channels", "preset", "blocks",
                 "patches", "width", "groups", "ff_mode", "ff_goodness", "ff_readout",
                 "ff_readout_from", "ff_label_scale", "ff_normalize_input", "ff_precision")
METHOD_OPTIONS = ("directions", "distribution", "direction_rank", "table_factor", "exact_head",
                  "epsilon", "micro_batch", "freeze_backbone", "ff_threshold", "ff_temperature",
                  "ff_loss", "ff_negatives", "ff_peer_weight", "ff_blur_steps")
# Config names whose parameter is spelled differently (the FF options drop their prefix).
PARAM_NAMES: dict[str, str] = {name: name.removeprefix("ff_") for name in (
    *MODEL_OPTIONS, *METHOD_OPTIONS) if name.startswith("ff_")}


def param_name(field_name: str) -> str:
    return PARAM_NAMES.get(field_name, field_name)


def takes(fn: Callable[..., object], field_name: str) -> bool:
    """Whether ``fn`` (a builder, or an estimator class) has a parameter for ``field_name``."""
    # A class's __init__ is only inspected, never called, so mypy's unsoundness warning about
    # reading __init__ through a type object does not apply.
    target = fn.__init__ if isinstance(fn, type) else fn  # type: ignore[misc]
    return param_name(field_name) in inspect.signature(target).parameters


def default_of(name: str) -> Any:
    f = next(x for x in fields() if x.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    assert callable(f.default_factory)  # every TrainConfig field has a default or a factory
    return f.default_factory()


def _cuda_problems(device: str) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [f"device {device!r} was asked for, but this torch "
                f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}; "
                f"use --device cpu"]
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        return [f"device {device!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"]
    return []


def fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(TrainConfig))


def field_type(f: dataclasses.Field[Any]) -> tuple[type, bool, bool]:
    """``(base type, is_list, is_optional)`` of a config field."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _coerce(name: str, value: Any, problems: list[str]) -> Any:
    f = next(x for x in fields() if x.name == name)
    if "parse" in f.metadata and value is not None:  # a field of its own syntax
        return f.metadata["parse"](name, value, problems)
    base, is_list, optional = field_type(f)
    if value is None:
        if optional:
            return None
        problems.append(f"{name} may not be null")
        return None
    if is_list:
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce_scalar(name, v, base, problems) for v in value]
    return _coerce_scalar(name, value, base, problems)


def _coerce_scalar(name: str, value: Any, base: type, problems: list[str]) -> Any:
    if base is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{name} must be true or false; got {value!r}")
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{name} must be an integer; got {value!r}")
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{name} must be a number; got {value!r}")
    elif base is str:
        if isinstance(value, str):
            return value
        problems.append(f"{name} must be a string; got {value!r}")
    return value


def _threads_value(name: str, value: Any, problems: list[str]) -> Any:
    """``threads``: ``"auto"`` or an integer (from the command line, a string of digits)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if value == "auto" or isinstance(value, int) and not isinstance(value, bool):
        return value
    problems.append(f"{name} must be a positive integer or 'auto'; got {value!r}")
    return value


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, *,
              validate: bool = True) -> TrainConfig:
    """A config from ``values`` (over ``base`` or the defaults); unknown keys are errors."""
    known = {f.name for f in fields()}
    problems: list[str] = []
    clean: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
            continue
        clean[name] = _coerce(name, value, problems)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    cfg = dataclasses.replace(base or TrainConfig(), **clean)
    if validate:
        cfg.validate()
    return cfg


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data
