"""Training-time augmentation of image batches, drawn from an explicit generator.

- ``hflip``: each image mirrored left-right with probability 1/2 (the CIFAR-10 pipeline of
  Ren et al. 2023).
- ``shift``: each image translated by a uniform integer offset in ``[-2, 2]`` along each
  axis, the pixels moved in from outside copying the nearest edge pixel (Hinton's
  "jittered" MNIST for Forward-Forward shifts by up to two pixels). Edges are repeated
  rather than zero-filled because the trainer augments *standardized* images, where 0 is
  the mean pixel, not the background; on MNIST the edges are background anyway.

Both act on ``(B, C, H, W)`` batches; the generator is seeded per epoch by the trainer, so a
resumed run draws the same augmentations. The random numbers are drawn on the generator's
device: a CPU generator gives the CPU stream (the same whatever device the images are on), a
CUDA generator draws on the GPU, so images resident there are augmented with no host copy.
A run is reproducible on either, but the two streams differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_SHIFT = 2


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of ``x`` (B, C, H, W) mirrored along W with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5  # (B,)
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> Tensor:
    """Each image of ``x`` (B, C, H, W) moved by ``(dy, dx)`` drawn uniformly from
    ``[-max_shift, max_shift]²``; pixels moved in from outside repeat the nearest edge."""
    b, _, h, w = x.shape
    s = max_shift
    offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator,
                            device=generator.device).to(x.device)
    padded = F.pad(x, (s, s, s, s), mode="replicate")  # (B, C, H + 2s, W + 2s)
    rows = (offsets[0].view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (offsets[1].view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, channel, rows, cols]


AUGMENTATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "hflip": random_hflip,
    "shift": random_shift,
}


def augmenter(names: list[str], generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    """A function applying the named augmentations in order, drawing from ``generator``."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from "
                         f"{', '.join(AUGMENTATIONS)}")
    steps = [AUGMENTATIONS[n] for n in names]

    def apply(x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"augmentation needs image batches (B, C, H, W); got shape "
                             f"{tuple(x.shape)}")
        for step in steps:
            x = step(x, generator)
        return x

    return apply
