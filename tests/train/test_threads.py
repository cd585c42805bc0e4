"""The ``threads`` setting: a count, ``auto`` (the default) or null, checked with clear errors."""

import importlib

import pytest
import torch

from forwardonly.config import ConfigError, TrainConfig, from_dict

threads_module = importlib.import_module("forwardonly.train.threads")
AUTO_THREADS_MIN_WORK = threads_module.AUTO_THREADS_MIN_WORK
auto_threads, set_threads = threads_module.auto_threads, threads_module.set_threads


def test_threads_accepts_auto_counts_and_null():
    assert TrainConfig().threads == "auto"
    assert from_dict({}).threads == "auto"
    assert from_dict({"threads": 3}).threads == 3
    assert from_dict({"threads": "2"}).threads == 2  # the command line gives strings
    assert from_dict({"threads": None}).threads is None  # torch's own choice


@pytest.mark.parametrize("bad,match", [
    (0, "threads must be at least 1 or 'auto'; got 0"),
    ("-2", "threads must be at least 1 or 'auto'; got -2"),
    ("many", "threads must be a positive integer or 'auto'; got 'many'"),
    (True, "threads must be a positive integer or 'auto'; got True"),
    (1.5, "threads must be a positive integer or 'auto'; got 1.5"),
])
def test_bad_threads_are_clear_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"threads": bad})


def test_auto_threads_is_one_for_small_steps_or_busy_cores(monkeypatch):
    assert auto_threads(AUTO_THREADS_MIN_WORK - 1) == 1
    monkeypatch.setattr(threads_module, "TORCH_THREADS", 8)
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda pid: set(range(8)),
                        raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads_module.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert auto_threads(AUTO_THREADS_MIN_WORK) == 8  # idle machine, large step
    assert auto_threads() == 8
    monkeypatch.setattr(threads_module.os, "getloadavg", lambda: (5.4, 0.0, 0.0))
    assert auto_threads(AUTO_THREADS_MIN_WORK) == 3  # the cores the load leaves idle
    monkeypatch.setattr(threads_module.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert auto_threads(AUTO_THREADS_MIN_WORK) == 1  # every core busy: never fewer than 1
    monkeypatch.setattr(threads_module.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_threads(AUTO_THREADS_MIN_WORK) == 2  # shared among 4 processes


def test_set_threads_applies_counts_and_leaves_null_alone():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)
        assert torch.get_num_threads() == 1
        set_threads("auto")
        assert torch.get_num_threads() >= 1
    finally:
        torch.set_num_threads(before)
