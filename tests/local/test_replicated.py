"""Replicated block × patch × group losses: values, closed-form derivatives, backprop."""

import torch
import torch.nn.functional as F
from torch.func import jvp

from forwardonly.local.replicated import (
    pool_vjp,
    pooled_features,
    replicate,
    replicated_derivatives,
    replicated_jvp,
    replicated_losses_reference,
)
from forwardonly.models.local_mixer import local_mixer

B, P, C, G = 4, 4, 16, 4


def setup(seed=0, device="cpu"):
    """Drawn on the CPU (the same on every device), then moved to ``device``."""
    torch.manual_seed(seed)
    model = local_mixer((1, 8, 8), 5, "tiny", width=C, groups=G)
    h = torch.randn(B, P, C).relu()  # a block output
    y = torch.randint(0, 5, (B,))
    model.to(device)
    return model, model.heads[0], h.to(device), y.to(device)


def closed_form_e(model, head, h, y):
    feats, mean, rstd = pooled_features(h, G)
    f = feats.clone().requires_grad_()
    loss = F.cross_entropy(head(f), y)
    (dfeats,) = torch.autograd.grad(loss, f)
    return pool_vjp(h, mean, rstd, dfeats, G), loss


def test_replicated_forward_values_equal_plain_pooling(device):
    model, head, h, y = setup(device=device)
    ref = replicated_losses_reference(h, head, y, G)  # (B, P, G), materialised copies
    plain = F.cross_entropy(head(model.block_features(h)), y, reduction="none")  # (B,)
    assert ref.shape == (B, P, G)
    torch.testing.assert_close(ref, plain.view(B, 1, 1).expand(B, P, G), rtol=0, atol=1e-6)
    feats, _, _ = pooled_features(h, G)
    torch.testing.assert_close(feats, model.block_features(h), rtol=1e-6, atol=1e-6)


def test_pool_vjp_is_the_plain_loss_gradient(device):
    model, head, h, y = setup(1, device=device)
    e, _ = closed_form_e(model, head, h, y)
    hr = h.clone().requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(head(model.block_features(hr)), y), hr)
    torch.testing.assert_close(e, ref, rtol=1e-5, atol=1e-7)


def test_closed_form_per_loss_derivative_equals_autograd_on_stop_gradient_reference(device):
    """dL_{b,p,g} = <ḣ_{b,p,g}, e_{b,p,g}> (per example: times B for a batch-mean loss)."""
    model, head, h, y = setup(2, device=device)
    e, _ = closed_form_e(model, head, h, y)
    t = torch.randn(3, B, P, C).to(device)
    got = replicated_jvp(e, t, G) * B  # (K, B, P, G)
    for k in range(3):
        _, ref = jvp(lambda v: replicated_losses_reference(v, head, y, G), (h,), (t[k],))
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-6)
    # each (p, g) derivative ignores every other slice's tangent
    t_other = t[0].clone()
    t_other[:, 1, : C // G] = 0.0  # remove the tangent of slice (p=1, g=0)
    _, ref = jvp(lambda v: replicated_losses_reference(v, head, y, G), (h,), (t_other,))
    changed = (ref - got[0] / 1.0).abs() > 1e-5
    assert changed[:, 1, 0].all() and not changed[:, [0, 2, 3]].any()
    assert not changed[:, 1, 1:].any()


def test_replicated_derivatives_equal_the_jvp_of_e_in_either_order(device):
    """<ḣ, J q> = <J ḣ, q>: the K = 1 order (J on the tangent) and the K > 1 order (J on q,
    then the product) agree with replicated_jvp(pool_vjp(...)), and th is left as it was."""
    model, head, h, y = setup(4, device=device)
    feats, mean, rstd = pooled_features(h, G)
    f = feats.clone().requires_grad_()
    (dfeats,) = torch.autograd.grad(F.cross_entropy(head(f), y), f)
    e = pool_vjp(h, mean, rstd, dfeats, G)
    for k in (1, 3):
        t = torch.randn(k, B, P, C).to(device)
        before = t.clone()
        got = replicated_derivatives(h, mean, rstd, dfeats, t, G)
        assert got.shape == (k, B, P, G) and torch.equal(t, before)
        torch.testing.assert_close(got, replicated_jvp(e, t, G), rtol=1e-5, atol=1e-8)
        over = replicated_derivatives(h, mean, rstd, dfeats, t.clone(), G, overwrite=True)
        torch.testing.assert_close(over, got, rtol=0, atol=0)


def test_replicated_backprop_matches_reference_and_sums_to_plain_gradient(device):
    model, head, h, y = setup(3, device=device)
    e, loss = closed_form_e(model, head, h, y)
    w = torch.randn(P, G).to(device)
    hr = h.clone().requires_grad_()
    losses = replicate(hr, e, loss, G)
    assert losses.shape == (P, G)
    torch.testing.assert_close(losses, loss.detach().expand(P, G))
    (got,) = torch.autograd.grad((losses * w).sum(), hr)
    hr2 = h.clone().requires_grad_()
    ref_losses = replicated_losses_reference(hr2, head, y, G).mean(0)  # batch-mean per (p, g)
    (ref,) = torch.autograd.grad((ref_losses * w).sum(), hr2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
    # with equal weights the replicated losses give back the plain loss's gradient
    hr3 = h.clone().requires_grad_()
    (total,) = torch.autograd.grad(replicate(hr3, e, loss, G).sum(), hr3)
    torch.testing.assert_close(total, e)
