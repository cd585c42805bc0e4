"""Estimator quality on one real MNIST batch as the LocalMixer grows: cosine to the exact
gradient and variance of FG-W, FG-A, LG-FG-W, LG-FG-A (one direction per estimate), against
Table 1 of Ren et al. (ICLR 2023).

Model: one block, one patch (the M/1/16 family), width C = 64 … 2048 with 32 channels per
group (G = C/32; C = 512 is M/1/16). It is first trained 200 steps with backprop (so the
global loss reaches the backbone: the final head starts at zero), then frozen. For each
method, R estimates with K = 1 are drawn; per backbone layer we report the mean cosine to the
exact gradient (global loss for FG-W/FG-A, the local losses for LG-FG-W/LG-FG-A) and the
normalized variance ``ν = E‖g − ∇‖² / ‖∇‖²``.

Predictions (Gaussian directions, one fixed batch):

- weight perturbation, one v shared by the batch (Table 1, "pq"): ``E‖g_S − ∇_S‖² =
  m‖∇_m‖² + ‖∇_S‖²`` for the weights S of a layer, where the directional derivative mixes m
  perturbed weights with gradient ``∇_m`` (FG-W: all n parameters; LG-FG-W: the weights of
  the layer's group, and of the layers feeding it). So ``ν ≈ m‖∇_m‖²/‖∇_S‖² + 1``.
- activity perturbation, independent per example (Table 1, "q in place of pq"): for the
  ``q`` active units of a layer, ``E‖g_y − ∂L/∂y‖² = q‖a‖² + ‖a_layer‖²`` per example, ``a``
  the activity gradient of every unit the example's loss mixes; the weight gradient
  multiplies by ``‖x_b‖²`` and the output LayerNorm by about ``1/σ_b²``:
  ``E‖g_W − ∇_W‖² ≈ Σ_b ‖x_b‖²/σ_b² (q‖a_b‖² + ‖a_{layer,b}‖²)`` (per group for the
  grouped layer, whose weights see only their group's input). FG-A: ``a`` spans the
  whole block; LG-FG-A: per (example, group) loss, only the group's units (the LN's
  projection is left out, so this slightly overestimates).

    python -m benchmarks local-quality --draws 16
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from benchmarks.common import add_data_dir, add_threads, set_threads
from benchmarks.local_common import load
from benchmarks.report import Results, md_table
from forwardonly import build_model, make_estimator
from forwardonly.models.local_norm import layer_norm, ln_stats

METHODS = {"fg-w": "bp", "fg-a": "bp", "lg-fg-w": "l-bp", "lg-fg-a": "l-bp"}
HEADER = ("One MNIST batch of {batch}: LocalMixer with one block, one patch, "
          "C channels in G = C/32 groups (C = 512 is M/1/16), after {warm} backprop steps. "
          "{draws} one-direction estimates per method; per layer, the mean cosine to the exact "
          "gradient (global loss for FG-W/FG-A, local losses for LG-FG-W/LG-FG-A) and the "
          "normalized variance ν = E‖g − ∇‖²/‖∇‖², against Table 1's formulas (see "
          "benchmarks/local_quality.py; cos predicted as 1/√(1+ν)).")
TITLE = "Estimator quality as the LocalMixer grows (against Table 1's formulas)"


def grads_of(model, name, x, y, **options):
    est = make_estimator(name, model, F.cross_entropy, **options)
    est.step(x, y)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def warm_model(width: int, data, steps: int, seed: int):
    model = build_model("local-mixer", data.in_shape, 10, preset="M/1/16", width=width,
                        groups=max(1, width // 32), seed=seed)
    est = make_estimator("bp", model, F.cross_entropy)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_x), (128,), generator=gen)
        opt.zero_grad()
        est.step(data.train_x[idx], data.train_y[idx])
        opt.step()
    return model


def activity_terms(model, x, y, local: bool):
    """Per example and group, for each layer: ``‖x_b‖²·rstd²`` (input norm and output-LN
    scale), ``‖∂L/∂y‖²`` at the tangent's injection point and the active unit counts."""
    g = model.groups
    b = x.shape[0]
    cur = model.patchify(x)
    ys, scales, outs = [], [], []
    for layer in model.blocks[0].layers:  # block 0 has no residual: h = relu(layer(h))
        yv = layer(cur)  # the library's layer: LN_out(linear(LN_in(cur))), (B, 1, C)
        with torch.no_grad():
            a = layer_norm(cur, layer.norm_groups)  # the linear map's input
            _, _, rstd = ln_stats(layer.linear(a), layer.norm_groups)  # (B, 1, G_norm, 1)
        rstd2 = rstd.reshape(b, layer.norm_groups).square()  # (B, G_norm)
        cur = torch.relu(yv)
        ys.append(yv)
        # a grouped layer's group-g weights only see the group-g slice of its input
        x2 = a.reshape(b, layer.norm_groups, -1).pow(2).sum(-1)  # (B, G_norm)
        scales.append((x2 * rstd2).expand(b, g))
        outs.append(cur)
    if local:
        loss = F.cross_entropy(model.heads[0](model.block_features(cur)), y)
    else:
        loss = F.cross_entropy(model.final_head(model.final_features(cur)), y)
    gys = torch.autograd.grad(loss, ys)
    a2 = [gy.reshape(b, g, -1).pow(2).sum(-1) for gy in gys]  # (B, G) per layer
    active = [(o.detach().reshape(b, g, -1) > 0).sum(-1).float() for o in outs]
    return scales, a2, active


def group_norms(grads: dict[str, torch.Tensor], g: int) -> dict[str, torch.Tensor]:
    """Squared gradient norm of the parameters producing each output group: (G,) each."""
    w0, b0 = grads["blocks.0.layers.0.weight"], grads["blocks.0.layers.0.bias"]
    w1, b1 = grads["blocks.0.layers.1.weight"], grads["blocks.0.layers.1.bias"]
    return {
        "blocks.0.layers.0.weight": w0.view(w0.shape[0], g, -1).pow(2).sum((0, 2)),
        "blocks.0.layers.0.bias": b0.view(g, -1).pow(2).sum(-1),
        "blocks.0.layers.1.weight": w1.pow(2).sum((1, 2)),
        "blocks.0.layers.1.bias": b1.pow(2).sum(-1),
    }


def arguments(name: str, ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warm-steps", type=int, default=200)
    add_threads(ap)
    add_data_dir(ap)


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    set_threads(args.threads)
    data = load("mnist", args.data_dir)
    x, y = data.train_x[: args.batch], data.train_y[: args.batch]
    rows = []
    for width in args.widths:
        model = warm_model(width, data, args.warm_steps, seed=0)
        n_all = sum(p.numel() for p in model.parameters())
        exact = {ref: grads_of(model, ref, x, y) for ref in ("bp", "l-bp")}
        g = model.groups
        layers = ["blocks.0.layers.0.weight", "blocks.0.layers.1.weight"]
        for method, ref in METHODS.items():
            draws = [grads_of(model, method, x, y, seed=s) for s in range(args.draws)]
            ex = exact[ref]
            for li, name in enumerate(layers):
                e = ex[name]
                cosines = [float(d[name].flatten() @ e.flatten() / (d[name].norm() * e.norm()))
                           for d in draws]
                var = sum(float((d[name] - e).pow(2).sum()) for d in draws) / len(draws)
                nu = var / float(e.pow(2).sum())
                if method == "fg-w":  # one v over all n parameters: |S|‖∇‖² + ‖∇_S‖²
                    full = sum(float(v.pow(2).sum()) for v in ex.values())
                    pred = e.numel() * full / float(e.pow(2).sum()) + 1
                elif method == "lg-fg-w":  # loss g mixes the group-g weights of both layers
                    per_group = group_norms(ex, g)  # name -> (G,) squared norms
                    mixed = sum(per_group.values())  # (G,) ‖∇_{m_g}‖²: all weights loss g sees
                    pred = float((e.numel() // g * mixed + per_group[name]).sum()) / float(
                        e.pow(2).sum())
                else:
                    scale, a2, active = activity_terms(model, x, y, local=(method == "lg-fg-a"))
                    if method == "fg-a":  # one loss per example mixes every active unit
                        mixed = (a2[0] + a2[1]).sum(-1, keepdim=True)  # (B, 1)
                        q = active[li].sum(-1, keepdim=True)
                        own = a2[li].sum(-1, keepdim=True)
                        sc = scale[li].mean(-1, keepdim=True)
                    else:  # loss (b, g) mixes the active units of group g of both layers
                        mixed, q, own, sc = a2[0] + a2[1], active[li], a2[li], scale[li]
                    pred = float((sc * (q * mixed + own)).sum()) / float(e.pow(2).sum())
                row = {"width": width, "groups": g, "params": n_all, "method": method,
                       "layer": "embed" if li == 0 else "group", "draws": args.draws,
                       "cos_mean": sum(cosines) / len(cosines),
                       "cos_pred": 1 / math.sqrt(1 + pred), "nu": nu, "nu_pred": pred,
                       "ratio": nu / pred}
                rows.append(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
    table = [[r["width"], r["groups"], r["method"].upper(), r["layer"], f"{r['cos_mean']:.3f}",
              f"{r['cos_pred']:.3f}", f"{r['nu']:.3g}", f"{r['nu_pred']:.3g}",
              f"{r['ratio']:.2f}"] for r in rows]
    text = (HEADER.format(draws=args.draws, batch=args.batch, warm=args.warm_steps) + "\n\n"
            + md_table(["C", "G", "method", "layer", "cos (measured)", "cos (Table 1)",
                        "ν measured", "ν Table 1", "ratio"], table))
    res.write("quality", rows, title=TITLE, text=text)
