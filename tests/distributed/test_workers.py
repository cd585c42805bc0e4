"""Distributed training on localhost with gloo: equal to a single process, faults, recovery.

Each multi-process test forks its ranks (the torchrun environment variables set by hand, the
same code path as under torchrun) and waits for them with a deadline: a hang fails the test
instead of blocking the suite. The recovery test launches the real ``torchrun``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import forwardonly
from forwardonly.config import ConfigError, from_dict
from forwardonly.distributed import launch_ranks, shard_sizes, split_stages, tensor_digest
from forwardonly.distributed.stages import merge_optimizer_states, split_optimizer_state
from forwardonly.estimators.base import Estimator, register
from forwardonly.estimators.forward_gradient import ForwardGradient
from forwardonly.launch import train
from forwardonly.train.checkpoint import load

# 1442 digits training examples at batch 100: 15 steps, the last one of 42 examples
SMALL = dict(dataset="digits", widths=[16, 16], batch_size=100, epochs=1, progress=False,
             lr=3e-3)
FG = dict(SMALL, directions=4)
ATOL = 1e-5  # data parallel vs one process: the same sums, in another order (float32)
# zeroth order divides the float32 rounding of each shard's loss (~1e-7 · L) by 2ε = 2e-3:
# its loss differences, and the parameters after 15 Adam steps, agree less closely
ATOL_ZO = 1e-3
DEADLINE = 90.0  # seconds a group of ranks may take before the test fails as hung
slow = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Any, args: tuple, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        result = {"ok": fn(rank, *args)}
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        result = {"error": type(exc).__name__, "message": str(exc), "at": time.time(),
                  "trace": traceback.format_exc()}
    result["seconds"] = time.time() - t0
    torch.save(result, f"{out}.{rank}")


def run_ranks(world: int, fn: Any, *args: Any, tmp_path: Path,
              wait_for: list[int] | None = None) -> list[dict[str, Any]]:
    """Run ``fn(rank, *args)`` on ``world`` forked ranks; each rank's result or error, plus
    its exit code. Only the ranks in ``wait_for`` (default all) are waited for; the others
    are killed once those are done."""
    ctx = mp.get_context("fork")
    out = str(tmp_path / "result")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, out))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + DEADLINE
    waited = range(world) if wait_for is None else wait_for
    for r in waited:
        procs[r].join(max(0.1, deadline - time.time()))
    hung = [r for r in waited if procs[r].is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still ran after {DEADLINE} s"
    results = []
    for r, p in enumerate(procs):
        path = Path(f"{out}.{r}")
        res = torch.load(path, weights_only=False) if path.exists() else {}
        res["exitcode"] = p.exitcode
        results.append(res)
    return results


def ok(results: list[dict[str, Any]]) -> list[Any]:
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r} failed: {res.get('trace', res)}"
    return [res["ok"] for res in results]


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def single(values: dict[str, Any], out: Path) -> Any:
    return train(from_dict({**values, "out": str(out)}), log=lambda s: None)


# -- rank programs (module level: forked children run them) -----------------------------------
def _train_rank(rank: int, values: dict[str, Any], resume: bool | str = False
                ) -> dict[str, Any]:
    result = train(from_dict(values), resume=resume, log=lambda s: None)
    params = params_of(result.model)
    return {"params": params, "digest": tensor_digest(params), "rows": result.rows}


def _faulty_rank(rank: int, values: dict[str, Any], victim: int, fault: str, at_step: int
                 ) -> dict[str, Any]:
    original = ForwardGradient.estimate

    def estimate(self, inputs, targets):
        if rank == victim and self.steps_done == at_step:
            Path(values["out"] + f".{fault}").write_text(str(time.time()))
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                raise ValueError("injected failure")
        return original(self, inputs, targets)

    ForwardGradient.estimate = estimate
    return _train_rank(rank, values)


# -- data parallel ------------------------------------------------------------------------------
@slow
@pytest.mark.parametrize("method,world", [("fg-w", 1), ("fg-w", 2), ("fg-w", 3), ("zo", 2),
                                          ("bp", 2)])
def test_data_parallel_equals_single_process(tmp_path, method, world):
    values = {**(SMALL if method == "bp" else FG), "method": method}
    one = single(values, tmp_path / "single")
    ranks = ok(run_ranks(world, _train_rank, {**values, "distributed": "data",
                                              "dist_timeout": 30.0,
                                              "out": str(tmp_path / "dp")},
                         tmp_path=tmp_path))
    # every rank holds bit-identical parameters, never having sent any
    assert len({r["digest"] for r in ranks}) == 1
    for p, q in zip(params_of(one.model), ranks[0]["params"], strict=True):
        if world == 1:
            assert torch.equal(p, q)  # one rank is the single-process run, bit for bit
        else:
            torch.testing.assert_close(q, p, rtol=0, atol=ATOL_ZO if method == "zo" else ATOL)
    assert ranks[0]["rows"][0]["train_loss"] == pytest.approx(one.rows[0]["train_loss"],
                                                              rel=1e-5)


@register("test-exact-gradient")
class ExactGradient(Estimator):
    """Backprop that is not ``Backprop``: no scalar hook, so data parallelism averages its
    gradients (the path every other estimator takes)."""

    def estimate(self, inputs, targets):
        for _, p in self.trainable():
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(self.model(inputs), targets)
            loss.backward()
        return {"loss": loss.item(), "batch": float(len(inputs))}


@slow
def test_data_parallel_averages_gradients_of_other_estimators(tmp_path):
    values = {**SMALL, "method": "test-exact-gradient"}
    one = single(values, tmp_path / "single")
    ranks = ok(run_ranks(2, _train_rank, {**values, "distributed": "data",
                                          "dist_timeout": 30.0, "out": str(tmp_path / "dp")},
                         tmp_path=tmp_path))
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for p, q in zip(params_of(one.model), ranks[0]["params"], strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=ATOL)
    # a per-rank statistic is averaged with the shard weights n_r/N: for the shard size
    # itself that is Σ_r n_r²/N per step, and the epoch row weights steps by N
    n = len(forwardonly.load_dataset("digits").train_x)
    steps = [min(100, n - i) for i in range(0, n, 100)]
    expected = sum(sum(m * m for m in shard_sizes(size, 2)) for size in steps) / n
    assert ranks[0]["rows"][0]["batch"] == pytest.approx(expected, rel=1e-6)


# -- stages -------------------------------------------------------------------------------------
@slow
@pytest.mark.parametrize("method,world", [("fg-w", 2), ("fg-w", 3), ("bp", 3)])
def test_stages_equal_single_process(tmp_path, method, world):
    values = {**SMALL, "method": method, **({} if method == "bp" else {"directions": 3})}
    one = single(values, tmp_path / "single")
    ranks = ok(run_ranks(world, _train_rank, {**values, "distributed": "stages",
                                              "dist_timeout": 30.0,
                                              "out": str(tmp_path / "st")},
                         tmp_path=tmp_path))
    staged = [p for r in ranks for p in r["params"]]  # the stages' shards, in model order
    for p, q in zip(params_of(one.model), staged, strict=True):
        assert torch.equal(p, q)  # the same operations on the same numbers
    # rank 0's checkpoint is the single-process checkpoint
    mine, theirs = load(tmp_path / "st" / "checkpoint.pt"), load(tmp_path / "single" /
                                                                 "checkpoint.pt")
    for key, value in theirs["model"].items():
        assert torch.equal(mine["model"][key], value)
    assert mine["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for i, state in theirs["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(mine["optimizer"]["state"][i][name], value)


@slow
def test_stage_run_resumes_on_every_rank(tmp_path):
    values = {**FG, "method": "fg-w", "schedule": "constant"}
    whole = single({**values, "epochs": 2}, tmp_path / "single")
    dist_values = {**values, "distributed": "stages", "dist_timeout": 30.0,
                   "out": str(tmp_path / "st")}
    ok(run_ranks(2, _train_rank, dist_values, tmp_path=tmp_path))
    ranks = ok(run_ranks(2, _train_rank, {**dist_values, "epochs": 2}, True,
                         tmp_path=tmp_path))
    staged = [p for r in ranks for p in r["params"]]
    for p, q in zip(params_of(whole.model), staged, strict=True):
        assert torch.equal(p, q)
    assert [r["epoch"] for r in ranks[0]["rows"]] == [1, 2]


@slow
def test_stage_run_cut_inside_an_epoch_resumes_on_every_rank(tmp_path):
    # --max-steps stops inside epoch 1, --checkpoint-every saves there too: every rank takes
    # part in each checkpoint and resumes from the same batch
    values = {**FG, "method": "fg-w", "schedule": "constant", "epochs": 2,
              "checkpoint_every": 3}
    whole = single({**values, "max_steps": 22}, tmp_path / "single")
    dist_values = {**values, "distributed": "stages", "dist_timeout": 30.0,
                   "out": str(tmp_path / "st")}
    ok(run_ranks(2, _train_rank, {**dist_values, "max_steps": 7}, tmp_path=tmp_path))
    assert load(tmp_path / "st" / "checkpoint.pt")["step"] == 7
    ranks = ok(run_ranks(2, _train_rank, {**dist_values, "max_steps": 22}, True,
                         tmp_path=tmp_path))
    staged = [p for r in ranks for p in r["params"]]
    for p, q in zip(params_of(whole.model), staged, strict=True):
        assert torch.equal(p, q)
    assert [(r["epoch"], r["step"]) for r in ranks[0]["rows"]] == [(1, 7), (1, 15), (2, 22)]


# -- faults -------------------------------------------------------------------------------------
def _fault_values(tmp_path: Path, timeout: float) -> dict[str, Any]:
    return {**FG, "epochs": 2, "method": "fg-w", "distributed": "data",
            "dist_timeout": timeout, "out": str(tmp_path / "run")}


@slow
def test_killed_rank_is_named_by_the_others(tmp_path):
    values = _fault_values(tmp_path, timeout=30.0)
    results = run_ranks(3, _faulty_rank, values, 1, "kill", 4, tmp_path=tmp_path)
    killed_at = float(Path(values["out"] + ".kill").read_text())
    assert results[1]["exitcode"] == -signal.SIGKILL
    for r in (0, 2):
        assert results[r]["error"] == "RankFailure", results[r]
        assert "rank 1 stopped responding" in results[r]["message"]
        # the peer's closed connection is seen at once; the others' check-in takes seconds
        assert results[r]["at"] - killed_at < 30.0


@slow
def test_stopped_rank_is_named_within_the_timeout(tmp_path):
    values = _fault_values(tmp_path, timeout=12.0)
    results = run_ranks(2, _faulty_rank, values, 1, "stop", 3, tmp_path=tmp_path, wait_for=[0])
    stopped_at = float(Path(values["out"] + ".stop").read_text())
    assert results[0]["error"] == "RankFailure", results[0]
    assert "rank 1 stopped responding" in results[0]["message"]
    assert "dist_timeout = 12 s" in results[0]["message"]
    # the collective times out after dist_timeout, the check-in takes max(2, T/10) more
    assert 12.0 <= results[0]["at"] - stopped_at < 12.0 + 2.0 + 10.0


@slow
def test_failing_rank_is_named_with_its_error(tmp_path):
    values = _fault_values(tmp_path, timeout=60.0)
    results = run_ranks(2, _faulty_rank, values, 1, "raise", 2, tmp_path=tmp_path)
    assert results[1]["error"] == "ValueError"
    assert results[0]["error"] == "RankFailure"
    assert "rank 1 failed: ValueError: injected failure" in results[0]["message"]


@slow
def test_mismatched_settings_are_caught_at_start(tmp_path):
    results = run_ranks(2, _mismatched_rank, tmp_path, {"lr": (3e-3, 1e-2)}, tmp_path=tmp_path)
    for res in results:
        assert res["error"] == "ConfigError"
        assert "rank 1 differs from rank 0" in res["message"]
        assert "lr: rank 0 has 0.003, rank 1 has 0.01" in res["message"]
    assert not (tmp_path / "run").exists()


@slow
def test_mismatched_resume_is_refused_at_start(tmp_path):
    results = run_ranks(2, _mismatched_rank, tmp_path, {"resume": (False, True)},
                        tmp_path=tmp_path)
    for res in results:
        assert res["error"] == "ConfigError", res
        assert "resume: rank 0 has False, rank 1 has True" in res["message"]
        assert "Give --resume (with the same value) to every rank or to none" in res["message"]
    assert not (tmp_path / "run").exists()


@slow
def test_an_error_on_the_writer_reaches_every_rank(tmp_path):
    # --resume on every rank, nothing to resume: rank 0's planning fails, every rank says so
    results = run_ranks(2, _mismatched_rank, tmp_path, {"resume": (True, True)},
                        tmp_path=tmp_path)
    for res in results:
        assert res["error"] == "ConfigError", res
        assert "holds no checkpoint.pt to continue from" in res["message"]


def _mismatched_rank(rank: int, tmp_path: Path, differ: dict[str, tuple[Any, Any]]
                     ) -> dict[str, Any]:
    values = {**FG, "distributed": "data", "dist_timeout": 30.0, "out": str(tmp_path / "run")}
    values.update({k: v[rank] for k, v in differ.items() if k != "resume"})
    return _train_rank(rank, values, differ.get("resume", (False, False))[rank])

# -- without processes ---------------------------------------------------------------------------
def test_torchrun_environment_is_required():
    with pytest.raises(ConfigError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT is not"):
        launch_ranks({})
    assert launch_ranks({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h",
                         "MASTER_PORT": "29500", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(ConfigError, match="do not describe a rank"):
        launch_ranks({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="distributed must be one of"):
        from_dict({"distributed": "pipeline"})
    with pytest.raises(ConfigError, match="dist_timeout must be a positive"):
        from_dict({"dist_timeout": 0.0})

def test_shards_and_stage_split():
    assert shard_sizes(37, 3) == [13, 12, 12] and shard_sizes(2, 3) == [1, 1, 0]
    model = forwardonly.build_model("mlp", (1, 8, 8), 10, widths=[64, 32, 32])
    stages = split_stages(model, 2)
    assert [[n for n, _ in s] for s in stages] == [["0", "1", "2"], ["3", "4", "5", "6", "7"]]
    assert len(split_stages(model, 4)) == 4
    with pytest.raises(ConfigError, match="needs at least 5 layers with trainable"):
        split_stages(model, 5)


def test_optimizer_state_split_and_merge_round_trip():
    model = forwardonly.build_model("mlp", (1, 8, 8), 10, widths=[8, 8])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    whole = opt.state_dict()
    parts = [split_optimizer_state(whole, 0, 2), split_optimizer_state(whole, 2, 4)]
    assert sorted(parts[1]["state"]) == [0, 1, 2, 3]
    merged = merge_optimizer_states(parts, [2, 4])
    assert merged["param_groups"] == whole["param_groups"]
    for i, state in whole["state"].items():
        for name, value in state.items():
            assert torch.equal(merged["state"][i][name], value)


# -- recovery under torchrun ----------------------------------------------------------------------
ENTRY = """\
import json, os, signal, sys
from forwardonly.config import from_dict
from forwardonly.distributed import record_errors
from forwardonly.estimators.forward_gradient import ForwardGradient
from forwardonly.launch import train

values, victim, at_step = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == str(victim):
    original = ForwardGradient.estimate

    def estimate(self, inputs, targets):
        if self.steps_done == at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, inputs, targets)

    ForwardGradient.estimate = estimate
record_errors(train)(from_dict(values), resume="auto")
"""


@slow
def test_max_restarts_recovers_a_killed_rank_bit_identically(tmp_path):
    values = {**FG, "epochs": 3, "method": "fg-w", "distributed": "data",
              "dist_timeout": 60.0}
    ok(run_ranks(2, _train_rank, {**values, "out": str(tmp_path / "whole")}, tmp_path=tmp_path))
    script = tmp_path / "entry.py"
    script.write_text(ENTRY)
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    # rank 1 kills itself in epoch 2 (step 20 of 45); torchrun restarts both ranks once
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           str(script), json.dumps({**values, "out": str(run)}), "1", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(forwardonly.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * DEADLINE, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run} after epoch 1 of 3" in done.stdout
    state = load(run / "checkpoint.pt")
    assert state["epoch"] == 3 and [r["epoch"] for r in state["rows"]] == [1, 2, 3]
    whole = load(tmp_path / "whole" / "checkpoint.pt")
    assert state["model"].keys() == whole["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(state["model"][key], value), key


@slow
def test_the_command_line_under_torchrun(tmp_path):
    """The README's launch: two ranks of `forwardonly train`, then `forwardonly eval`."""
    run = tmp_path / "dp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(forwardonly.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "forwardonly", "train",
           "--distributed", "data", "--widths", "16", "--directions", "2", "--epochs", "2",
           "--no-progress", "--resume", "auto", "--out", str(run)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * DEADLINE, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test error") == 1  # rank 0 speaks for the group
    assert load(run / "checkpoint.pt")["epoch"] == 2
    evaluated = subprocess.run([sys.executable, "-m", "forwardonly", "eval", str(run)],
                               capture_output=True, text=True, timeout=DEADLINE, env=env)
    assert evaluated.returncode == 0 and "epoch 2, fg-w on digits" in evaluated.stdout
