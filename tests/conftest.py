import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests use tiny tensors: one thread avoids oversubscription when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
