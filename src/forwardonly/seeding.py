"""Seeds derived from seeds: per step, per tensor, per rank — reproducible anywhere; and the
states of torch's global generators, for checkpoints and for checking that nothing drew.

Importing this module imports no torch (the numpy-only experiments use :func:`mix_seed`);
the generator-state functions import it when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit mix of integers (splitmix64), for per-step / per-tensor seeds."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for part in parts:
        x = (x ^ (int(part) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


def rng_state() -> dict[str, Any]:
    """The global generators' states: ``rng`` (the CPU's) and, once CUDA is initialised,
    ``cuda_rng`` (every device's: dropout on a GPU draws from them)."""
    import torch

    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], log: Callable[[str], None]) -> None:
    """Set the global generators from a state :func:`rng_state` took (a checkpoint's)."""
    import torch

    torch.set_rng_state(state["rng"])
    saved = state.get("cuda_rng")
    if not saved or not torch.cuda.is_available():  # without CUDA nothing draws from them
        return
    count = torch.cuda.device_count()
    for device, device_state in enumerate(saved[:count]):
        torch.cuda.set_rng_state(device_state, device)
    if len(saved) != count:
        log(f"the checkpoint holds the random state of {len(saved)} CUDA device(s) and this "
            f"machine has {count}: the first {min(len(saved), count)} are restored")
