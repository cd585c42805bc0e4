"""Seeds derived from seeds: per step, per tensor, per rank — reproducible anywhere."""

from __future__ import annotations


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
