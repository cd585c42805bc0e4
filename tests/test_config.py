"""The config: options belong to their model and method, every shipped file is valid."""

from pathlib import Path

import pytest
import torch

import forwardonly
from forwardonly.cli import compare_configs
from forwardonly.config import (
    METHOD_OPTIONS,
    MODEL_OPTIONS,
    ConfigError,
    TrainConfig,
    fields,
    from_dict,
    load_file,
    takes,
)
from forwardonly.models import MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.*"))


def test_there_are_config_files():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_file_loads_and_validates(path):
    config = from_dict(load_file(path))
    config.validate()
    assert config.method in forwardonly.ESTIMATORS and config.model in MODELS


def test_a_method_option_the_method_does_not_take_is_rejected_by_name():
    with pytest.raises(ConfigError) as info:
        from_dict({"method": "bp", "directions": 8, "epsilon": 0.1})
    message = str(info.value)
    assert "--directions has no effect with --method bp" in message
    assert "--epsilon has no effect with --method bp" in message
    assert "zo" in message  # it names the methods that do take it


def test_a_model_option_the_model_does_not_take_is_rejected():
    with pytest.raises(ConfigError, match="--preset has no effect with --model mlp"):
        from_dict({"model": "mlp", "preset": "S/1/1"})
    with pytest.raises(ConfigError, match="--widths has no effect with --model local-mixer"):
        from_dict({"model": "local-mixer", "method": "bp", "widths": [8]})


def test_the_noise_table_belongs_to_fg_w_and_its_distribution():
    with pytest.raises(ConfigError, match="gaussian-table .* fg-w and fg-sign, not zo"):
        from_dict({"method": "zo", "distribution": "gaussian-table"})
    with pytest.raises(ConfigError, match="--table-factor has no effect with --distribution "
                       "gaussian"):
        from_dict({"table_factor": 8})
    with pytest.raises(ConfigError, match="table_factor must be at least 1"):
        from_dict({"distribution": "gaussian-table", "table_factor": 0})
    config = from_dict({"distribution": "gaussian-table", "table_factor": 8})
    assert config.method_options()["table_factor"] == 8


def test_momentum_belongs_to_sgd():
    with pytest.raises(ConfigError, match="--momentum has no effect with --optimizer adam"):
        from_dict({"momentum": 0.5})
    assert from_dict({"optimizer": "sgd", "momentum": 0.5}).momentum == 0.5


def test_options_reach_exactly_the_estimator_and_model_that_take_them():
    config = from_dict({"method": "zo", "directions": 3, "epsilon": 0.01, "widths": [4]})
    assert config.method_options() == {"directions": 3, "distribution": "gaussian",
                                       "direction_rank": 4, "exact_head": False,
                                       "epsilon": 0.01, "micro_batch": None, "seed": 0}
    assert config.model_options() == {"widths": [4], "activation": "relu"}


def test_every_option_is_taken_by_some_model_or_method():
    for name in METHOD_OPTIONS:
        assert any(takes(cls, name) for cls in forwardonly.ESTIMATORS.values()), name
    for name in MODEL_OPTIONS:
        assert any(takes(b, name) for b in MODELS.values()), name
    assert set(METHOD_OPTIONS) | set(MODEL_OPTIONS) <= {f.name for f in fields()}


def test_threads_and_device_are_checked():
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        from_dict({"threads": -1})
    with pytest.raises(ConfigError, match="device must be cpu or cuda"):
        from_dict({"device": "tpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="'cuda' was asked for.*use --device cpu"):
        from_dict({"device": "cuda"})


def test_compare_gives_each_method_only_its_own_options(tmp_path):
    given = {"method": "fg-w", "directions": 8, "epsilon": 0.01, "out": str(tmp_path)}
    fgw, zo, bp = compare_configs(given, ["fg-w", "zo", "bp"])
    assert (fgw.directions, fgw.epsilon) == (8, TrainConfig().epsilon)
    assert (zo.directions, zo.epsilon) == (8, 0.01)
    assert bp.method == "bp" and bp.out == str(tmp_path / "bp")


def test_compare_checks_every_method_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'fgw'"):
        compare_configs({"out": str(tmp_path / "c")}, ["bp", "fgw"])
    with pytest.raises(ConfigError, match="method lg-fg-a"):  # needs a LocalMixer or MLP
        compare_configs({"out": str(tmp_path / "c"), "model": "cnn"}, ["bp", "lg-fg-a"])
    assert not (tmp_path / "c").exists()


def test_text_data_goes_with_a_text_model():
    with pytest.raises(ConfigError, match="dataset sst2 is text: train it with a text model"):
        from_dict({"dataset": "sst2", "model": "mlp"})
    with pytest.raises(ConfigError, match="model minilm reads text"):
        from_dict({"dataset": "digits", "model": "minilm"})
    with pytest.raises(ConfigError, match="--max-length has no effect with --dataset digits"):
        from_dict({"max_length": 64})
    assert from_dict({"dataset": "sst2", "model": "minilm", "max_length": 64}).max_length == 64


def test_in_place_head_rate_needs_an_exact_head():
    with pytest.raises(ConfigError, match="--head-lr-scale needs --exact-head"):
        from_dict({"method": "zo", "optimizer": "sgd-inplace", "head_lr_scale": 10.0})
    config = from_dict({"method": "zo", "optimizer": "sgd-inplace", "head_lr_scale": 10.0,
                        "exact_head": True})
    assert config.head_lr_scale == 10.0
    with pytest.raises(ConfigError, match="head_weight_decay needs a torch optimizer"):
        from_dict({"method": "zo", "optimizer": "sgd-inplace", "head_weight_decay": 0.1})
