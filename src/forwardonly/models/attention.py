"""Scaled dot-product attention with its own forward-mode (JVP) and backward rules.

PyTorch's fused attention kernels (``F.scaled_dot_product_attention`` on CPU, the flash
kernels on GPU) have no forward-mode derivative, so a transformer using them cannot be
differentiated with ``torch.func.jvp``. :func:`attention` computes the same function,

    S = Q Kᵀ s + M,        P = softmax(S) (over keys),        O = P V,

with the fused kernel for the value and closed forms for both derivatives:

- **JVP**: ``Ṡ = (Q̇ Kᵀ + Q K̇ᵀ) s + Ṁ``, ``Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))``,
  ``Ȯ = Ṗ V + P V̇``.
- **VJP**: ``V̄ = Pᵀ Ō``, ``P̄ = Ō Vᵀ``, ``S̄ = P ⊙ (P̄ − rowsum(P ⊙ P̄))``,
  ``Q̄ = S̄ K s``, ``K̄ = S̄ᵀ Q s``, ``M̄ = S̄`` (summed to M's shape).

``P`` is recomputed by each rule from the saved ``Q, K, M`` (``(B, H, Lq, Lk)``: small next to
the activations for sentence-length inputs). The function works under ``torch.func.jvp``,
``torch.func.vmap`` (the estimators carry K directions with ``vmap(jvp)``) and autograd.

:func:`hf_attention` is the same function behind the signature Hugging Face ``transformers``
calls an attention implementation with; :func:`register_hf_attention` registers it under the
name ``"forwardonly"`` (``AttentionInterface``, transformers ≥ 4.48; models written against
that interface, such as BERT, RoBERTa, DistilBERT and most encoders of transformers 5, use it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: The name the Hugging Face attention implementation is registered under.
HF_ATTENTION = "forwardonly"


def _probabilities(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``P = softmax(Q Kᵀ s + M)``: ``(..., Lq, Lk)``."""
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1)


def _softmax_tangent(p: Tensor, s_dot: Tensor) -> Tensor:
    """``P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))``: the JVP of a row softmax (and, with ``P̄`` for ``Ṡ``, its
    VJP: the Jacobian is symmetric)."""
    ps = p * s_dot
    return ps - p * ps.sum(dim=-1, keepdim=True)


class _Attention(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        q, k, v, mask, scale = inputs
        ctx.scale = scale
        ctx.has_mask = mask is not None
        saved = (q, k, v) if mask is None else (q, k, v, mask)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def jvp(ctx: Any, q_dot: Tensor | None, k_dot: Tensor | None, v_dot: Tensor | None,
            mask_dot: Tensor | None, _scale: None) -> Tensor:
        q, k, v, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        p = _probabilities(q, k, mask, ctx.scale)  # (..., Lq, Lk)
        s_dot = None
        if q_dot is not None:
            s_dot = torch.matmul(q_dot, k.transpose(-2, -1))
        if k_dot is not None:
            term = torch.matmul(q, k_dot.transpose(-2, -1))
            s_dot = term if s_dot is None else s_dot + term
        if s_dot is not None:
            s_dot = s_dot * ctx.scale
        if mask_dot is not None:
            s_dot = mask_dot if s_dot is None else s_dot + mask_dot
        out_dot = None
        if s_dot is not None:
            out_dot = torch.matmul(_softmax_tangent(p, s_dot), v)  # Ṗ V
        if v_dot is not None:
            term = torch.matmul(p, v_dot)  # P V̇
            out_dot = term if out_dot is None else out_dot + term
        if out_dot is None:
            shape = (*q.shape[:-1], v.shape[-1])
            out_dot = torch.zeros(shape, dtype=q.dtype, device=q.device)
        return out_dot

    @staticmethod
    def backward(ctx: Any, out_bar: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        p = _probabilities(q, k, mask, ctx.scale)
        need_q, need_k, need_v, need_mask, _ = ctx.needs_input_grad
        v_bar = torch.matmul(p.transpose(-2, -1), out_bar) if need_v else None
        q_bar = k_bar = mask_bar = None
        if need_q or need_k or need_mask:
            s_bar = _softmax_tangent(p, torch.matmul(out_bar, v.transpose(-2, -1)))
            if need_q:
                q_bar = torch.matmul(s_bar, k) * ctx.scale
            if need_k:
                k_bar = torch.matmul(s_bar.transpose(-2, -1), q) * ctx.scale
            if need_mask and mask is not None:
                mask_bar = s_bar.sum_to_size(mask.shape)
        return _unbroadcast(q_bar, q), _unbroadcast(k_bar, k), _unbroadcast(v_bar, v), \
            mask_bar, None


def _unbroadcast(grad: Tensor | None, like: Tensor) -> Tensor | None:
    """``grad`` summed down to ``like``'s shape (the matmuls broadcast the batch dims)."""
    if grad is None or grad.shape == like.shape:
        return grad
    return grad.sum_to_size(like.shape)


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
              scale: float | None = None) -> Tensor:
    """``softmax(Q Kᵀ s + M) V``, differentiable in forward mode and in reverse mode.

    Arguments:
        q: ``(..., Lq, D)`` queries; ``k``: ``(..., Lk, D)`` keys; ``v``: ``(..., Lk, Dv)``
            values (the batch dims ``...``, e.g. ``(B, H)``, broadcast).
        mask: an additive float mask broadcastable to ``(..., Lq, Lk)`` (``0`` to attend, a
            large negative number not to; it may carry a tangent, e.g. a learned position
            bias), a boolean mask (``True`` = attend), or ``None``.
        scale: ``s``; ``None`` is ``1/√D``.

    Returns:
        ``(..., Lq, Dv)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if mask is not None and mask.dtype == torch.bool:
        mask = _additive(mask, q)
    out: Tensor = _Attention.apply(q, k, v, mask, float(scale))  # type: ignore[no-untyped-call]
    return out


def _additive(keep: Tensor, like: Tensor) -> Tensor:
    """A boolean mask (``True`` = attend) as an additive one of ``like``'s dtype: 0 or the
    dtype's most negative number (not -inf: a row with every key masked stays finite)."""
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero.masked_fill(~keep, torch.finfo(like.dtype).min)


def hf_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, scaling: float | None = None,
                 dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """:func:`dot_product_attention` as a Hugging Face ``transformers`` attention implementation.

    Arguments:
        module: the calling attention layer (read for ``is_causal`` and
            ``num_key_value_groups``).
        query: ``(B, H, Lq, D)``; ``key``, ``value``: ``(B, Hkv, Lk, D)``.
        attention_mask: boolean (``True`` = attend) or additive, broadcastable to
            ``(B, H, Lq, Lk)``, or ``None``.
        scaling: the score scale (``None``: ``1/√D``).
        dropout: must be 0: forward-gradient and zeroth-order estimates need a deterministic
            function, so :mod:`forwardonly.models.text` loads models with dropout off.
        kwargs: ``is_causal``, ``position_bias`` (added to the scores) and ``softcap``
            (unsupported) are read; the rest are ignored.

    Returns:
        ``(attn_output, None)``: ``(B, Lq, H, Dv)`` and no attention weights.
    """
    if dropout:
        raise ValueError(
            f"the {HF_ATTENTION!r} attention runs without dropout (forward-mode and zeroth-"
            f"order estimates need a deterministic function), got dropout={dropout}; set the "
            f"model's attention dropout to 0 or put it in eval mode")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"the {HF_ATTENTION!r} attention does not support softcap")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = _additive(attention_mask, query)
    q_len, k_len = query.shape[-2], key.shape[-2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if is_causal and attention_mask is None and q_len > 1:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        attention_mask = _additive(keep.tril(k_len - q_len), query)
    bias = kwargs.get("position_bias")
    if bias is not None:
        attention_mask = bias if attention_mask is None else attention_mask + bias
    out = dot_product_attention(query, key, value, attention_mask, scale=scaling)  # (B, H, Lq, Dv)
    return out.transpose(1, 2).contiguous(), None


def register_hf_attention() -> bool:
    """Register :func:`hf_attention` with ``transformers`` as ``attn_implementation=
    "forwardonly"`` (and its attention masks as the ``sdpa`` ones: boolean, or none at all
    without padding). Returns False when this ``transformers`` has no ``AttentionInterface``
    (< 4.48). Imports ``transformers``; safe to call more than once."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(HF_ATTENTION, hf_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older versions build the masks inside each model
        return True
    AttentionMaskInterface.register(HF_ATTENTION, sdpa_mask)
    return True
