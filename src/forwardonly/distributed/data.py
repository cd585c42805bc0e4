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
from .comm import nbytes
from .runtime import Session, tensor_digest


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of the ``world_size`` contiguous shards of ``n`` examples (first ones larger)."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s shard of ``n`` examples."""
    sizes = shard_sizes(n, world_size)
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def has_scalar_hook(est: Estimator) -> bool:
    """Whether ``est`` can combine processes' directional numbers (its ``reduce`` hook)."""
    return hasattr(type(est), "reduce")


class ShardReducer:
    """The ``reduce`` hook: ``(loss, d) -> Σ_r (n_r/N) (loss_r, d_r)`` by one all-gather.

    Set :attr:`sizes` (every rank's shard size) and :attr:`label` before each step.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.sizes = [1] * session.world_size
        self.label = "all-gather of the directional derivatives"

    def __call__(self, loss: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        s = self.session
        local = torch.cat([loss.detach().reshape(1).to(d.dtype), d.detach().reshape(-1)])
        if self.sizes[s.rank] == 0:  # this rank ran on a stand-in example: it counts for 0
            local = torch.zeros_like(local)
        rows = s.comm.all_gather(local.to(s.device), self.label)  # (W, K + 1)
        total = sum(self.sizes)
        weights = torch.tensor([n / total for n in self.sizes], dtype=torch.float64,
                               device=rows.device)
        combined = (rows.double() * weights.unsqueeze(1)).sum(0)  # (K + 1,)
        combined = combined.to(d.device)
        return combined[0].to(loss.dtype), combined[1:].to(d.dtype).view_as(d)


class DataParallelWorker:
    """One rank of a data-parallel run (see the module docstring).

    Arguments:
        est: this rank's estimator over the full model (identical on every rank).
        session: the rank's :class:`Session`.
    """

    def __init__(self, est: Estimator, session: Session) -> None:
        self.est = est
        self.module: nn.Module = est.model
        self.session = session
        self.weight = 1.0
        if has_scalar_hook(est):
            self.kind = "scalar"
            self.reducer = ShardReducer(session)
            est.reduce = self.reducer  # type: ignore[attr-defined]
        elif isinstance(est, Backprop):
            self.kind = "ddp"
            # buffers are not synchronized at each forward: evaluation runs on shards
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            with session.watchdog.watch("DistributedDataParallel set-up"):
                ddp = DistributedDataParallel(
                    self.module, **no_sync,
                    device_ids=[session.device] if session.device.type == "cuda" else None)
            ddp.register_comm_hook(self, _weighted_all_reduce)
            self.ddp_est = Backprop(ddp, est.loss_fn, seed=est.seed)
        else:
            self.kind = "gradients"

    @property
    def estimator(self) -> Estimator:
        return self.ddp_est if self.kind == "ddp" else self.est

    # -- one training step -------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, idx: Tensor) -> dict[str, float]:
        """One step on the global batch ``idx`` (indices into ``x``, ``y``): this rank takes
        its shard; the returned stats are those of the global batch."""
        s = self.session
        sizes = shard_sizes(len(idx), s.world_size)
        lo, hi = shard_bounds(len(idx), s.rank, s.world_size)
        local = idx[lo:hi] if hi > lo else idx[:1]  # an empty shard runs one example, weight 0
        xb, yb = x[local].to(s.device), y[local].to(s.device)
        self.weight = sizes[s.rank] / len(idx)
        label = f"step {self.estimator.steps_done + 1}"
        if self.kind == "scalar":
            self.reducer.sizes = sizes
            self.reducer.label = f"all-gather of the directional derivatives, {label}"
            return self.est.step(xb, yb)
        if self.kind == "ddp":
            with s.watchdog.watch(f"DDP gradient all-reduce, {label}", local_work=True):
                stats = self.ddp_est.step(xb, yb)
            return self._average_stats(stats, f"all-reduce of the loss, {label}")
        stats = self.est.step(xb, yb)
        return self._average_gradients(stats, f"all-reduce of the gradient, {label}")

    def _average_stats(self, stats: dict[str, float], label: str) -> dict[str, float]:
        keys = sorted(stats)
        t = torch.tensor([stats[k] * self.weight for k in keys], dtype=torch.float64,
                         device=self.session.device)
        t = self.session.comm.all_reduce(t, label)
        return dict(zip(keys, t.tolist(), strict=True))

    def _average_gradients(self, stats: dict[str, float], label: str) -> dict[str, float]:
        params = [p for _, p in self.est.trainable()]
        keys = sorted(stats)
        dtype = params[0].grad.dtype if params else torch.float32
        flat = torch.cat([p.grad.reshape(-1) for p in params]
                         + [torch.tensor([stats[k] for k in keys], dtype=dtype,
                                         device=self.session.device)])
        flat = self.session.comm.all_reduce(flat.mul_(self.weight), label)
        at = 0
        for p in params:
            p.grad.copy_(flat[at:at + p.numel()].view_as(p))
            at += p.numel()
        return dict(zip(keys, flat[at:].tolist(), strict=True))

    # -- the rest of the loop ----------------------------------------------------------------
    @torch.no_grad()
    def error_rate(self, x: Tensor, y: Tensor, batch_size: int, label: str) -> float:
        """Fraction misclassified; each rank scores its shard, one all-reduce of the counts."""
        s = self.session
        lo, hi = shard_bounds(len(x), s.rank, s.world_size)
        was_training = self.module.training
        self.module.eval()
        wrong = 0
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            xb, yb = x[i:j].to(s.device), y[i:j].to(s.device)
            wrong += int((self.est.predict(xb).argmax(-1) != yb).sum().item())
        self.module.train(was_training)
        total = s.comm.all_reduce(torch.tensor([wrong], dtype=torch.int64, device=s.device),
                                  label)
        return int(total.item()) / max(1, len(x))

    def clip_grad(self, max_norm: float) -> None:
        # every rank holds the same .grad: the local norm is the global one
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def all_finite(self, label: str) -> bool:
        ok = all(bool(torch.isfinite(p).all()) for p in self.module.parameters())
        return self.session.all_true(ok, label)

    def check_in_sync(self, label: str) -> None:
        """Raise if any rank's parameters differ (by a single bit) from rank 0's."""
        digest = tensor_digest(list(self.module.state_dict().values()))
        s = self.session
        all_digests = s.comm.all_gather(torch.tensor([digest], dtype=torch.int64,
                                                     device=s.device), label).view(-1).tolist()
        bad = [r for r, h in enumerate(all_digests) if h != all_digests[0]]
        if bad:
            raise RuntimeError(
                f"the parameters of rank(s) {bad} differ from rank 0's after {label}: the ranks "
                f"no longer compute the same update (a nondeterministic kernel, or different "
                f"hardware/torch versions across ranks); run every rank on the same kind of "
                f"device and torch version")

    def model_state(self) -> dict[str, Tensor] | None:
        return self.module.state_dict() if self.session.is_writer else None

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        return opt.state_dict() if self.session.is_writer else None

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(state)


def _weighted_all_reduce(worker, bucket):  # (DataParallelWorker, dist.GradBucket) -> Future
    """DDP communication hook: ``Σ_r (n_r/N) g_r`` instead of DDP's plain mean. (DDP checks
    the hook's annotations against its own classes, so there are none.)"""
    buf = bucket.buffer()
    buf.mul_(worker.weight)
    worker.session.comm.count("all_reduce", nbytes(buf), nbytes(buf))
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
