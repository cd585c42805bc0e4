"""Shared test set-up: the device the core tests run on, seeding, threads.

``FORWARDONLY_TEST_DEVICE`` (default ``cpu``) names the device of the tests that take the
``device`` fixture: forward mode against autograd, unbiasedness, resume bit-identity,
Forward-Forward, local losses, the trainer. ``FORWARDONLY_TEST_DEVICE=cuda python -m pytest``
runs them on the GPU unchanged; every other test runs on the CPU whatever the variable says.
A test that cannot run on a GPU carries ``@pytest.mark.cpu_only(reason=...)`` and is skipped
there with its reason.
"""

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests use tiny tensors: one thread avoids oversubscription when the cores are shared.
torch.set_num_threads(1)

DEVICE_ENV = "FORWARDONLY_TEST_DEVICE"
TEST_DEVICE = os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_only(reason): runs on the CPU only; skipped (with the reason) when "
        f"{DEVICE_ENV} names another device")
    if not (TEST_DEVICE == "cpu" or TEST_DEVICE.startswith("cuda")):
        raise pytest.UsageError(f"{DEVICE_ENV} must be cpu or cuda[:N]; got {TEST_DEVICE!r}")
    if TEST_DEVICE.startswith("cuda"):
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"{DEVICE_ENV}={TEST_DEVICE} but this torch sees no GPU")
        # float32 tests compare against autograd with tight tolerances: no TF32 anywhere, and
        # deterministic kernels so that resume is bit-identical on the GPU as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def pytest_report_header(config):
    if TEST_DEVICE.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(TEST_DEVICE))
        return f"forwardonly test device: {TEST_DEVICE} ({name}, CUDA {torch.version.cuda})"
    return f"forwardonly test device: {TEST_DEVICE}"


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cpu":
        return
    for item in items:
        mark = item.get_closest_marker("cpu_only")
        if mark is not None:
            reason = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "CPU only")
            item.add_marker(pytest.mark.skip(reason=f"{DEVICE_ENV}={TEST_DEVICE}: {reason}"))


@pytest.fixture
def device() -> torch.device:
    """The device of the core tests (``FORWARDONLY_TEST_DEVICE``, default ``cpu``)."""
    return torch.device(TEST_DEVICE)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)  # seeds the CUDA generators too
    yield
