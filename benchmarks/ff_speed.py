"""Forward-Forward step time against a plain-PyTorch FF step, interleaved in one process.

The network of the published yardstick: 784-1000-1000-1000, batch 100, supervised FF with
random wrong-label negatives (both sides do the same work: a positive and a negative pass per
layer, no softmax head, no peer normalization). Two ways of doing one training step, each
with its own copy of the same weights and Adam:

- *forwardonly*: ``opt.zero_grad(); ForwardForward.step(x, y); opt.step()`` (the library's
  closed-form layer gradients, the first layer shared by the label variants);
- *plain*: the straightforward PyTorch FF of the reference recipe: per layer, normalize the
  input, ``relu(Linear(x))``, goodness = sum of squares, softplus loss around the threshold,
  ``loss.backward()`` and the layer's own Adam step; the next layer gets the detached output
  (also timed with fused Adam, and with fused Adam and subnormal numbers flushed to zero).

Both run at the same precision (``--precision``; bf16 only helps where the CPU computes it
natively: see ``torch.backends.cpu.get_cpu_capability()`` in the record), timed round-robin
(``--steps`` of one, then of the other, ``--rounds`` times) for each ``--threads`` count; the
ratio is the median of the per-round ratios, with its range.

    python -m benchmarks ff-speed --threads 1 2 --rounds 5 --steps 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import add_data_dir
from benchmarks.report import Results, md_table
from forwardonly import build_model, make_estimator
from forwardonly.train.builders import adamw


class PlainFF:
    """Forward-Forward written the straightforward way (the reference recipe)."""

    def __init__(self, sizes: list[int], dtype: torch.dtype, classes: int = 10,
                 label_scale: float = 1.0, fused: bool = False,
                 flush_subnormals: bool = False) -> None:
        self.layers = [nn.Linear(a, b, dtype=dtype) for a, b in zip(sizes[:-1], sizes[1:],
                                                                       strict=True)]
        self.opts = [torch.optim.Adam(layer.parameters(), lr=1e-3, fused=fused or None)
                     for layer in self.layers]
        self.thresholds = [float(layer.out_features) for layer in self.layers]  # sum goodness
        self.classes, self.scale, self.dtype = classes, label_scale, dtype
        self.flush_subnormals = flush_subnormals

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.flush_subnormals:
            self._step(x, y)
            return
        torch.set_flush_denormal(True)  # this thread computes subnormal numbers as 0
        try:
            self._step(x, y)
        finally:
            torch.set_flush_denormal(False)

    def embed(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).clone()
        x[:, : self.classes] = 0.0
        x[torch.arange(len(x)), labels] = self.scale
        return x.to(self.dtype)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        wrong = (y + torch.randint(1, self.classes, y.shape)) % self.classes
        h_pos, h_neg = self.embed(x, y), self.embed(x, wrong)
        for layer, opt, theta in zip(self.layers, self.opts, self.thresholds, strict=True):
            def run(h: torch.Tensor, layer: nn.Linear = layer) -> torch.Tensor:
                return torch.relu(layer(h / (h.norm(dim=1, keepdim=True) + 1e-4)))

            a_pos, a_neg = run(h_pos), run(h_neg)
            g_pos, g_neg = a_pos.pow(2).sum(1), a_neg.pow(2).sum(1)
            loss = F.softplus(torch.cat([theta - g_pos, g_neg - theta])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            h_pos, h_neg = a_pos.detach(), a_neg.detach()


class MatmulFloor:
    """Only the matrix products of :class:`PlainFF`'s step: per layer, the forward ``h Wᵀ`` of
    the positive and the negative batch stacked (2B rows) and the weight gradient ``δᵀ h``.
    Any FF step that does this arithmetic takes at least this long, so *plain / floor* is the
    most such a step can gain over the plain one (the library shares the first layer's image
    columns between the two label variants, a little less arithmetic)."""

    def __init__(self, sizes: list[int], dtype: torch.dtype, batch: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.weights = [torch.randn(b, a, generator=g).to(dtype)
                        for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        self.inputs = [torch.randn(2 * batch, a, generator=g).to(dtype) for a in sizes[:-1]]
        self.deltas = [torch.randn(2 * batch, b, generator=g).to(dtype) for b in sizes[1:]]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for w, h, d in zip(self.weights, self.inputs, self.deltas, strict=True):
            torch.mm(h, w.T)
            torch.mm(d.T, h)


class LibraryFF:
    """The library's FF network and estimator with the optimizer ``forwardonly train`` builds
    for ``--optimizer adam`` (AdamW, fused where torch has the kernel; weight decay 0: Adam),
    the same work as :class:`PlainFF`."""

    def __init__(self, widths: list[int], precision: str) -> None:
        self.model = build_model("ff-mlp", (1, 28, 28), 10, widths=widths, mode="supervised",
                                 readout="goodness", precision=precision, seed=0)
        self.est = make_estimator("ff", self.model, F.cross_entropy, seed=0,
                                  negatives="random", peer_weight=0.0)
        self.opt = adamw(self.model.parameters(), lr=1e-3)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        self.est.step(x, y)
        self.opt.step()


def images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """MNIST training images when found (the library's rule), else random stand-ins: the
    step time does not depend on pixel values."""
    from forwardonly import DataError, load_dataset

    try:
        ds = load_dataset("mnist", args.data_dir)
        return ds.train_x, ds.train_y, "MNIST"
    except DataError as err:
        print(f"(MNIST not found: {err} Timing on random images of the same shape.)")
        g = torch.Generator().manual_seed(0)
        n = args.batch_size * 20
        return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), \
            "random"


def arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", type=int, nargs="+", default=[1000, 1000, 1000])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--precision", choices=("float32", "bfloat16"), nargs="+",
                   default=["float32"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="torch thread counts, each measured separately")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=50, help="steps per method per round")
    add_data_dir(p)


def run(name: str, args: argparse.Namespace, res: Results) -> None:
    train_x, train_y, source = images(args)
    B = args.batch_size
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
    batches = [order[i : i + B] for i in range(0, len(order) - B + 1, B)]

    def go(side: PlainFF | LibraryFF | MatmulFloor, first: int, n: int) -> None:
        for i in range(first, first + n):
            idx = batches[i % len(batches)]
            side.step(train_x[idx], train_y[idx])

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for precision in args.precision:
            dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
            ours = LibraryFF(args.widths, precision)
            torch.manual_seed(0)
            plain = PlainFF([28 * 28, *args.widths], dtype)
            fused = PlainFF([28 * 28, *args.widths], dtype, fused=True)
            flushed = PlainFF([28 * 28, *args.widths], dtype, fused=True, flush_subnormals=True)
            with torch.no_grad():  # the same starting weights
                for side in (plain, fused, flushed):
                    for mine, ref in zip(side.layers, ours.model.layers, strict=True):
                        mine.weight.copy_(ref.weight)
                        mine.bias.copy_(ref.bias)
            sides: dict[str, PlainFF | LibraryFF | MatmulFloor] = {
                "forwardonly": ours, "plain PyTorch": plain,
                "plain PyTorch, fused Adam": fused,
                "plain PyTorch, fused Adam, subnormals flushed": flushed,
                "matrix products only": MatmulFloor([28 * 28, *args.widths], dtype, B)}
            times: dict[str, list[float]] = {k: [] for k in sides}
            for side in sides.values():  # warm-up: allocator, kernels
                go(side, 0, 3)
            for r in range(args.rounds):
                for k, side in sides.items():
                    t0 = time.perf_counter()
                    go(side, r * args.steps, args.steps)
                    times[k].append((time.perf_counter() - t0) / args.steps)
            for k, ts in times.items():
                if k == "plain PyTorch":
                    continue
                ratios = [p / o for p, o in zip(times["plain PyTorch"], ts, strict=True)]
                rows.append({"threads": threads, "precision": precision, "method": k,
                             "ms_per_step": round(1e3 * statistics.median(ts), 2),
                             "epoch_s_at_this_rate": round(statistics.median(ts)
                                                           * (60000 // B), 1),
                             "plain_over_ours": round(statistics.median(ratios), 3),
                             "ratio_min": round(min(ratios), 3),
                             "ratio_max": round(max(ratios), 3),
                             "rounds": args.rounds, "steps_per_round": args.steps})
            ts = times["plain PyTorch"]
            rows.append({"threads": threads, "precision": precision, "method": "plain PyTorch",
                         "ms_per_step": round(1e3 * statistics.median(ts), 2),
                         "epoch_s_at_this_rate": round(statistics.median(ts) * (60000 // B), 1),
                         "plain_over_ours": "", "ratio_min": "", "ratio_max": "",
                         "rounds": args.rounds, "steps_per_round": args.steps})
    widths = "-".join(map(str, [784, *args.widths]))
    table = [[r["threads"], r["precision"], r["method"], r["ms_per_step"],
              r["epoch_s_at_this_rate"],
              f"{r['plain_over_ours']}× ({r['ratio_min']}–{r['ratio_max']})"
              if r["plain_over_ours"] != "" else ""] for r in rows]
    text = (f"FF {widths}, batch {B}, supervised, random wrong-label negatives, no head, no "
            f"peer normalization, Adam; {source} images. The library's step and a plain-PyTorch "
            f"FF step (per-layer `loss.backward()` and Adam, the reference recipe) on copies of "
            f"the same weights, interleaved: {args.steps} steps of each per round, "
            f"{args.rounds} rounds; median ms per step; *plain / ours* is the median of the "
            f"per-round ratios (range in brackets). The library steps with the optimizer "
            f"`forwardonly train --optimizer adam` builds: AdamW with torch's fused kernel "
            f"(weight decay 0); the plain recipe uses `torch.optim.Adam` as a user writes it, "
            f"and *plain PyTorch, fused Adam* is that recipe with `fused=True`, so the gain "
            f"from the optimizer alone shows; *subnormals flushed* runs that step with "
            f"`torch.set_flush_denormal(True)` (subnormal numbers computed as 0 on the "
            f"calling thread), the part of the library's gain that comes from never making "
            f"subnormal gradients (rows whose loss derivative is under 1e-24 count as 0). "
            f"*matrix products only* times just the "
            f"products of the plain step (per layer the forward of the 2×{B} positive and "
            f"negative rows and the weight gradient), in the same rounds: *plain / that* is the "
            f"most any FF step doing that arithmetic could gain over the plain one. Target: ≥ 2× "
            f"at equal precision and batch. Epoch seconds are the step time × {60000 // B} "
            "steps (training only, no data loading, no evaluation).\n\n"
            + md_table(["threads", "precision", "method", "ms / step", "s / epoch at this rate",
                        "plain / this"], table))
    res.write("speed", rows, title=f"Forward-Forward step time, {widths}, batch {B}: the "
              "library against plain PyTorch", text=text)
