"""The first layer on one image under several labels, multiplying the image part only once.

Supervised FF sends each image through the net several times, differing only in the K label
entries: positive, negative, neutral, and K label trials at test time. For the first layer,
with ``x = [c, p]`` (label code ``c`` (K,), pixels ``p`` (D−K,)) and ``x̂ = x / r``,
``r = √((‖c‖² + ‖p‖²)/D)`` (the RMS normalization of ``network.rms_normalize``)::

    z = W x̂ + b = (W_p p + W_c c) / r + b
    ∂L/∂W_p = (Σ_variants δ/r)ᵀ p    (one product over the B images, not one per variant)
    ∂L/∂W_c = Σ_rows (δ/r)ᵀ c

so ``W_p p`` (B, n) — the bulk of the first layer's cost — is computed once per image, and
the weight gradient of all variants takes a single product. The results equal the plain
computation on the embedded images up to float rounding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from forwardonly.ff.network import FFLayer


class ImagePart(NamedTuple):
    """What the label variants of a batch of images share in the first layer."""

    images: Tensor  # (B, D) the images with their K label entries zeroed, in the compute dtype
    product: Tensor  # (B, n) W_p p, float32
    square: Tensor  # (B, 1) ‖p‖²


def image_part(
    layer: FFLayer, flat: Tensor, num_classes: int, weight: Tensor | None = None
) -> ImagePart:
    """The shared part for images ``flat`` (B, D); label entries ``[:, :K]`` are ignored.

    ``weight`` is the layer's weight already cast to its compute dtype, if at hand. The label
    entries are zeroed in a copy, so ``W_p p`` is one product with the whole (contiguous)
    weight: the zero columns add nothing, and the kernel runs faster than on a column slice.
    """
    K = num_classes
    images = flat.to(layer.dtype, copy=True)  # (B, D)
    images[:, :K] = 0.0
    square = flat[:, K:].square().sum(1, keepdim=True)  # (B, 1)
    weight = (layer.weight if weight is None else weight).to(layer.dtype)  # (n, D)
    product = (images @ weight.t()).float()  # (B, n)
    return ImagePart(images, product, square)


def inverse_scale(layer: FFLayer, part: ImagePart, codes: Tensor) -> Tensor:
    """``1/r`` per row (V·B, 1); row ``v·B + i`` is image ``i`` with code ``codes[v·B + i]``."""
    if not layer.normalize_input:
        return torch.ones(codes.shape[0], 1, dtype=codes.dtype, device=codes.device)
    V = codes.shape[0] // part.product.shape[0]
    square = part.square.repeat(V, 1) + codes.square().sum(1, keepdim=True)  # (V·B, 1)
    D = layer.in_features
    return math.sqrt(D) / square.sqrt().clamp_min(1e-30)


def labelled_preactivation(layer: FFLayer, part: ImagePart, codes: Tensor) -> tuple[Tensor, Tensor]:
    """Pre-activations ``z`` (V·B, n) of the images under label codes (V·B, K), and ``1/r``.

    ``codes`` stacks V blocks of B rows, block ``v`` holding one code per image.
    """
    B, K = part.product.shape[0], codes.shape[1]
    V = codes.shape[0] // B
    if V * B != codes.shape[0]:
        raise ValueError(f"codes must stack whole blocks of {B} rows, got {codes.shape[0]} rows")
    inv_r = inverse_scale(layer, part, codes)  # (V·B, 1)
    label = codes @ layer.weight[:, :K].t()  # (V·B, n), K-term products: cheap
    z = (part.product.repeat(V, 1) + label).mul_(inv_r).add_(layer.bias)
    return z, inv_r


def labelled_weight_grad(
    layer: FFLayer,
    part: ImagePart,
    codes: Tensor,
    inv_r: Tensor,
    delta: Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """``∂L/∂W`` (n, D) from ``delta = ∂L/∂z`` (V·B, n) of rows built by
    :func:`labelled_preactivation` with ``codes`` (V·B, K) and ``inv_r`` (V·B, 1).

    ``out``: a float32 (n, D) buffer to write the result into (e.g. the weight's ``.grad``).
    """
    B, K = part.product.shape[0], codes.shape[1]
    scaled = delta * inv_r  # (V·B, n) = ∂L/∂(W x) row by row
    per_image = scaled.view(-1, B, scaled.shape[1]).sum(0)  # (B, n), summed over variants
    if layer.dtype == torch.float32:  # label columns of the images are 0: pixels only
        grad = torch.mm(per_image.t(), part.images, out=out)  # (n, D)
    else:
        grad = (per_image.to(layer.dtype).t() @ part.images).float()
        grad = grad if out is None else out.copy_(grad)
    grad[:, :K] = scaled.t() @ codes
    return grad
