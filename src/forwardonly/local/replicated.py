"""Block × patch × group local losses with the "replicated" aggregation, and their derivatives.

Ren et al. (ICLR 2023), Section 4. A block output ``h`` of shape ``(B, P, C)``, channels in G
groups of ``D = C/G``, is read by the block's head through the aggregated feature

    f_b = (1/P) Σ_p LN_g(h_{b,p,g})          (LN per (patch, group); shape (B, C))
    L   = loss(f W + c, y)                    (a mean over the batch)

The *replicated* loss ``L_{p,g}`` has the same value as ``L``, but in the pooled feature
every patch other than ``p`` and every group other than ``g`` enters stop-gradiented, so it
sees only its own units' tangents. Materialising that takes ``P·G`` copies of the features
per example. The closed form avoids them. With ``e = ∂L/∂h`` (the plain pooled loss's
gradient, one ``(B, P, C)`` tensor):

    ∂L_{p,g}/∂h_{b,p,g} = e_{b,p,g}      and 0 for every other slice, so
    dL_{p,g}[k] = Σ_b ⟨ḣ_{k,b,p,g}, e_{b,p,g}⟩     (computed per example: (K, B, P, G))

because the only path from ``h_{b,p,g}`` to ``L_{p,g}`` is the one the plain loss has for
that slice. ``e`` itself is closed form: ``e_{b,p,g} = J_LN(h_{b,p,g}) (∂L/∂f_b)_g / P``
(``J_LN`` symmetric, see :mod:`forwardonly.autodiff.mixer`). Summing the replicated losses
gives back the plain gradient — for backprop the split changes nothing; for forward
gradients it decides how many perturbed units each directional derivative mixes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..autodiff import ln_jvp, ln_stats
from ..models.local_mixer import Head, layer_norm


def pooled_features(h: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """``f = mean_p LN_g(h)`` of shape ``(B, C)``, and the LN statistics for :func:`pool_vjp`."""
    y, mean, rstd = ln_stats(h, groups)
    return y.mean(dim=1), mean, rstd


def pool_vjp(h: Tensor, mean: Tensor, rstd: Tensor, dfeats: Tensor, groups: int) -> Tensor:
    """``e = ∂L/∂h`` (``(B, P, C)``) from ``∂L/∂f`` (``(B, C)``) through the mean and LN."""
    p = h.shape[1]
    g = (dfeats / p).unsqueeze(1).expand_as(h).contiguous()
    return ln_jvp(h, mean, rstd, g, groups)


def replicated_jvp(e: Tensor, th: Tensor, groups: int, *, overwrite: bool = False) -> Tensor:
    """Per-example derivatives of the replicated losses: ``(K, B, P, G)``.

    Arguments:
        e: ``(B, P, C)`` gradient of the plain pooled loss w.r.t. the block output.
        th: ``(K, B, P, C)`` tangents of the block output.
        overwrite: ``th`` is not needed afterwards: the product ``th ⊙ e`` is formed in its
            memory (the same numbers, no tensor-sized temporary).
    """
    k, b, p, c = th.shape
    prod = th.mul_(e) if overwrite else th * e
    return prod.view(k, b, p, groups, c // groups).sum(-1)


def replicated_derivatives(h: Tensor, mean: Tensor, rstd: Tensor, dfeats: Tensor, th: Tensor,
                           groups: int, *, overwrite: bool = False) -> Tensor:
    """:func:`replicated_jvp` of :func:`pool_vjp`'s ``e``, in the cheaper order: ``(K, B, P, G)``.

    Per (example, patch, group) row, with ``q = ∂L/∂f / P`` (the same for every patch) and the
    LayerNorm Jacobian ``J`` symmetric,

        dL_{p,g}[k] = ⟨ḣ_k, J q⟩ = ⟨J ḣ_k, q⟩.

    With one tangent (K = 1) ``J`` is applied to ``ḣ``: one LayerNorm kernel, and ``q`` stays
    ``(B, C)``, broadcast over the patches, instead of a ``(B, P, C)`` copy for ``J q``. With
    K > 1 it is applied once to ``q`` (:func:`pool_vjp`) and dotted with the K tangents.
    The two orders differ in rounding only.

    Arguments:
        h, mean, rstd: the block output ``(B, P, C)`` and its LN statistics
            (:func:`pooled_features`); ``dfeats``: ``∂L/∂f``, ``(B, C)``.
        th: ``(K, B, P, C)`` tangents of ``h``; overwrite: see :func:`replicated_jvp` (with
            K = 1 ``th`` is only read).
    """
    k = th.shape[0]
    if k > 1:
        return replicated_jvp(pool_vjp(h, mean, rstd, dfeats, groups), th, groups,
                              overwrite=overwrite)
    b, p, c = h.shape
    jth = ln_jvp(h, mean, rstd, th, groups)  # (1, B, P, C), a new tensor
    q = (dfeats / p).view(1, b, 1, c)
    return jth.mul_(q).view(1, b, p, groups, c // groups).sum(-1)


class _Replicate(torch.autograd.Function):
    """``h ↦ (L, …, L)`` shaped ``(P, G)``; the gradient of entry ``(p, g)`` reaches only
    slice ``h[:, p, g-th group]`` and equals ``e`` there (the closed form above)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, e: Tensor, loss: Tensor, groups: int) -> Tensor:
        ctx.save_for_backward(e)
        ctx.groups = groups
        return loss.reshape(1, 1).expand(h.shape[1], groups).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (e,) = ctx.saved_tensors
        b, p, c = e.shape
        g = ctx.groups
        dh = (e.view(b, p, g, c // g) * grad.view(1, p, g, 1)).view(b, p, c)
        return dh, None, None, None


def replicate(h: Tensor, e: Tensor, loss: Tensor, groups: int) -> Tensor:
    """The ``(P, G)`` replicated losses of a block output ``h``, differentiable in ``h``.

    Arguments:
        h: ``(B, P, C)`` block output (part of an autograd graph).
        e: ``(B, P, C)`` gradient of the plain loss w.r.t. ``h`` (:func:`pool_vjp`).
        loss: the plain loss, a scalar: the value of every replicated loss.
    """
    losses: Tensor = _Replicate.apply(  # type: ignore[no-untyped-call]  # untyped in torch
        h, e.detach(), loss.detach(), groups)
    return losses


def replicated_losses_reference(h: Tensor, head: Head, targets: Tensor, groups: int) -> Tensor:
    """Per-example replicated cross-entropy losses ``(B, P, G)``, materialised with explicit
    stop-gradients (``P·G`` copies of the features per example): the test reference."""
    b, p, c = h.shape
    d = c // groups
    y = layer_norm(h, groups).view(b, p, groups, d)
    ys = y.detach()
    own_p = torch.eye(p, dtype=h.dtype, device=h.device).view(p, 1, p, 1, 1)
    own_g = torch.eye(groups, dtype=h.dtype, device=h.device).view(1, groups, 1, groups, 1)
    own = own_p * own_g  # (P, G, P', G', 1): 1 where (p', g') == (p, g)
    # copy (p, g) of the normalized output: its own slice live, every other slice frozen
    rep = own * y.unsqueeze(1).unsqueeze(1) + (1 - own) * ys.unsqueeze(1).unsqueeze(1)
    feats = rep.mean(dim=3).reshape(b, p, groups, c)  # pool over p' -> (B, P, G, C)
    logits = head(feats.reshape(-1, c)).view(b, p, groups, -1)
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, targets.view(b, 1, 1, 1).expand(b, p, groups, 1)).squeeze(-1)
