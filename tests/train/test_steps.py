"""Step budgets (--max-steps), checkpoints inside an epoch (--checkpoint-every) and their exact
resume, and measuring test only at the end (--eval-test end)."""

import csv
import importlib
import json

import pytest
import torch

import forwardonly
from forwardonly import seeding
from forwardonly.config import ConfigError, from_dict, takes
from forwardonly.train import fit
from forwardonly.train.checkpoint import CheckpointError, load, save

# digits: 1,437 training examples, so 23 steps of 64 per epoch
SMALL = dict(dataset="digits", widths=[16], batch_size=64, progress=False, directions=2,
             train_eval_size=100)
PER_EPOCH = 23
fit_module = importlib.import_module("forwardonly.train.fit")  # the name `fit` is the function
QUIET = dict(log=lambda s: None)


def cfg(out, **kw):
    values = {**SMALL, "out": str(out), **kw}
    if not takes(forwardonly.ESTIMATORS[values.get("method", "fg-w")], "directions"):
        del values["directions"]  # an option of other methods: rejected here
    return from_dict(values)


def same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(),
                                                 strict=True))


def drop_timing(row):
    return {k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}


# The schedule spans the run's budget, so the cut run and the whole one have the same
# schedule only when it does not decay: constant (MeZO's), warmup included.
CASES = {
    "bp": dict(method="bp", lr=1e-2, augment=["shift"]),  # the augmentation stream too
    "zo": dict(method="zo", optimizer="sgd-inplace", lr=1e-2),
    "fg-w": dict(method="fg-w", lr=1e-2, warmup_epochs=0.5),
    # the noise table is drawn again from the seed when the run resumes
    "fg-w table": dict(method="fg-w", distribution="gaussian-table", table_factor=2, lr=1e-2),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_max_steps_cut_mid_epoch_then_resumed_equals_one_run(tmp_path, device, method):
    base = dict(epochs=3, schedule="constant", device=str(device), **CASES[method])
    whole = fit(cfg(tmp_path / "whole", max_steps=40, **base), **QUIET)
    assert whole.estimator.steps_done == 40
    assert [(r["epoch"], r["step"]) for r in whole.rows] == [(1, PER_EPOCH), (2, 40)]

    cut = fit(cfg(tmp_path / "cut", max_steps=17, **base), **QUIET)
    assert [(r["epoch"], r["step"]) for r in cut.rows] == [(1, 17)]  # evaluated, logged
    assert cut.rows[0]["test_error"] is not None
    state = load(tmp_path / "cut" / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["steps_per_epoch"]) == (17, 0, PER_EPOCH)
    assert ("augment_rng" in state) == ("augment" in CASES[method])

    resumed = fit(cfg(tmp_path / "cut", max_steps=40, **base), resume=True, **QUIET)
    assert same_params(whole, resumed)
    assert resumed.estimator.steps_done == 40
    assert [(r["epoch"], r["step"]) for r in resumed.rows] == [(1, 17), (1, PER_EPOCH),
                                                              (2, 40)]
    # the last row covers the same steps (24 to 40) in both runs: the same numbers
    assert drop_timing(resumed.rows[-1]) == drop_timing(whole.rows[-1])


def test_a_run_killed_inside_an_epoch_resumes_from_checkpoint_every(tmp_path, device,
                                                                     monkeypatch):
    # cosine schedule and augmentation: nothing about the run changes, only when it is saved
    base = dict(epochs=2, method="fg-w", lr=1e-2, augment=["hflip", "shift"],
                device=str(device))
    whole = fit(cfg(tmp_path / "whole", **base), **QUIET)

    real_step, calls = fit_module._train_step, []

    def killed_at_step_33(*args, **kwargs):
        calls.append(1)
        if len(calls) == 33:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(fit_module, "_train_step", killed_at_step_33)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg(tmp_path / "cut", checkpoint_every=5, **base), **QUIET)
    monkeypatch.setattr(fit_module, "_train_step", real_step)
    state = load(tmp_path / "cut" / "checkpoint.pt")
    assert (state["step"], state["epoch"]) == (30, 1)  # epoch 2, batch 7 of 23
    assert [r["step"] for r in state["rows"]] == [PER_EPOCH]

    lines = []
    resumed = fit(cfg(tmp_path / "cut", **base), resume=True, log=lines.append)
    assert any("after step 30: epoch 2 of 2 from batch 8 of 23" in line for line in lines)
    assert same_params(whole, resumed)
    # no row at the checkpoints: epoch 2's row covers the whole epoch, as in the one run
    assert [drop_timing(r) for r in resumed.rows] == [drop_timing(r) for r in whole.rows]


def test_epochs_and_max_steps_whichever_comes_first(tmp_path):
    lines = []
    run = fit(cfg(tmp_path / "a", method="bp", epochs=1, max_steps=100), log=lines.append)
    assert run.estimator.steps_done == PER_EPOCH
    assert any("--epochs 1 ends the run after 23 steps" in line and "--epochs 5" in line
               for line in lines)
    lines.clear()
    run = fit(cfg(tmp_path / "b", method="bp", epochs=3, max_steps=5), log=lines.append)
    assert run.estimator.steps_done == 5 and [r["step"] for r in run.rows] == [5]
    assert any("stopped at step 5 (--max-steps)" in line for line in lines)
    # the schedule spans the 5 steps: cosine reaches 0 at the last one
    assert run.rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_resume_may_change_max_steps_but_not_below_what_was_trained(tmp_path):
    out = tmp_path / "run"
    fit(cfg(out, method="bp", schedule="constant", max_steps=17), **QUIET)
    lines = []
    fit(cfg(out, method="bp", schedule="constant", max_steps=17), resume=True,
        log=lines.append)
    assert any("already trained its 17 steps" in line for line in lines)
    with pytest.raises(ConfigError, match="--max-steps 10 is fewer than the 17 steps"):
        fit(cfg(out, method="bp", schedule="constant", max_steps=10), resume=True, **QUIET)
    fit(cfg(out, method="bp", schedule="constant", max_steps=30, checkpoint_every=4,
            eval_test="end"), resume=True, **QUIET)
    assert load(out / "checkpoint.pt")["step"] == 30
    with pytest.raises(ConfigError, match="--epochs 1 is fewer than the 2 epochs .* \\(the "
                                          "last in part\\)"):
        fit(cfg(out, method="bp", schedule="constant", max_steps=30, epochs=1), resume=True,
            **QUIET)


def test_step_settings_are_checked(tmp_path):
    for name in ("max_steps", "checkpoint_every"):
        with pytest.raises(ConfigError, match=f"{name} must be at least 1 when set; got 0"):
            from_dict({name: 0})
        with pytest.raises(ConfigError, match=f"{name} must be an integer; got 2.5"):
            from_dict({name: 2.5})
    with pytest.raises(ConfigError, match="eval_test must be one of end, every; got 'never'"):
        from_dict({"eval_test": "never"})
    with pytest.raises(ConfigError, match="--warmup-epochs 1.0 is 23 steps here .* more than "
                                          "--max-steps 10"):
        fit(cfg(tmp_path / "run", method="bp", warmup_epochs=1, max_steps=10), **QUIET)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_without_the_step_fields_still_resumes(tmp_path):
    base = dict(method="bp", lr=1e-2)
    whole = fit(cfg(tmp_path / "whole", epochs=2, **base), **QUIET)
    fit(cfg(tmp_path / "old", epochs=2, stop_after=1, **base), **QUIET)
    path = tmp_path / "old" / "checkpoint.pt"
    state = load(path)  # as the format before steps wrote it
    for key in ("format", "step", "steps_per_epoch"):
        del state[key]
    state["rows"] = [{k: v for k, v in r.items() if k != "step"} for r in state["rows"]]
    save(state, path)
    resumed = fit(cfg(tmp_path / "old", epochs=2, **base), resume=True, **QUIET)
    assert same_params(whole, resumed)
    assert [r["step"] for r in resumed.rows] == [PER_EPOCH, 2 * PER_EPOCH]  # filled in

    state = load(path)
    save({**state, "format": 99}, path)
    with pytest.raises(CheckpointError, match="checkpoint format 99, newer than"):
        fit(cfg(tmp_path / "old", epochs=3, **base), resume=True, **QUIET)
    save({**state, "steps_per_epoch": 7}, path)
    with pytest.raises(ConfigError, match="written with 7 steps per epoch, but the training "
                                          "data now gives 23"):
        fit(cfg(tmp_path / "old", epochs=3, **base), resume=True, **QUIET)


def test_eval_test_end_measures_test_at_the_end_of_each_call_only(tmp_path):
    base = dict(method="bp", lr=1e-2, epochs=3)
    every = fit(cfg(tmp_path / "every", **base), **QUIET)
    out = tmp_path / "end"
    first = fit(cfg(out, eval_test="end", stop_after=2, **base), **QUIET)
    assert [r["test_error"] is None for r in first.rows] == [True, False]  # the call's end
    end = fit(cfg(out, eval_test="end", **base), resume=True, **QUIET)
    assert [r["test_error"] is None for r in end.rows] == [True, False, False]
    assert end.test_error == every.test_error
    assert all(r["val_error" if "val_error" in r else "train_error"] is not None
               for r in end.rows)
    with open(out / "metrics.csv") as fh:
        assert [r["test_error"] == "" for r in csv.DictReader(fh)] == [True, False, False]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert jsonl[0]["test_error"] is None and jsonl[-1]["test_error"] == end.test_error
    assert (out / "learning_curve.png").stat().st_size > 0


def test_result_test_error_is_nan_when_the_last_row_has_none(tmp_path):
    import math

    from forwardonly.train import RunResult

    result = RunResult(tmp_path, [{"epoch": 1, "test_error": None}], torch.nn.Linear(1, 1),
                       None)
    assert math.isnan(result.test_error)
    assert math.isnan(RunResult(tmp_path, [], torch.nn.Linear(1, 1), None).test_error)


# -- the command line --------------------------------------------------------------------------

def _cli(*argv):
    from forwardonly.cli import main

    return main([*argv, "--no-progress"] if argv[0] == "train" else list(argv))


def test_help_teaches_the_step_flags(capsys):
    from forwardonly.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-steps MAX_STEPS", "--checkpoint-every CHECKPOINT_EVERY",
                 "--eval-test EVAL_TEST"):
        assert flag in text
    assert "whichever comes first" in text and "loses at most N steps" in text


def test_cli_cut_by_max_steps_then_resumed_with_more(tmp_path, capsys):
    flags = ("--method", "bp", "--widths", "8", "--batch-size", "64", "--epochs", "2",
             "--schedule", "constant", "--train-eval-size", "100")
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert _cli("train", *flags, "--max-steps", "30", "--out", whole) == 0
    assert _cli("train", *flags, "--max-steps", "10", "--eval-test", "end", "--out", cut) == 0
    assert _cli("eval", cut) == 0
    assert "step 10 (epoch 1, batch 10 of 23), bp on digits" in capsys.readouterr().out
    assert _cli("train", "--out", cut, "--resume", "--max-steps", "30") == 0
    a, b = load(tmp_path / "whole" / "checkpoint.pt"), load(tmp_path / "cut" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _cli("train", "--out", cut, "--max-steps", "0") == 2
    assert "max_steps must be at least 1 when set; got 0" in capsys.readouterr().err


# -- the random state of CUDA devices ------------------------------------------------------

class FakeCuda:
    """torch.cuda as a machine with ``count`` initialised devices sees it (states recorded)."""

    def __init__(self, count, seed=0):
        self.count = count
        self.states = [torch.full((4,), seed + i, dtype=torch.uint8) for i in range(count)]

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(cuda, "set_rng_state",
                            lambda s, device: self.states.__setitem__(device, s.clone()))


def test_checkpoints_keep_and_restore_the_random_state_of_cuda_devices(tmp_path, monkeypatch):
    fit(cfg(tmp_path / "run", method="fg-w", epochs=1, max_steps=5), **QUIET)
    assert "cuda_rng" not in load(tmp_path / "run" / "checkpoint.pt")  # no CUDA in use
    saved = FakeCuda(2, seed=7)
    saved.install(monkeypatch)
    state = seeding.rng_state()
    assert [s.tolist() for s in state["cuda_rng"]] == [[7] * 4, [8] * 4]
    assert torch.equal(state["rng"], torch.get_rng_state())

    resumed, notes = FakeCuda(2), []
    resumed.install(monkeypatch)
    seeding.restore_rng_state(state, notes.append)
    assert [s.tolist() for s in resumed.states] == [[7] * 4, [8] * 4] and not notes
    fewer = FakeCuda(1)
    fewer.install(monkeypatch)
    seeding.restore_rng_state(state, notes.append)
    assert fewer.states[0].tolist() == [7] * 4
    assert notes == ["the checkpoint holds the random state of 2 CUDA device(s) and this "
                     "machine has 1: the first 1 are restored"]
