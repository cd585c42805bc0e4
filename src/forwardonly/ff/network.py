"""The Forward-Forward network: length-normalized ReLU layers plus a linear softmax readout.

Layer ``l`` computes ``h_l = relu(W_l · ĥ_{l−1} + b_l)`` where ``ĥ = h / rms(h)`` is the
previous activity rescaled to mean square 1 per unit (length √n). The goodness of ``h_l``
therefore cannot be read off the length of ``h_{l−1}``: only its direction passes on
(Hinton 2022, §2.1). The input image is normalized the same way unless told otherwise.

Two ways to classify (Hinton 2022, §3.3):
* ``"goodness"`` — run the net once per label written into the image and pick the label
  with the highest goodness summed over the layers from ``readout_from`` on;
* ``"softmax"`` — one pass with the neutral label (supervised) or the plain image
  (unsupervised), then a linear softmax ``head`` on the normalized activities of the layers
  from ``readout_from`` on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forwardonly.ff.first_layer import image_part, labelled_preactivation
from forwardonly.ff.goodness import GoodnessKind, check_goodness_kind, goodness
from forwardonly.ff.labels import check_label_room, embed_labels, trial_codes
from forwardonly.models import register_model
from forwardonly.models.containers import ModuleList

Mode = Literal["supervised", "unsupervised"]
Readout = Literal["goodness", "softmax"]
Precision = Literal["float32", "bfloat16"]
PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Largest number of rows pushed through the net at once when scoring every label.
_TRIAL_ROWS = 8192


def compute_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"ff_precision must be one of 'float32', 'bfloat16', got {precision!r}")
    return PRECISIONS[precision]


def affine(x: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """``x Wᵀ + b`` (B, out) in float32, the product taken in ``dtype``.

    bfloat16 operands (fp32 accumulation inside the kernel, result rounded to bfloat16) run
    several times faster on CPUs with AVX512-BF16/AMX; everything around the product stays
    float32.
    """
    if dtype == torch.float32:
        return torch.addmm(bias, x, weight.t())
    return torch.addmm(bias.to(dtype), x.to(dtype), weight.to(dtype).t()).float()


def rms_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` (B, n) rescaled to mean square 1: ``x · √n / ‖x‖``; zero rows stay zero."""
    norm: Tensor = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (B, 1)
    return x * (math.sqrt(x.shape[-1]) / norm.clamp_min(1e-30))


class FFLayer(nn.Module):
    """One FF layer: ``relu(W · x̂ + b)`` with ``x̂ = rms_normalize(x)``.

    Weights start as ``N(0, 1/fan_in)`` and biases at 0 (as in Hinton's reference code), so a
    fresh layer has mean squared activity about 1/2 per unit. ``mean_activity`` is the running
    mean activity per unit used by peer normalization.

    Arguments:
        in_features, out_features: sizes.
        normalize_input: rescale the input to mean square 1 (always true above the first layer).
        generator: source of the initial weights.
        dtype: dtype of the matrix product (float32, or bfloat16 for speed); weights,
            activities and gradients stay float32.
    """

    mean_activity: Tensor  # (out,) buffer

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        normalize_input: bool = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"an FF layer needs at least one input and one unit, got {in_features} -> "
                f"{out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.normalize_input = normalize_input
        self.dtype = dtype
        w = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
        self.weight = nn.Parameter(w)  # (out, in)
        self.bias = nn.Parameter(torch.zeros(out_features))  # (out,)
        self.register_buffer("mean_activity", torch.full((out_features,), 0.5))

    def prepare(self, x: Tensor) -> Tensor:
        """The input as the layer sees it: normalized (B, in)."""
        return rms_normalize(x) if self.normalize_input else x

    def forward(self, x: Tensor) -> Tensor:
        """(B, in) -> (B, out) ReLU activities."""
        return F.relu(affine(self.prepare(x), self.weight, self.bias, self.dtype))

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, "
            f"normalize_input={self.normalize_input}, dtype={self.dtype}"
        )


class FFNet(nn.Module):
    """A stack of :class:`FFLayer` on flattened images, plus a linear readout ``head``.

    Arguments:
        in_shape: (C, H, W) of one example.
        num_classes: K.
        widths: units per hidden layer, e.g. (2000, 2000, 2000, 2000).
        mode: ``"supervised"`` (label written into the first K input values) or
            ``"unsupervised"`` (plain images; classify with the softmax readout).
        goodness: ``"sum"`` or ``"mean"`` of squared activities.
        readout: ``"goodness"`` (supervised only) or ``"softmax"``; default ``"goodness"``
            when supervised, ``"softmax"`` when unsupervised.
        readout_from: first hidden layer (0-based) whose activity counts in either readout;
            default 1 (all but the first) when supervised, the last three layers when
            unsupervised (the same thing for four layers).
        label_scale: value of the "on" label entry.
        normalize_input: also length-normalize the image before the first layer.
        precision: ``"float32"``, or ``"bfloat16"`` matrix products (several times faster on
            CPUs with bfloat16 units; parameters, goodness and gradients stay float32).
        seed: seed of the initial weights.

    ``forward(x)`` maps (B, C, H, W) to (B, K) class scores with the chosen readout.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int],
        *,
        mode: Mode = "supervised",
        goodness: GoodnessKind = "sum",
        readout: Readout | None = None,
        readout_from: int | None = None,
        label_scale: float = 1.0,
        normalize_input: bool = True,
        precision: Precision = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths:
            raise ValueError("widths must name at least one hidden layer, e.g. (2000, 2000)")
        if mode not in ("supervised", "unsupervised"):
            raise ValueError(f"ff_mode must be one of 'supervised', 'unsupervised', got {mode!r}")
        check_goodness_kind(goodness)
        readout = readout or ("goodness" if mode == "supervised" else "softmax")
        if readout not in ("goodness", "softmax"):
            raise ValueError(f"ff_readout must be one of 'goodness', 'softmax', got {readout!r}")
        if readout == "goodness" and mode == "unsupervised":
            raise ValueError(
                "the goodness readout tries every label in the input, which the unsupervised "
                "mode does not have; use ff_readout='softmax' with ff_mode='unsupervised'"
            )
        if readout_from is None:
            readout_from = 1 if mode == "supervised" else len(widths) - 3
            readout_from = max(0, min(readout_from, len(widths) - 1))
        if not 0 <= readout_from < len(widths):
            raise ValueError(
                f"ff_readout_from must index one of the {len(widths)} hidden layers "
                f"(0..{len(widths) - 1}), got {readout_from}"
            )
        self.in_shape = tuple(int(s) for s in in_shape)
        self.in_features = math.prod(self.in_shape)
        if mode == "supervised":
            check_label_room(self.in_features, num_classes)
        self.num_classes = int(num_classes)
        self.mode: Mode = mode
        self.goodness: GoodnessKind = goodness
        self.readout: Readout = readout
        self.readout_from = readout_from
        self.label_scale = float(label_scale)
        self.precision: Precision = precision
        dtype = compute_dtype(precision)

        gen = torch.Generator().manual_seed(int(seed))
        sizes = [self.in_features, *widths]
        self.layers = ModuleList(
            FFLayer(a, b, normalize_input=(i > 0 or normalize_input), generator=gen, dtype=dtype)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        )
        self.head = nn.Linear(sum(widths[readout_from:]), num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def supervised(self) -> bool:
        return self.mode == "supervised"

    # -- inputs ----------------------------------------------------------------------
    def flatten(self, x: Tensor) -> Tensor:
        """(B, C, H, W) or (B, D) -> (B, D), checking D."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"this FF network was built for inputs of shape {self.in_shape} "
                f"({self.in_features} values), got a batch of shape {tuple(x.shape)}"
            )
        return flat

    def embed(self, flat: Tensor, labels: Tensor | None) -> Tensor:
        """(B, D) -> (B, D) with the label (or the neutral label, ``None``) written in."""
        if not self.supervised:
            raise ValueError("an unsupervised FF network takes plain images, not labels")
        return embed_labels(flat, labels, self.num_classes, self.label_scale)

    def neutral(self, flat: Tensor) -> Tensor:
        """The input for the softmax readout: neutral label (supervised) or the plain image."""
        return self.embed(flat, None) if self.supervised else flat

    # -- passes ----------------------------------------------------------------------
    def activities(self, flat: Tensor) -> list[Tensor]:
        """ReLU activities of every layer for flattened inputs (B, D): list of (B, n_l)."""
        acts = []
        h = flat
        for layer in self.layers:
            h = layer(h)
            acts.append(h)
        return acts

    def features(self, acts: Sequence[Tensor]) -> Tensor:
        """Readout input: normalized activities of layers ``readout_from..``, concatenated."""
        return torch.cat([rms_normalize(h) for h in acts[self.readout_from :]], dim=1)

    def readout_logits(self, x: Tensor) -> Tensor:
        """Softmax-readout class scores (B, K) for images (B, C, H, W)."""
        logits: Tensor = self.head(self.features(self.activities(self.neutral(self.flatten(x)))))
        return logits

    def goodness_scores(self, x: Tensor) -> Tensor:
        """Goodness summed over the layers from ``readout_from`` on, for every label: (B, K).

        The first layer multiplies each image once for all K labels
        (:mod:`forwardonly.ff.first_layer`).
        """
        if not self.supervised:
            raise ValueError("goodness scores need labels in the input: supervised mode only")
        flat = self.flatten(x)
        K = self.num_classes
        out = []
        for chunk in flat.split(max(1, _TRIAL_ROWS // K)):
            b = chunk.shape[0]
            part = image_part(self.layers[0], chunk, K)
            codes = trial_codes(b, K, self.label_scale, device=chunk.device).to(chunk.dtype)
            z, _ = labelled_preactivation(self.layers[0], part, codes)  # (K·b, n), label-major
            h = z.clamp_min_(0.0)
            total = goodness(h, self.goodness) if self.readout_from == 0 else None  # (K·b,)
            for i, layer in enumerate(self.layers[1:], start=1):
                h = layer(h)
                if i >= self.readout_from:
                    g = goodness(h, self.goodness)
                    total = g if total is None else total + g
            assert total is not None  # readout_from indexes a layer (checked in __init__)
            out.append(total.view(K, b).t())  # (b, K)
        return torch.cat(out)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores (B, K) by the configured readout."""
        if self.readout == "goodness":
            return self.goodness_scores(x)
        return self.readout_logits(x)


@register_model("ff-mlp")
def ff_mlp(
    in_shape: tuple[int, int, int],
    num_classes: int,
    widths: Sequence[int] = (2000, 2000, 2000, 2000),
    mode: Mode = "supervised",
    goodness: GoodnessKind = "sum",
    readout: Readout | None = None,
    readout_from: int | None = None,
    label_scale: float = 1.0,
    normalize_input: bool = True,
    precision: Precision = "float32",
    seed: int = 0,
) -> FFNet:
    """Forward-Forward MLP: :class:`FFNet` of ReLU layers on length-normalized inputs, with a
    softmax readout ``head`` (see :class:`FFNet` for the options)."""
    return FFNet(
        in_shape,
        num_classes,
        widths,
        mode=mode,
        goodness=goodness,
        readout=readout,
        readout_from=readout_from,
        label_scale=label_scale,
        normalize_input=normalize_input,
        precision=precision,
        seed=seed,
    )
