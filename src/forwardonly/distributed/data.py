"""Seed-synchronized data parallelism: every rank a shard of the batch, only scalars travel.

All ranks see the same shuffled global batch of N examples (the epoch's permutation comes from
the seed) and take a contiguous shard of ``n_r`` examples (sizes differ by at most one). The
loss is a mean, so the full batch's directional derivative along ``v_k`` is

    d_k = ∇L_N · v_k = Σ_r (n_r / N) ∇L_r · v_k = Σ_r (n_r / N) d_{k,r}

and ``v_k`` is drawn on every rank from the same ``(seed, step, tensor)``: each rank computes
its own ``d_{·,r}`` (K numbers) and the loss, one all-gather of those K + 1 numbers per step
gives every rank all of them, and every rank sums them in float64 in the same order. So
every rank forms the same estimate ``g = (1/K) Σ_k c(d_k) v_k`` from the same bits and takes
the same optimizer step: the parameters stay bit-identical without ever being sent, and the
payload per step is ``(K + 1) · 4`` bytes per rank instead of the ``4 P`` bytes of a gradient.
(An all-gather rather than an all-reduce makes the summation order the code's, not the
backend's.) Zeroth order (``zo``, ``zo-sign``) works the same way with the K loss
differences, sent in float64.

Estimators without the scalar hook fall back to averaging gradients: backprop through
``DistributedDataParallel`` (the baseline: its gradient buckets are all-reduced during the
backward pass), any other estimator by one all-reduce of its flattened gradient after the
step. Both weight rank ``r``'s gradient by ``n_r / N``, so the result is again the gradient
estimate of the full batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..estimators import Backprop, Estimator
from .group import Group, RankWorker, nbytes, tensor_digest


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of the ``world_size`` contiguous shards of ``n`` examples (first ones larger)."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s shard of ``n`` examples."""
    sizes = shard_sizes(n, world_size)
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


class ShardReducer:
    """The estimators' ``reduce`` hook: ``(loss, d) -> Σ_r (n_r/N) (loss_r, d_r)`` by one
    all-gather. Set :attr:`sizes` (every rank's shard size) and :attr:`label` before a step."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.sizes = [1] * group.world_size
        self.label = "all-gather of the directional derivatives"

    def __call__(self, loss: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        g = self.group
        local = torch.cat([loss.detach().reshape(1).to(d.dtype), d.detach().reshape(-1)])
        if self.sizes[g.rank] == 0:  # this rank ran on a stand-in example: it counts for 0
            local = torch.zeros_like(local)
        rows = g.all_gather(local.to(g.device), self.label)  # (W, K + 1)
        total = sum(self.sizes)
        weights = torch.tensor([n / total for n in self.sizes], dtype=torch.float64,
                               device=rows.device)
        combined = (rows.double() * weights.unsqueeze(1)).sum(0).to(d.device)  # (K + 1,)
        return combined[0].to(loss.dtype), combined[1:].to(d.dtype).view_as(d)


class DataParallelWorker(RankWorker):
    """One rank of a data-parallel run (see the module docstring); a
    :class:`~forwardonly.train.Worker`.

    Arguments:
        group: this rank's :class:`Group` (opened by :meth:`start`).
    """

    def __init__(self, group: Group) -> None:
        super().__init__(group)
        self.weight = 1.0  # this rank's share n_r / N of the current batch
        self.kind = ""

    def attach(self, model: nn.Module, make_estimator: Any) -> None:
        g = self.group
        self._module = model.to(g.device)
        self.est: Estimator = make_estimator(self._module)
        self._est = self.est
        if hasattr(type(self.est), "reduce"):  # fg-w, fg-sign, zo, zo-sign
            self.kind = "scalar"
            self.reducer = ShardReducer(g)
            self.est.reduce = self.reducer  # type: ignore[attr-defined]
        elif isinstance(self.est, Backprop):
            self.kind = "ddp"
            # buffers are not synchronized at each forward: evaluation runs on shards
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            with g.watch("DistributedDataParallel set-up"):
                ddp = DistributedDataParallel(
                    self._module, **no_sync,
                    device_ids=[g.device] if g.device.type == "cuda" else None)
            ddp.register_comm_hook(self, _weighted_all_reduce)
            self._est = Backprop(ddp, self.est.loss_fn, seed=self.est.seed)
        else:
            self.kind = "gradients"

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def estimator(self) -> Estimator:
        return self._est

    def describe(self) -> str:
        n = sum(p.numel() for p in self._module.parameters() if p.requires_grad)
        how = {"scalar": f"{self.est.directions + 1} numbers per step travel"  # type: ignore
               if hasattr(self.est, "directions") else "scalars travel",
               "ddp": "DistributedDataParallel", "gradients": "gradients all-reduced"}
        return (f"data-parallel {self.est.name} on {self.group.world_size} ranks "
                f"({self.group.backend}; {how[self.kind]}), {n:,} trainable parameters")

    # -- one training step -------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One step on the global batch ``(x, y)``: this rank takes its shard; the stats
        returned are the global batch's."""
        g = self.group
        sizes = shard_sizes(len(x), g.world_size)
        lo, hi = shard_bounds(len(x), g.rank, g.world_size)
        if hi == lo:  # an empty shard runs one example, with weight 0
            lo, hi = 0, 1
        xb, yb = x[lo:hi].to(g.device), y[lo:hi].to(g.device)
        self.weight = sizes[g.rank] / len(x)
        label = f"step {self._est.steps_done + 1}"
        if self.kind == "scalar":
            self.reducer.sizes = sizes
            self.reducer.label = f"all-gather of the directional derivatives, {label}"
            return self.est.step(xb, yb)
        if self.kind == "ddp":
            with g.watch(f"DDP gradient all-reduce, {label}"):
                stats = self._est.step(xb, yb)
            return self._average(stats, [], f"all-reduce of the loss, {label}")
        stats = self.est.step(xb, yb)
        params = [p for _, p in self.est.trainable()]
        return self._average(stats, params, f"all-reduce of the gradient, {label}")

    def _average(self, stats: dict[str, float], params: list[Tensor], label: str
                 ) -> dict[str, float]:
        """``Σ_r (n_r/N)`` of ``params``' gradients and of ``stats``, in one all-reduce."""
        keys = sorted(stats)
        dtype = params[0].grad.dtype if params else torch.float64
        flat = torch.cat([p.grad.reshape(-1) for p in params]
                         + [torch.tensor([stats[k] for k in keys], dtype=dtype,
                                         device=self.group.device)])
        flat = self.group.all_reduce(flat.mul_(self.weight), label)
        at = 0
        for p in params:
            p.grad.copy_(flat[at:at + p.numel()].view_as(p))
            at += p.numel()
        return dict(zip(keys, flat[at:].tolist(), strict=True))

    # -- the rest of the loop ----------------------------------------------------------------
    @torch.no_grad()
    def error_rate(self, x: Tensor, y: Tensor, batch_size: int) -> float:
        """Fraction misclassified; each rank scores its shard, one all-reduce of the counts."""
        g = self.group
        lo, hi = shard_bounds(len(x), g.rank, g.world_size)
        was_training = self._module.training
        self._module.eval()
        wrong = 0
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            xb, yb = x[i:j].to(g.device), y[i:j].to(g.device)
            wrong += int((self.est.predict(xb).argmax(-1) != yb).sum().item())
        self._module.train(was_training)
        total = g.all_reduce(torch.tensor([wrong], dtype=torch.int64, device=g.device),
                             "the error count")
        return int(total.item()) / max(1, len(x))

    def clip_grad(self, max_norm: float) -> None:
        # every rank holds the same .grad: the local norm is the global one
        torch.nn.utils.clip_grad_norm_(self._module.parameters(), max_norm)

    def all_finite(self) -> bool:
        ok = all(bool(torch.isfinite(p).all()) for p in self._module.parameters())
        return self.all_true(ok, "the finiteness check")

    def end_epoch(self, epoch: int) -> None:
        """Raise if any rank's parameters differ (by a single bit) from rank 0's."""
        g = self.group
        digest = tensor_digest(list(self._module.state_dict().values()))
        digests = g.all_gather(torch.tensor([digest], dtype=torch.int64, device=g.device),
                               f"the parameter check, epoch {epoch}").view(-1).tolist()
        bad = [r for r, h in enumerate(digests) if h != digests[0]]
        if bad:
            raise RuntimeError(
                f"the parameters of rank(s) {bad} differ from rank 0's after epoch {epoch}: "
                f"the ranks no longer compute the same update (a nondeterministic kernel, or "
                f"different hardware/torch versions across ranks); run every rank on the same "
                f"kind of device and torch version")

    def model_state(self) -> dict[str, Tensor] | None:
        return self._module.state_dict() if self.is_writer else None

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        return opt.state_dict() if self.is_writer else None

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(state)


def _weighted_all_reduce(worker, bucket):  # (DataParallelWorker, dist.GradBucket) -> Future
    """DDP communication hook: ``Σ_r (n_r/N) g_r`` instead of DDP's plain mean. (DDP checks
    the hook's annotations against its own classes, so there are none.)"""
    buf = bucket.buffer()
    buf.mul_(worker.weight)
    worker.group.count("all_reduce", nbytes(buf), nbytes(buf))
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
