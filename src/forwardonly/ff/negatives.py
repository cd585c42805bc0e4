"""Negative data for Forward-Forward (Hinton 2022, arXiv 2212.13345).

Supervised FF: a negative is the real image with a *wrong* label written in it —
* ``random_wrong_labels``: uniform over the K−1 wrong classes;
* ``hard_wrong_labels``: drawn in proportion to the model's own predicted probabilities
  with the true class excluded (Hinton §3.3: a forward pass with the neutral label gives
  those probabilities; hard negatives cut the epochs needed by about three).

Unsupervised FF: a negative is a *hybrid image* ``m ⊙ x_a + (1 − m) ⊙ x_b`` of two different
images, where the mask ``m`` is a random bit image blurred repeatedly with the filter
``[1/4, 1/2, 1/4]`` horizontally and vertically and then thresholded at 0.5 (Hinton §3.2). The
hybrid keeps short-range correlations (strokes) but has wrong long-range ones (shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_wrong_labels(targets: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A wrong label for each example, uniform over the other K−1 classes: (B,) int64."""
    shift = torch.randint(
        1, num_classes, targets.shape, generator=generator, device=targets.device
    )  # (B,) in [1, K-1]
    return (targets + shift) % num_classes


def hard_wrong_labels(logits: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
    """A wrong label per example drawn from ``softmax(logits)`` with the true class removed.

    Arguments:
        logits: (B, K) class scores, e.g. the softmax readout on the neutral-label pass.
        targets: (B,) true classes.
        generator: source of the draw.

    Returns:
        (B,) int64, never equal to ``targets``.
    """
    masked = logits.detach().float().scatter(1, targets.view(-1, 1), float("-inf"))  # (B, K)
    probs = torch.softmax(masked, dim=1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def hybrid_masks(
    count: int, height: int, width: int, *, blur_steps: int, generator: torch.Generator
) -> Tensor:
    """Thresholded blurred random bit images, ``(count, height, width)`` float in {0, 1}.

    Each of ``blur_steps`` rounds convolves with ``[1/4, 1/2, 1/4]`` along rows and along
    columns, with replicated borders. Replicated borders keep every blurred pixel a convex
    combination of fair bits, so its law is symmetric about 0.5; values exactly 0.5 are broken
    by a fair coin. Hence every mask pixel is 1 with probability exactly 1/2, and neighbours
    agree far more often than distant pixels (the correlation length grows like √blur_steps).
    """
    if blur_steps < 0:
        raise ValueError(f"blur_steps must be >= 0, got {blur_steps}")
    device = generator.device
    bits = torch.randint(0, 2, (count, 1, height, width), generator=generator, device=device)
    field = bits.float()  # (N, 1, H, W)
    taps = torch.tensor([0.25, 0.5, 0.25], device=device)
    kernel = torch.outer(taps, taps).view(1, 1, 3, 3)  # separable: rows then columns at once
    for _ in range(blur_steps):
        field = F.conv2d(F.pad(field, (1, 1, 1, 1), mode="replicate"), kernel)
    coin = torch.randint(0, 2, field.shape, generator=generator, device=device).bool()
    mask = (field > 0.5) | ((field == 0.5) & coin)
    return mask.view(count, height, width).float()


def hybrid_images(images: Tensor, *, blur_steps: int, generator: torch.Generator) -> Tensor:
    """Hybrid negatives ``m ⊙ x_i + (1 − m) ⊙ x_{(i−s) mod B}`` for a batch (B, C, H, W).

    ``s`` is one random shift in [1, B−1], so every hybrid mixes two *different* examples;
    one mask per example is shared by all channels. A batch of one example (the ragged end of
    an epoch) has no second image: its partner is the image rotated by 180°.
    """
    if images.dim() != 4:
        raise ValueError(
            "hybrid negatives mix images spatially, so inputs must be (B, C, H, W); "
            f"got shape {tuple(images.shape)}"
        )
    B, _, H, W = images.shape
    if B == 1:
        partner = images.flip(2, 3)
    else:
        shift = int(torch.randint(1, B, (1,), generator=generator, device=generator.device))
        partner = images.roll(shift, dims=0)  # (B, C, H, W): row i holds example (i - s) mod B
    mask = hybrid_masks(B, H, W, blur_steps=blur_steps, generator=generator)
    mask = mask.to(images.device, images.dtype).unsqueeze(1)  # (B, 1, H, W)
    return mask * images + (1.0 - mask) * partner
