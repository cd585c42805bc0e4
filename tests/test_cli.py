"""Command line and config files: flags mirror the config, bad settings get clear errors."""

import pytest

from forwardonly.cli import build_parser, main
from forwardonly.config import ConfigError, TrainConfig, fields, from_dict, load_file


def test_help_explains_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in fields():
        assert "--" + f.name.replace("_", "-") in text
    assert "--resume" in text
    import forwardonly

    flat = " ".join(text.split())
    for name in [*forwardonly.ESTIMATORS, *forwardonly.MODELS]:  # every registered one
        assert f"{name} = " in flat, name


def test_top_level_help_does_not_load_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom forwardonly.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "compare" in done.stdout


def test_unknown_and_mistyped_keys_are_all_reported():
    with pytest.raises(ConfigError) as info:
        from_dict({"lrr": 0.1, "epochs": "ten", "method": "fgw"})
    message = str(info.value)
    assert "unknown key 'lrr'" in message and "did you mean" in message
    assert "epochs must be an integer" in message


def test_invalid_values_are_reported():
    with pytest.raises(ConfigError) as info:
        from_dict({"method": "fgw", "lr": -1.0, "batch_size": 0})
    message = str(info.value)
    assert "method must be one of" in message and "'fgw'" in message
    assert "lr must be a positive number" in message
    assert "batch_size must be at least 1" in message


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "method: zo\nwidths: [8, 8]\nlr: 0.01\n"),
    (".toml", 'method = "zo"\nwidths = [8, 8]\nlr = 0.01\n'),
])
def test_config_files_mirror_the_flags(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    cfg = from_dict(load_file(path))
    assert (cfg.method, cfg.widths, cfg.lr) == ("zo", [8, 8], 0.01)
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "0.5"])
    from forwardonly.cli import given_settings

    cfg = from_dict(given_settings(args))
    assert cfg.lr == 0.5 and cfg.method == "zo"  # flags override the file


def test_bad_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="must end in .yaml, .yml or .toml"):
        load_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "none.yaml")


def test_train_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--epochs", "1", "--widths", "8", "--no-progress", "--out", str(out)])
    assert code == 0
    assert "test error" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 0
    assert "test error" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress",
                 "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("forwardonly: error:") and "Traceback" not in err
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_experiment_settings_out_of_range_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, before any work
        main(["experiment", "dimension-curse", "--pairs", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--pairs: must be at least 1, got 0" in capsys.readouterr().err
    # a check inside the experiment (n-min above n-max) is a one-line error too
    code = main(["experiment", "dimension-curse", "--n-min", "9", "--n-max", "5",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "experiment dimension-curse: need 2 <= --n-min <= --n-max" in err


def test_defaults_are_valid():
    TrainConfig().validate()


@pytest.mark.parametrize("name", ["quickstart", "ff-mnist-supervised", "ff-mnist-unsupervised"])
def test_shipped_config_files_are_valid(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    config = from_dict(load_file(path))
    assert config.seed == 0
    if name.startswith("ff-"):
        assert (config.method, config.model, config.head_lr_scale) == ("ff", "ff-mlp", 10.0)
        assert config.schedule == "half-linear" and not config.standardize


@pytest.mark.slow
def test_fine_tuning_the_real_minilm_writes_a_run(tmp_path, capsys):
    """A few in-place MeZO steps of all-MiniLM-L6-v2 (from its wheel, offline) on a tiny TSV."""
    import json

    pytest.importorskip("transformers")
    data = tmp_path / "data"
    data.mkdir()
    good = ["a gripping , funny film", "warm and wise", "the best of the year", "a delight"]
    bad = ["dull and lifeless", "a mess", "tedious beyond words", "nothing works here"]
    rows = [f"{i % 2}\t{(bad if i % 2 == 0 else good)[i // 2 % 4]}" for i in range(16)]
    for name, n in (("train.tsv", 16), ("dev.tsv", 8), ("test.tsv", 8)):
        (data / name).write_text("label\tsentence\n" + "\n".join(rows[:n]) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "tsv", "--data-dir", str(data), "--model", "minilm",
                 "--method", "zo", "--optimizer", "sgd-inplace", "--lr", "1e-4",
                 "--train-params", "encoder.encoder.layer.5.*", "head.*", "--exact-head",
                 "--batch-size", "8", "--epochs", "2", "--no-progress", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_error" in r for r in rows)
    assert main(["eval", str(out)]) == 0
    assert "epoch 2, zo on tsv" in capsys.readouterr().out
