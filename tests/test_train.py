"""Training loop: run directory contents, resume equals uninterrupted, divergence handling."""

import dataclasses
import json
import math

import pytest
import torch
import yaml

import forwardonly
from forwardonly.config import ConfigError, from_dict
from forwardonly.estimators.base import register
from forwardonly.estimators.forward_gradient import ForwardGradient
from forwardonly.train import TrainingDiverged, train
from forwardonly.train.checkpoint import CheckpointError, load, save

SMALL = dict(dataset="digits", widths=[16], batch_size=128, progress=False, directions=2)


def cfg(tmp_path, **kw):
    return from_dict({**SMALL, "out": str(tmp_path / "run"), **kw})


def test_run_directory_contents(tmp_path):
    result = train(cfg(tmp_path, epochs=2, seed=3), log=lambda s: None)
    run = result.run_dir
    doc = yaml.safe_load((run / "config.yaml").read_text())
    assert doc["config"]["seed"] == 3 and doc["config"]["method"] == "fg-w"
    assert doc["versions"]["torch"] == str(torch.__version__)
    assert doc["versions"]["forwardonly"] == forwardonly.__version__
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("epoch", "train_loss", "train_error", "test_error", "seconds",
                   "samples_per_s"):
        assert column in header
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load(run / "checkpoint.pt")
    assert state["epoch"] == 2
    assert not list(run.glob("*.tmp"))


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    full = train(cfg(tmp_path / "a", epochs=3), log=lambda s: None)

    def stop_after_first_epoch(message):
        if message.startswith("epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg(tmp_path / "b", epochs=3), log=stop_after_first_epoch)
    resumed = train(cfg(tmp_path / "b", epochs=3), resume=True, log=lambda s: None)
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    drop = ("seconds", "samples_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(full.rows) == strip(resumed.rows)


def test_existing_run_is_not_overwritten(tmp_path):
    train(cfg(tmp_path, epochs=1), log=lambda s: None)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(cfg(tmp_path, epochs=1), log=lambda s: None)


def test_resume_rejects_changed_settings(tmp_path):
    train(cfg(tmp_path, epochs=1), log=lambda s: None)
    with pytest.raises(ConfigError, match="lr: run has 0.001, given 0.5"):
        train(cfg(tmp_path, epochs=2, lr=0.5), resume=True, log=lambda s: None)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint.pt"):
        train(cfg(tmp_path, epochs=1), resume=True, log=lambda s: None)


@register("test-nan-in-epoch-2")
class NanLater(ForwardGradient):
    """fg-w whose loss turns NaN after 12 steps (digits has 12 batches of 128)."""

    def estimate(self, inputs, targets):
        stats = super().estimate(inputs, targets)
        return {**stats, "loss": math.nan} if self.steps_done >= 12 else stats


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="epoch 2.*checkpoint of epoch 1.*is kept"):
        train(cfg(tmp_path, epochs=3, method="test-nan-in-epoch-2"), log=lambda s: None)
    state = load(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_loading_executes_no_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="could not be read safely"):
        load(path)
    save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load(tmp_path / "ok.pt")["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load(tmp_path / "missing.pt")


def test_training_lowers_error_on_digits(tmp_path):
    result = train(cfg(tmp_path, epochs=4, method="bp", lr=1e-2, batch_size=32),
                   log=lambda s: None)
    assert result.rows[-1]["train_loss"] < result.rows[0]["train_loss"]
    assert result.test_error < 0.15


def test_inplace_sgd_training_lowers_the_loss(tmp_path):
    result = train(cfg(tmp_path, epochs=3, method="zo", optimizer="sgd-inplace", lr=0.05,
                       widths=[], batch_size=32), log=lambda s: None)
    assert result.rows[-1]["train_loss"] < 0.8 * result.rows[0]["train_loss"]
    assert all(p.grad is None for p in result.model.parameters())


def test_inplace_sgd_rejects_clipping():
    with pytest.raises(ConfigError, match="clip_grad needs a gradient buffer"):
        from_dict({"optimizer": "sgd-inplace", "clip_grad": 1.0})


def _lr_factors(total: int, warmup: int, kind: str) -> list[float]:
    from forwardonly.train.schedule import lr_schedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = lr_schedule(opt, total_steps=total, warmup_steps=warmup, kind=kind)
    factors = []
    for _ in range(total):
        factors.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return factors


def test_half_linear_schedule_is_flat_then_linear_to_zero():
    from forwardonly.train.schedule import lr_schedule

    assert _lr_factors(10, 0, "half-linear") == pytest.approx(
        [1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    # with warmup: the halves are those of the steps after it
    assert _lr_factors(12, 2, "half-linear") == pytest.approx(
        [0.5, 1, 1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match="schedule must be"):
        lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 10, 0,
                    kind="linear")


def test_head_gets_its_own_learning_rate_and_weight_decay(tmp_path):
    from forwardonly.train.loop import build, make_optimizer

    config = cfg(tmp_path, model="ff-mlp", method="ff", widths=[32, 32], optimizer="sgd",
                 lr=0.01, weight_decay=1e-3, head_lr_scale=10.0, head_weight_decay=3e-3,
                 schedule="half-linear")
    data = forwardonly.data.load_dataset("digits")
    model, _ = build(config, data)
    body, head = make_optimizer(config, model).param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert len(body["params"]) + len(head["params"]) == len(list(model.parameters()))
    assert (body["lr"], body["weight_decay"]) == (0.01, 1e-3)
    assert head["lr"] == pytest.approx(0.1) and head["weight_decay"] == 3e-3
    # 2 of 3 epochs: two thirds into the half-linear decay
    result = train(dataclasses.replace(config, epochs=3, stop_after=2), log=lambda s: None)
    assert result.rows[-1]["train_loss"] < result.rows[0]["train_loss"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    body_lr, head_lr = (g["lr"] for g in ckpt["optimizer"]["param_groups"])
    assert body_lr == pytest.approx(0.01 * 2 / 3, rel=0.05)
    assert head_lr == pytest.approx(10 * body_lr)  # the scheduler keeps the ratio


def test_head_settings_need_a_model_with_a_head(tmp_path):
    with pytest.raises(ConfigError, match="has no `head` submodule"):
        train(cfg(tmp_path, epochs=1, method="bp", head_lr_scale=10.0), log=lambda s: None)
    with pytest.raises(ConfigError, match="head_lr_scale must be a positive number"):
        from_dict({"head_lr_scale": 0.0})
    with pytest.raises(ConfigError, match="head_weight_decay must be a non-negative"):
        from_dict({"head_weight_decay": -1.0})


def test_augmentation_changes_training_deterministically(tmp_path):
    base = dict(epochs=1, method="bp", lr=1e-2, batch_size=32)
    plain = train(cfg(tmp_path / "a", **base), log=lambda s: None)
    aug = train(cfg(tmp_path / "b", augment=["hflip", "shift"], **base), log=lambda s: None)
    again = train(cfg(tmp_path / "c", augment=["hflip", "shift"], **base), log=lambda s: None)
    assert aug.rows[0]["train_loss"] != plain.rows[0]["train_loss"]
    assert aug.rows[0]["train_loss"] == again.rows[0]["train_loss"]
    with pytest.raises(ConfigError, match="augment must be one of"):
        from_dict({"augment": ["rotate"]})
    with pytest.raises(ConfigError, match="augment is single-process only"):
        from_dict({"augment": ["hflip"], "distributed": "data"})


def test_stop_after_splits_a_run_into_chunks_that_equal_one_run(tmp_path):
    # augmentation included: a resumed run must draw the same flips and shifts
    base = dict(epochs=3, method="fg-w", lr=1e-2, train_eval_size=100,
                augment=["hflip", "shift"])
    whole = train(cfg(tmp_path / "whole", **base), log=lambda s: None)
    first = train(cfg(tmp_path / "chunks", stop_after=2, **base), log=lambda s: None)
    assert len(first.rows) == 2
    rest = train(cfg(tmp_path / "chunks", stop_after=2, **base), resume=True,
                 log=lambda s: None)
    assert [r["train_loss"] for r in rest.rows] == [r["train_loss"] for r in whole.rows]
    # measured on 100 examples: a whole number of percent
    assert all(math.isclose(100 * r["train_error"], round(100 * r["train_error"]))
               for r in rest.rows)
    with pytest.raises(ConfigError, match="stop_after must be at least 1"):
        from_dict({"stop_after": 0})


def test_no_decay_biases_decays_weight_matrices_only(tmp_path):
    from forwardonly.train.loop import make_optimizer

    config = cfg(tmp_path, method="bp", optimizer="sgd", weight_decay=1e-3, decay_biases=False)
    model = forwardonly.models.build_model("mlp", (1, 8, 8), 10, widths=[16])
    matrices, vectors = make_optimizer(config, model).param_groups
    assert all(p.dim() == 2 for p in matrices["params"]) and matrices["weight_decay"] == 1e-3
    assert all(p.dim() == 1 for p in vectors["params"]) and vectors["weight_decay"] == 0.0
    assert len(matrices["params"]) + len(vectors["params"]) == len(list(model.parameters()))
    mixer = forwardonly.models.build_model("local-mixer", (1, 8, 8), 10, preset="tiny")
    decayed, plain = make_optimizer(config, mixer).param_groups
    grouped_bias = mixer.blocks[0].layers[1].bias  # (G, C/G): a bias, though 2-D
    assert grouped_bias.dim() == 2 and any(p is grouped_bias for p in plain["params"])
    assert {id(p) for p in decayed["params"]} == {
        id(p) for n, p in mixer.named_parameters() if n.endswith("weight")}
    with pytest.raises(ConfigError, match="cannot be combined with --head-lr-scale"):
        from_dict({"decay_biases": False, "head_lr_scale": 10.0})
    with pytest.raises(ConfigError, match="--no-decay-biases needs a torch optimizer"):
        from_dict({"optimizer": "sgd-inplace", "decay_biases": False})
