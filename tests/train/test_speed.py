"""--compile and --precision: the same steps, compiled or under bfloat16 autocast."""

import time

import pytest
import torch
import torch.nn.functional as F

import forwardonly
from forwardonly.config import BF16_METHODS, ConfigError, from_dict
from forwardonly.train.worker import speed_up


def _losses(method, device, *, compile=False, precision="float32", steps=4):
    torch.manual_seed(0)
    if method in ("l-bp", "lg-bp"):
        model = forwardonly.build_model("local-mixer", (1, 8, 8), 10, preset="tiny")
    else:
        model = forwardonly.build_model("mlp", (1, 8, 8), 10, widths=[16])
    model = model.to(device)
    options = {"directions": 4} if method in ("fg-w", "fg-sign") else {}
    est = forwardonly.make_estimator(method, model, F.cross_entropy, seed=0, **options)
    speed_up(est, compile=compile, precision=precision, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 8, 8, generator=gen).to(device)
    y = torch.randint(0, 10, (32,), generator=gen).to(device)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        out.append(est.step(x, y)["loss"])
        opt.step()
    return out


@pytest.mark.slow  # compiling both steps takes about 30-60 s on a 2-core CPU
@pytest.mark.parametrize("method", ["bp", "fg-w"])
def test_compile_gives_the_same_loss_trajectory(method, device):
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    eager = _losses(method, device)
    t0 = time.perf_counter()
    try:
        compiled = _losses(method, device, compile=True)
    except Exception as exc:  # only a machine without inductor's C++ compiler may skip
        if "InvalidCxxCompiler" not in type(exc).__name__ and "C++ compiler" not in str(exc):
            raise
        pytest.skip(f"torch.compile needs a C++ compiler here: {str(exc)[:200]}")
    assert time.perf_counter() - t0 < 300
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("method", BF16_METHODS)
def test_bfloat16_autocast_tracks_float32(method, device):
    plain = _losses(method, device)
    half = _losses(method, device, precision="bfloat16")
    assert half == pytest.approx(plain, rel=0.02)
    assert half[-1] < half[0] or method == "fg-sign"


def test_speed_up_wraps_the_instance_only(device):
    model = forwardonly.build_model("mlp", (1, 8, 8), 10, widths=[8]).to(device)
    est = forwardonly.make_estimator("bp", model, F.cross_entropy)
    assert speed_up(est) is est and "estimate" not in vars(est)  # float32, eager: untouched
    speed_up(est, precision="bfloat16", device=device)
    assert "estimate" in vars(est) and "predict" in vars(est)
    assert "estimate" not in vars(forwardonly.make_estimator("bp", model, F.cross_entropy))
    assert est.predict(torch.randn(3, 1, 8, 8, device=device)).shape == (3, 10)
    assert set(model.state_dict()) == {"1.weight", "1.bias", "3.weight", "3.bias"}


def test_config_checks_compile_and_precision():
    assert from_dict({"compile": True, "precision": "bfloat16", "method": "bp"}).compile
    with pytest.raises(ConfigError, match="precision must be one of"):
        from_dict({"precision": "float16"})
    with pytest.raises(ConfigError, match="bfloat16 is not supported with --method zo"):
        from_dict({"precision": "bfloat16", "method": "zo"})
    with pytest.raises(ConfigError, match="bfloat16 needs --directions 2 or more"):
        from_dict({"precision": "bfloat16", "method": "fg-w"})
    with pytest.raises(ConfigError, match="not supported with --distributed stages"):
        from_dict({"compile": True, "distributed": "stages"})


def test_fit_with_bfloat16_trains_and_resumes_as_configured(tmp_path, device):
    config = from_dict({"dataset": "digits", "widths": [16], "method": "bp", "epochs": 2,
                        "batch_size": 128, "lr": 1e-2, "precision": "bfloat16",
                        "progress": False, "device": str(device),
                        "out": str(tmp_path / "run")})
    result = forwardonly.fit(config, log=lambda s: None)
    assert result.rows[-1]["train_loss"] < result.rows[0]["train_loss"]
    assert forwardonly.train.run_dir.saved_config(tmp_path / "run").precision == "bfloat16"
