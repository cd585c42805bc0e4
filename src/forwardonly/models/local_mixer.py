"""LocalMixer: the MLP-Mixer-like network built for local learning.

Ren, Kornblith, Liao, Hinton — *Scaling Forward Gradient With Local Losses* (ICLR 2023,
arXiv 2210.03310), Section 5 and Table 2. An image is cut into ``patches × patches``
non-overlapping patches (P tokens); every block maps ``(B, P, C)`` to ``(B, P, C)``:

    block 0:   patch embedding (dense, pixels → C)  → grouped dense (C → C, within groups)
    block ≥ 1: token mixing (dense over P)          → channel dense (C → C)
               → grouped dense (C → C, within groups) → + block input (residual)

Every linear layer is wrapped as ``LN_in → linear → LN_out → ReLU``; the LayerNorms have no
learned scale or shift and are *local*: over the channels of one patch, or of one group of
one patch for the grouped layer. The residual is added after the last ``LN_out``, before the
ReLU. Activity perturbation puts its tangent right after ``LN_out`` (before the residual and
the ReLU), see :mod:`forwardonly.autodiff.mixer`.

Heads: after every block ``i`` a linear head reads ``block_features`` — the block output
normalized per (patch, group), then averaged over patches — and one *final* head reads
``final_features`` of the last block (averaged over patches, then normalized over all C).
``forward(x)`` (and so ``predict``) returns the **final head's** scores, as in the paper's
code; the block heads only carry the local losses. The final head starts at zero.

Initialisation (the paper's "kaiming" scheme): weights ``~ N(0, s²)`` with
``s = min(2 / sqrt(fan_in), 0.1)``, biases zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import check_sizes, register_model
from .containers import ModuleList
from .local_norm import LN_EPS as LN_EPS  # re-exported: part of this module's interface
from .local_norm import layer_norm as layer_norm
from .local_norm import local_layer_norm

# Paper names "Size/patches-per-side/groups" (Table 2), plus a tiny one for tests.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"blocks": 2, "patches": 2, "channels": 16, "groups": 4},
    "S/1/1": {"blocks": 1, "patches": 1, "channels": 256, "groups": 1},
    "M/1/16": {"blocks": 1, "patches": 1, "channels": 512, "groups": 16},
    "M/8/16": {"blocks": 4, "patches": 8, "channels": 512, "groups": 16},
    "L/8/64": {"blocks": 4, "patches": 8, "channels": 2048, "groups": 64},
}

# Table 2's parameter counts (for 28×28×1 inputs on the /1/ presets, 32×32×3 on the /8/ ones).
PAPER_PARAMS = {"S/1/1": 272_000, "M/1/16": 429_000, "M/8/16": 919_000, "L/8/64": 13_100_000}


def _init_weight(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> nn.Parameter:
    std = min(2.0 / math.sqrt(fan_in), 0.1)
    return nn.Parameter(torch.randn(shape, generator=generator) * std)


class MixerLayer(nn.Module):
    """One linear layer of a block and its local LayerNorms (``LN_in → linear → LN_out``).

    ``kind`` is ``"token"`` (mixes the P patches, one shared ``(P, P)`` matrix for all
    channels), ``"dense"`` (``(C_in, C_out)`` shared by all patches) or ``"group"`` (a
    ``(G, C/G, C/G)`` block-diagonal dense layer within each channel group). Inputs and
    outputs are ``(..., P, C)``; weights act as ``x @ W`` (and ``Wᵀ @ x`` over patches).
    """

    def __init__(self, kind: str, n_in: int, n_out: int, *, tokens: int, groups: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.kind = kind
        self.tokens = tokens
        if kind == "token":
            self.weight = _init_weight((tokens, tokens), tokens, generator)
            self.bias = nn.Parameter(torch.zeros(tokens))
            self.norm_groups = 1
        elif kind == "dense":
            self.weight = _init_weight((n_in, n_out), n_in, generator)
            self.bias = nn.Parameter(torch.zeros(n_out))
            self.norm_groups = 1
        elif kind == "group":
            if n_in % groups or n_out % groups:
                raise ValueError(
                    f"channels ({n_in} in, {n_out} out) must be divisible by groups ({groups})"
                )
            self.weight = _init_weight((groups, n_in // groups, n_out // groups),
                                       n_in // groups, generator)
            self.bias = nn.Parameter(torch.zeros(groups, n_out // groups))
            self.norm_groups = groups
        else:
            raise ValueError(f"kind must be one of 'token', 'dense', 'group', got {kind!r}")
        self.groups = groups  # channel groups of the local losses
        self.n_out = n_out

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, weight={tuple(self.weight.shape)}"

    def linear(self, a: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
               ) -> Tensor:
        """The layer's linear map of ``a`` (``(..., P, C_in)`` → ``(..., P, C_out)``).

        ``weight``/``bias`` default to the layer's own; pass ``bias=None`` with an explicit
        weight to apply the linear part only (tangents are linear in their inputs). A
        ``weight`` with one more leading dim, ``(K, *W.shape)`` (and ``bias`` ``(K, *b.shape)``),
        applies K weights to the same ``a`` at once: the result is ``(K, ..., P, C_out)``.
        """
        if weight is None:
            weight, bias = self.weight, self.bias
        batched = weight.dim() > self.weight.dim()
        if self.kind == "token":
            if batched:  # (K, 1.., P, P) @ (..., P, C)
                w_t = weight.transpose(-1, -2).view(weight.shape[0], *[1] * (a.dim() - 2),
                                                    *weight.shape[1:])
                out = torch.matmul(w_t, a)
                if bias is not None:
                    out = out + bias.view(bias.shape[0], *[1] * (a.dim() - 2), -1, 1)
                return out
            a3 = a.reshape(-1, *a.shape[-2:])  # (N, P, C): Wᵀ @ a_n for every n
            out = torch.bmm(weight.t().expand(a3.shape[0], -1, -1), a3).view(a.shape)
            return out if bias is None else out.add_(bias.unsqueeze(-1))
        if self.kind == "dense":
            flat = a.reshape(-1, a.shape[-1])
            if batched:
                out = torch.matmul(flat, weight)  # (K, N, C_out)
                if bias is not None:
                    out = out + bias.unsqueeze(1)
                return out.view(weight.shape[0], *a.shape[:-1], weight.shape[-1])
            out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
            return out.view(*a.shape[:-1], weight.shape[-1])
        g, d_in, d_out = weight.shape[-3:]
        flat = a.reshape(-1, g, d_in)
        if batched:
            out = torch.einsum("ngi,kgio->kngo", flat, weight)
            if bias is not None:
                out = out + bias.unsqueeze(1)
            return out.reshape(weight.shape[0], *a.shape[:-1], g * d_out)
        flat_t = flat.transpose(0, 1)  # (G, N, d_in) strided view: no input copy
        if bias is None:
            per_group = torch.bmm(flat_t, weight)
        else:
            per_group = torch.baddbmm(bias.unsqueeze(1), flat_t, weight)  # (G, N, d_out)
        return per_group.transpose(0, 1).reshape(*a.shape[:-1], g * d_out)

    def weight_grad(self, a: Tensor, gz: Tensor) -> tuple[Tensor, Tensor]:
        """Local gradient of the weights from the layer's input ``a`` and ``gz = ∂L/∂z``.

        ``a``: ``(B, P, C_in)``, ``gz``: ``(B, P, C_out)`` with ``z = linear(a)``.
        Nothing crosses the layer boundary: ``g_W = aᵀ g_z``, ``g_b = Σ g_z``.
        """
        if self.kind == "token":
            gw = torch.bmm(a, gz.transpose(1, 2)).sum(0)  # Σ_b a_b g_bᵀ
            return gw, gz.sum(dim=(0, 2))
        if self.kind == "dense":
            a2 = a.reshape(-1, a.shape[-1])
            g2 = gz.reshape(-1, gz.shape[-1])
            return a2.t() @ g2, g2.sum(0)
        g, d_in, d_out = self.weight.shape
        a3 = a.reshape(-1, g, d_in)
        g3 = gz.reshape(-1, g, d_out)
        return torch.bmm(a3.permute(1, 2, 0), g3.transpose(0, 1)), g3.sum(0)

    def forward(self, x: Tensor) -> Tensor:
        """``LN_out(linear(LN_in(x)))`` — before the residual and the ReLU."""
        return local_layer_norm(self.linear(local_layer_norm(x, self.norm_groups)),
                                self.norm_groups)


class MixerBlock(nn.Module):
    """A block: its layers, each followed by ReLU; the last one adds the residual first."""

    def __init__(self, layers: list[MixerLayer], residual: bool) -> None:
        super().__init__()
        self.layers = ModuleList(layers)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:  # (B, P, C_in) -> (B, P, C)
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            z = layer(h)
            if self.residual and i == last:
                z = z + x
            h = torch.relu(z)
        return h


class Head(nn.Module):
    """A linear classifier ``f @ W + b`` on ``(B, C)`` features."""

    def __init__(self, channels: int, num_classes: int, std: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, num_classes, generator=generator) * std)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, feats: Tensor) -> Tensor:
        return torch.addmm(self.bias, feats, self.weight)


@dataclass(frozen=True)
class LocalMixerShape:
    """The sizes of a LocalMixer: B blocks, ``patches`` per side, C channels, G groups."""

    blocks: int
    patches: int
    channels: int
    groups: int


class LocalMixer(nn.Module):
    """LocalMixer for ``(B, C_in, H, W)`` images; ``forward`` returns the final head's scores.

    Arguments:
        in_shape: ``(C_in, H, W)`` of one example; ``H`` and ``W`` divisible by ``patches``.
        num_classes: number of classes of every head.
        blocks, patches, channels, groups: the architecture (see :data:`PRESETS`).
        seed: seed of the initialisation.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, *, blocks: int,
                 patches: int, channels: int, groups: int, seed: int = 0) -> None:
        super().__init__()
        c_in, height, width = check_sizes(in_shape, num_classes, image=True)
        for name, value in (("blocks", blocks), ("patches", patches), ("channels", channels),
                            ("groups", groups)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if height % patches or width % patches:
            raise ValueError(
                f"the image size {height}x{width} must be divisible by patches={patches} "
                f"(patches per side); pick a divisor of both"
            )
        if channels % groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
        self.shape = LocalMixerShape(blocks, patches, channels, groups)
        self.in_shape = (c_in, height, width)
        self.num_classes = num_classes
        self.tokens = patches * patches
        self.patch_dim = c_in * (height // patches) * (width // patches)
        gen = torch.Generator().manual_seed(int(seed))
        p, c, g = self.tokens, channels, groups

        def layer(kind: str, n_in: int) -> MixerLayer:
            return MixerLayer(kind, n_in, c, tokens=p, groups=g, generator=gen)

        blocks_: list[MixerBlock] = [
            MixerBlock([layer("dense", self.patch_dim), layer("group", c)], residual=False)
        ]
        for _ in range(blocks - 1):
            blocks_.append(MixerBlock([layer("token", c), layer("dense", c), layer("group", c)],
                                      residual=True))
        self.blocks = ModuleList(blocks_)
        head_std = min(2.0 / math.sqrt(c), 0.1)
        self.heads = ModuleList(Head(c, num_classes, head_std, gen) for _ in range(blocks))
        self.final_head = Head(c, num_classes, 0.0, gen)

    @property
    def groups(self) -> int:
        return self.shape.groups

    def patchify(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` → ``(B, P, patch_dim)`` non-overlapping patches, row-major."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"LocalMixer expects inputs of shape (B, {', '.join(map(str, self.in_shape))}),"
                f" got {tuple(x.shape)}"
            )
        n = self.shape.patches
        b, c, h, w = x.shape
        x = x.reshape(b, c, n, h // n, n, w // n)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, self.patch_dim)

    def block_features(self, h: Tensor) -> Tensor:
        """Input of a block head: LN per (patch, group), then the mean over patches: (B, C)."""
        return local_layer_norm(h, self.groups).mean(dim=1)

    def final_features(self, h: Tensor) -> Tensor:
        """Input of the final head: the mean over patches, then LN over all C: (B, C)."""
        return local_layer_norm(h.mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.patchify(x)
        for block in self.blocks:
            h = block(h)
        scores: Tensor = self.final_head(self.final_features(h))  # (B, num_classes)
        return scores

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.blocks.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.heads.parameters(), *self.final_head.parameters()]


@register_model("local-mixer")
def local_mixer(in_shape: tuple[int, int, int], num_classes: int, preset: str = "M/1/16", *,
                blocks: int | None = None, patches: int | None = None,
                width: int | None = None, groups: int | None = None,
                seed: int = 0) -> LocalMixer:
    """Ren et al.'s LocalMixer (MLP-Mixer blocks with local heads), from a preset of
    :data:`PRESETS` (S/1/1, M/1/16, M/8/16, L/8/64, tiny). Optional overrides
    (``width`` is the channel count C)."""
    if preset not in PRESETS:
        valid = ", ".join(repr(n) for n in PRESETS)
        raise ValueError(f"preset must be one of {valid}, got {preset!r}")
    sizes = dict(PRESETS[preset])
    for name, value in (("blocks", blocks), ("patches", patches), ("channels", width),
                        ("groups", groups)):
        if value is not None:
            sizes[name] = int(value)
    return LocalMixer(in_shape, num_classes, seed=seed, **sizes)
