"""Training loop: run directory contents, resume equals uninterrupted, divergence handling."""

import dataclasses
import json
import math

import pytest
import torch
import yaml

import forwardonly
from forwardonly.config import ConfigError, from_dict, takes
from forwardonly.estimators.base import register
from forwardonly.estimators.forward_gradient import ForwardGradient
from forwardonly.train import TrainingDiverged, fit
from forwardonly.train.checkpoint import CheckpointError, load, save

SMALL = dict(dataset="digits", widths=[16], batch_size=128, progress=False, directions=2)


def cfg(tmp_path, **kw):
    values = {**SMALL, "out": str(tmp_path / "run"), **kw}
    if not takes(forwardonly.ESTIMATORS[values.get("method", "fg-w")], "directions"):
        del values["directions"]  # an option of other methods: rejected here
    return from_dict(values)


def test_run_directory_contents(tmp_path, device):
    result = fit(cfg(tmp_path, epochs=2, seed=3, device=str(device)), log=lambda s: None)
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


def test_resume_equals_uninterrupted(tmp_path, device):
    full = fit(cfg(tmp_path / "a", epochs=3, device=str(device)), log=lambda s: None)

    def stop_after_first_epoch(message):
        if message.startswith("epoch 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg(tmp_path / "b", epochs=3, device=str(device)), log=stop_after_first_epoch)
    resumed = fit(cfg(tmp_path / "b", epochs=3, device=str(device)), resume=True,
                  log=lambda s: None)
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    drop = ("seconds", "samples_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(full.rows) == strip(resumed.rows)


def test_existing_run_is_not_overwritten(tmp_path):
    fit(cfg(tmp_path, epochs=1), log=lambda s: None)
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        fit(cfg(tmp_path, epochs=1), log=lambda s: None)


def test_resume_rejects_changed_settings(tmp_path):
    fit(cfg(tmp_path, epochs=1), log=lambda s: None)
    with pytest.raises(ConfigError, match="--lr: the run has 0.001, given 0.5"):
        fit(cfg(tmp_path, epochs=2, lr=0.5), resume=True, log=lambda s: None)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint.pt"):
        fit(cfg(tmp_path, epochs=1), resume=True, log=lambda s: None)


@register("test-nan-in-epoch-2")
class NanLater(ForwardGradient):
    """fg-w whose loss turns NaN after 12 steps (digits has 12 batches of 128)."""

    def estimate(self, inputs, targets):
        stats = super().estimate(inputs, targets)
        return {**stats, "loss": math.nan} if self.steps_done >= 12 else stats


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="epoch 2.*checkpoint of epoch 1.*is kept"):
        fit(cfg(tmp_path, epochs=3, method="test-nan-in-epoch-2"), log=lambda s: None)
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


def test_training_lowers_error_on_digits(tmp_path, device):
    result = fit(cfg(tmp_path, epochs=4, method="bp", lr=1e-2, batch_size=32,
                     device=str(device)),
                   log=lambda s: None)
    assert result.rows[-1]["train_loss"] < result.rows[0]["train_loss"]
    assert result.test_error < 0.15


def test_inplace_sgd_training_lowers_the_loss(tmp_path, device):
    result = fit(cfg(tmp_path, epochs=3, method="zo", optimizer="sgd-inplace", lr=0.05,
                     widths=[], batch_size=32, device=str(device)), log=lambda s: None)
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
    from forwardonly.train.builders import build, make_optimizer

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
    result = fit(dataclasses.replace(config, epochs=3, stop_after=2), log=lambda s: None)
    assert result.rows[-1]["train_loss"] < result.rows[0]["train_loss"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    body_lr, head_lr = (g["lr"] for g in ckpt["optimizer"]["param_groups"])
    assert body_lr == pytest.approx(0.01 * 2 / 3, rel=0.05)
    assert head_lr == pytest.approx(10 * body_lr)  # the scheduler keeps the ratio


def test_head_settings_need_a_model_with_a_head(tmp_path):
    with pytest.raises(ConfigError, match="has no `head` submodule"):
        fit(cfg(tmp_path, epochs=1, method="bp", head_lr_scale=10.0), log=lambda s: None)
    with pytest.raises(ConfigError, match="head_lr_scale must be a positive number"):
        from_dict({"head_lr_scale": 0.0})
    with pytest.raises(ConfigError, match="head_weight_decay must be a non-negative"):
        from_dict({"head_weight_decay": -1.0})


def test_augmentation_changes_training_deterministically(tmp_path, device):
    base = dict(epochs=1, method="bp", lr=1e-2, batch_size=32, device=str(device))
    plain = fit(cfg(tmp_path / "a", **base), log=lambda s: None)
    aug = fit(cfg(tmp_path / "b", augment=["hflip", "shift"], **base), log=lambda s: None)
    again = fit(cfg(tmp_path / "c", augment=["hflip", "shift"], **base), log=lambda s: None)
    assert aug.rows[0]["train_loss"] != plain.rows[0]["train_loss"]
    assert aug.rows[0]["train_loss"] == again.rows[0]["train_loss"]
    with pytest.raises(ConfigError, match="augment must be one of"):
        from_dict({"augment": ["rotate"]})
    with pytest.raises(ConfigError, match="augment is single-process only"):
        from_dict({"augment": ["hflip"], "distributed": "data"})


def test_stop_after_splits_a_run_into_chunks_that_equal_one_run(tmp_path, device):
    # augmentation included: a resumed run must draw the same flips and shifts
    base = dict(epochs=3, method="fg-w", lr=1e-2, train_eval_size=100,
                augment=["hflip", "shift"], device=str(device))
    whole = fit(cfg(tmp_path / "whole", **base), log=lambda s: None)
    first = fit(cfg(tmp_path / "chunks", stop_after=2, **base), log=lambda s: None)
    assert len(first.rows) == 2
    rest = fit(cfg(tmp_path / "chunks", stop_after=2, **base), resume=True,
                 log=lambda s: None)
    assert [r["train_loss"] for r in rest.rows] == [r["train_loss"] for r in whole.rows]
    # measured on 100 examples: a whole number of percent
    assert all(math.isclose(100 * r["train_error"], round(100 * r["train_error"]))
               for r in rest.rows)
    with pytest.raises(ConfigError, match="stop_after must be at least 1"):
        from_dict({"stop_after": 0})


def test_no_decay_biases_decays_weight_matrices_only(tmp_path):
    from forwardonly.train.builders import make_optimizer

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


# -- resume from the command line: the run's own settings -------------------------------------

def _cli(*argv):
    from forwardonly.cli import main

    return main([*argv, "--no-progress"] if argv[0] == "train" else list(argv))


def _params(run_dir):
    return load(run_dir / "checkpoint.pt")["model"]


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_out_alone_equals_the_uninterrupted_run(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("widths: [16]\ndirections: 4\nlr: 0.01\nbatch_size: 64\nepochs: 3\n"
                    "seed: 5\n")
    assert _cli("train", "--config", str(conf), "--out", str(tmp_path / "whole")) == 0
    assert _cli("train", "--config", str(conf), "--out", str(tmp_path / "cut"),
                "--stop-after", "1") == 0
    # neither the file nor any flag: the run decides every setting (not the CLI's defaults)
    assert _cli("train", "--out", str(tmp_path / "cut"), "--resume") == 0
    assert _same_state(_params(tmp_path / "whole"), _params(tmp_path / "cut"))
    # the file again is fine too: it gives nothing the run does not already have
    assert _cli("train", "--config", str(conf), "--out", str(tmp_path / "cut"), "--resume") == 0


def test_resuming_a_finished_run_trains_nothing_unless_asked(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli("train", "--method", "bp", "--epochs", "2", "--widths", "8", "--out",
                str(out)) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert _cli("train", "--out", str(out), "--resume") == 0
    assert "already trained all 2 epochs" in capsys.readouterr().out
    assert (out / "checkpoint.pt").read_bytes() == before
    assert _cli("train", "--out", str(out), "--resume", "--epochs", "3") == 0
    assert load(out / "checkpoint.pt")["epoch"] == 3
    assert _cli("train", "--out", str(out), "--resume", "--epochs", "2") == 2
    assert "fewer than the 3 epochs" in capsys.readouterr().err


def test_resume_auto_starts_then_continues(tmp_path):
    out = tmp_path / "run"
    base = ("train", "--method", "bp", "--widths", "8", "--epochs", "2", "--out", str(out),
            "--resume", "auto")
    assert _cli(*base, "--stop-after", "1") == 0
    assert load(out / "checkpoint.pt")["epoch"] == 1
    assert _cli(*base) == 0
    assert load(out / "checkpoint.pt")["epoch"] == 2


def test_resume_keeps_the_recorded_data_location(tmp_path, monkeypatch):
    from forwardonly.data import resolve_data_dir

    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("mnist", "data") == str(tmp_path / "data")
    assert resolve_data_dir("digits", "data") is None
    monkeypatch.setenv("FORWARDONLY_DATA", "elsewhere")
    assert resolve_data_dir("mnist") == str(tmp_path / "elsewhere")


def test_a_refused_run_leaves_no_directory(tmp_path):
    out = tmp_path / "never"
    assert _cli("train", "--method", "bp", "--directions", "4", "--out", str(out)) == 2
    assert _cli("train", "--out", str(out), "--resume") == 2
    assert not out.exists()


# -- faults a user can meet: one clear message, nothing lost -------------------------------

def test_corrupt_config_yaml_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    fit(cfg(tmp_path, epochs=1), log=lambda s: None)
    (out / "config.yaml").write_text("config: [unclosed\n")
    assert _cli("eval", str(out)) == 2
    err = capsys.readouterr().err
    assert "config.yaml is corrupt" in err and "Traceback" not in err


def test_checkpoint_of_another_shape_is_named(tmp_path, capsys):
    fit(cfg(tmp_path / "a", epochs=1, widths=[8]), log=lambda s: None)
    fit(cfg(tmp_path / "b", epochs=1, widths=[12]), log=lambda s: None)
    (tmp_path / "a" / "run" / "checkpoint.pt").replace(tmp_path / "b" / "run" / "checkpoint.pt")
    assert _cli("eval", str(tmp_path / "b" / "run")) == 2
    assert "holds a model of another shape" in capsys.readouterr().err
    assert _cli("train", "--out", str(tmp_path / "b" / "run"), "--resume", "--epochs", "2") == 2
    assert "holds a model of another shape" in capsys.readouterr().err


def test_a_full_disk_says_what_was_kept(tmp_path, monkeypatch):
    import errno

    from forwardonly.train import RunWriteError, checkpoint

    real_save = checkpoint.save
    calls = []

    def save_then_fill_the_disk(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save", save_then_fill_the_disk)
    with pytest.raises(RunWriteError, match="the disk is full.*checkpoint of epoch 1 .* is "
                                            "intact"):
        fit(cfg(tmp_path, epochs=3), log=lambda s: None)
    assert load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def test_out_of_memory_is_a_clear_error(tmp_path, monkeypatch):
    from forwardonly.train import OutOfMemory, builders

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 800000000000 bytes")

    monkeypatch.setattr(builders, "build_model", no_memory)
    with pytest.raises(OutOfMemory, match="does not fit in the memory of cpu.*smaller"):
        fit(cfg(tmp_path, epochs=1), log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_an_exploding_loss_is_warned_about(tmp_path):
    lines = []
    fit(cfg(tmp_path, epochs=2, method="bp", lr=1e6), log=lines.append)
    assert any(line.startswith("warning: the training loss grew") for line in lines)
    quiet = []
    fit(cfg(tmp_path / "ok", epochs=2, method="bp", lr=1e-2), log=quiet.append)
    assert not any("warning" in line for line in quiet)


def test_train_params_freezes_every_other_parameter(tmp_path):
    result = fit(cfg(tmp_path, epochs=1, method="bp", widths=[8, 8], train_params=["3.*"]),
                 log=lambda s: None)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained == {"3.weight", "3.bias"}
    with pytest.raises(ConfigError, match="'enc.*' matches no parameter.*1.weight"):
        fit(cfg(tmp_path / "b", epochs=1, train_params=["enc.*"]), log=lambda s: None)


def test_train_subset_keeps_k_examples_per_class_from_the_seed(tmp_path):
    from forwardonly.train.builders import class_subset

    y = torch.tensor([0, 1, 1, 0, 2, 1, 0, 0, 2])
    keep = class_subset(y, 2, seed=3)
    assert torch.equal(torch.bincount(y[keep]), torch.tensor([2, 2, 2]))
    assert torch.equal(keep, class_subset(y, 2, seed=3)) and keep.tolist() == sorted(keep)
    assert any(not torch.equal(keep, class_subset(y, 2, seed=s)) for s in range(4, 10))
    result = fit(cfg(tmp_path, epochs=1, method="bp", train_subset=5), log=lambda s: None)
    assert result.rows[0]["samples_per_s"] > 0
    assert result.rows[0]["train_error"] * 50 == round(result.rows[0]["train_error"] * 50)


def test_init_from_starts_from_another_runs_weights(tmp_path):
    first = tmp_path / "first"
    fit(cfg(tmp_path, epochs=3, method="bp", lr=0.02, out=str(first)), log=lambda s: None)
    # a vanishing learning rate: the second run ends where it started, on the first's weights
    config = cfg(tmp_path, epochs=1, method="bp", optimizer="sgd", lr=1e-12, seed=5,
                 init_from=str(first), out=str(tmp_path / "second"))
    second = fit(config, log=lambda s: None)
    mine, theirs = _params(tmp_path / "second"), _params(first)
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=1e-9)
    scratch = fit(dataclasses.replace(config, init_from=None, out=str(tmp_path / "scratch")),
                  log=lambda s: None)
    assert second.rows[0]["train_loss"] < scratch.rows[0]["train_loss"] - 0.5  # trained start
    recorded = yaml.safe_load((tmp_path / "second" / "config.yaml").read_text())
    assert recorded["config"]["init_from"] == str(first.resolve())
    # another shape, or no run there: a clear error before any training
    with pytest.raises(ConfigError, match="another shape"):
        fit(cfg(tmp_path, epochs=1, method="bp", widths=[8], init_from=str(first),
                out=str(tmp_path / "third")), log=lambda s: None)
    with pytest.raises(ConfigError, match="no checkpoint at"):
        fit(cfg(tmp_path, epochs=1, method="bp", init_from=str(tmp_path / "nowhere"),
                out=str(tmp_path / "fourth")), log=lambda s: None)


def test_epoch_size_trains_on_a_new_random_part_of_the_set_each_epoch(tmp_path):
    config = cfg(tmp_path, epochs=3, method="fg-w", batch_size=32, epoch_size=100,
                 schedule="constant")
    result = fit(config, log=lambda s: None)
    assert result.estimator.steps_done == 3 * 4  # ceil(100 / 32) steps per epoch
    assert [r["epoch"] for r in result.rows] == [1, 2, 3]
    # the same run cut in two and resumed: bit-identical (the part is drawn from (seed, epoch))
    fit(dataclasses.replace(config, out=str(tmp_path / "cut"), stop_after=1),
        log=lambda s: None)
    resumed = fit(dataclasses.replace(config, out=str(tmp_path / "cut")), resume=True,
                  log=lambda s: None)
    assert _same_state(_params(tmp_path / "cut"), _params(tmp_path / "run"))
    assert [r["train_loss"] for r in resumed.rows] == [r["train_loss"] for r in result.rows]
    with pytest.raises(ConfigError, match="epoch_size must be at least 1"):
        from_dict({"epoch_size": 0})


def test_by_length_orders_text_examples_and_keeps_their_labels():
    from forwardonly.train.fit import by_length

    pad = 0
    x = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 9, 0, 0], [1, 2, 3, 4], [3, 0, 0, 0]])
    y = torch.tensor([3, 1, 2, 4, 0])
    xs, ys = by_length(x, y, pad)
    lengths = (xs != pad).sum(dim=1)
    assert lengths.tolist() == sorted(lengths.tolist())
    assert sorted(zip(map(tuple, xs.tolist()), ys.tolist(), strict=True)) == sorted(
        zip(map(tuple, x.tolist()), y.tolist(), strict=True))  # the same pairs, reordered
    assert ys.tolist() == [1, 0, 2, 3, 4]  # stable among equal lengths
