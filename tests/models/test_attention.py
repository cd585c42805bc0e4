"""The attention rules equal autograd on plain softmax attention (float64, 1e-8)."""

import pytest
import torch
from torch.func import jvp, vmap

from forwardonly.autodiff import dot_product_attention, hf_attention

TOL = {"rtol": 1e-8, "atol": 1e-8}
f64 = torch.float64
B, H, L, D = 2, 3, 5, 4


def reference(q, k, v, mask=None, scale=D ** -0.5):
    """softmax(Q Kᵀ s + M) V in plain operations: autograd differentiates it both ways."""
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1) @ v


def qkv():
    return tuple(torch.randn(B, H, L, D, dtype=f64) for _ in range(3))


def padding_mask():
    """(B, 1, 1, L) additive: the second half of the first sequence is padding."""
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, 3:] = False
    return torch.zeros(B, 1, 1, L, dtype=f64).masked_fill(~keep[:, None, None], -1e30)


MASKS = {"no mask": lambda: None, "padding": padding_mask,
         "bias": lambda: torch.randn(1, H, L, L, dtype=f64)}


@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_jvp_equals_autograd(mask_kind):
    q, k, v = qkv()
    mask = MASKS[mask_kind]()
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    out, out_dot = jvp(lambda *a: dot_product_attention(*a, mask), (q, k, v), tangents)
    ref, ref_dot = jvp(lambda *a: reference(*a, mask), (q, k, v), tangents)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(out_dot, ref_dot, **TOL)


@pytest.mark.parametrize("mask_kind", ["no mask", "padding"])
def test_jvp_under_vmap_equals_autograd(mask_kind):
    """K directions at once, as the estimators carry them: vmap over the tangents of jvp."""
    q, k, v = qkv()
    mask = MASKS[mask_kind]()
    tangents = tuple(torch.randn(3, *t.shape, dtype=f64) for t in (q, k, v))

    def batched(fn):
        return vmap(lambda *t: jvp(lambda *a: fn(*a, mask), (q, k, v), t),
                    out_dims=(None, 0))(*tangents)

    (out, out_dot), (ref, ref_dot) = batched(dot_product_attention), batched(reference)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(out_dot, ref_dot, **TOL)


def test_tangent_of_the_mask_and_of_one_input():
    """A learned additive bias carries a tangent; inputs without one count as zero."""
    q, k, v = qkv()
    bias, bias_dot = (torch.randn(1, H, L, L, dtype=f64) for _ in range(2))
    q_dot = torch.randn_like(q)
    _, out_dot = jvp(lambda a, m: dot_product_attention(a, k, v, m), (q, bias), (q_dot, bias_dot))
    _, ref_dot = jvp(lambda a, m: reference(a, k, v, m), (q, bias), (q_dot, bias_dot))
    torch.testing.assert_close(out_dot, ref_dot, **TOL)


@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_backward_equals_autograd(mask_kind):
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = MASKS[mask_kind]()
    if mask_kind == "bias":
        mask.requires_grad_()
    inputs = (q, k, v) + ((mask,) if mask_kind == "bias" else ())
    out_bar = torch.randn(B, H, L, D, dtype=f64)
    grads = torch.autograd.grad(dot_product_attention(q, k, v, mask), inputs, out_bar)
    expected = torch.autograd.grad(reference(q, k, v, mask), inputs, out_bar)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, **TOL)


def test_boolean_mask_and_broadcast_batch():
    """True = attend; a (H, L, D) key/value shared by the batch gets its gradient summed."""
    q = torch.randn(B, H, L, D, dtype=f64)
    k, v = (torch.randn(H, L, D, dtype=f64, requires_grad=True) for _ in range(2))
    keep = torch.rand(B, 1, L, L) > 0.3
    keep[..., 0] = True
    additive = torch.zeros(B, 1, L, L, dtype=f64).masked_fill(~keep, torch.finfo(f64).min)
    out = dot_product_attention(q, k, v, keep)
    ref = reference(q, k, v, additive)
    torch.testing.assert_close(out, ref, **TOL)
    out_bar = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (k, v), out_bar),
                    torch.autograd.grad(ref, (k, v), out_bar), strict=True):
        assert g.shape == (H, L, D)
        torch.testing.assert_close(g, e, **TOL)


def test_hf_attention_layout_and_dropout():
    q, k, v = qkv()
    module = torch.nn.Module()
    out, weights = hf_attention(module, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (B, L, H, D)  # (B, Lq, H, D), as transformers wants
    torch.testing.assert_close(out, reference(q, k, v, scale=0.3).transpose(1, 2), **TOL)
    with pytest.raises(ValueError, match="dropout"):
        hf_attention(module, q, k, v, None, dropout=0.1)
