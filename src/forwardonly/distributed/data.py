"""Seed-synchronized data parallelism: every rank a shard of the batch, only scalars travel.

Every rank is handed the same global batch of N examples and takes a contiguous shard of
``n_r``. The loss is a mean, so along a direction ``v_k`` drawn on every rank from the same
``(seed, step, tensor)``:

    d_k = ∇L_N · v_k = Σ_r (n_r / N) ∇L_r · v_k = Σ_r (n_r / N) d_{k,r}

One all-gather of each rank's K + 1 numbers (its ``d_{·,r}`` and loss) per step, summed in
float64 in rank order on every rank, gives every rank the same ``g = (1/K) Σ_k c(d_k) v_k``
from the same bits: the parameters stay bit-identical without ever being sent, ``(K + 1)·4``
bytes per rank and step instead of a gradient's ``4 P``. Zeroth order (``zo``, ``zo-sign``)
sends its K loss differences the same way (float64). Other estimators average gradients with
the weights ``n_r / N``: backprop through ``DistributedDataParallel`` (the baseline), any
other by one all-reduce of its flattened gradient after the step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..estimators import Backprop
from ..train.worker import MakeEstimator, error_rate
from .group import RankWorker, tensor_digest


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of the ``world_size`` contiguous shards of ``n`` examples (first ones larger)."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s shard of ``n`` examples."""
    sizes = shard_sizes(n, world_size)
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


class DataParallelWorker(RankWorker):
    """One rank of a data-parallel run (see the module docstring); a
    :class:`~forwardonly.train.Worker`.

    Arguments:
        device: the configured device (``cpu``: gloo; ``cuda``: nccl on ``cuda:LOCAL_RANK``).
        timeout: ``dist_timeout`` in seconds.
    """

    def __init__(self, device: str = "cpu", timeout: float = 60.0) -> None:
        super().__init__(device, timeout)
        self.sizes = [1] * self.world_size  # every rank's shard of the current batch
        self.weight = 1.0  # this rank's share n_r / N of it
        self.label = ""

    def attach(self, model: nn.Module, make_estimator: MakeEstimator) -> None:
        self._module = model.to(self.device)
        self.est = self._est = make_estimator(self._module)
        if hasattr(type(self.est), "reduce"):  # fg-w, fg-sign, zo, zo-sign
            self.kind = "scalar"
            self.est.reduce = self.reduce  # type: ignore[attr-defined]
        elif isinstance(self.est, Backprop):
            self.kind = "ddp"
            # buffers are not synchronized at each forward: evaluation runs on shards
            no_sync: dict[str, Any] = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            with self.watch("DistributedDataParallel set-up"):
                ddp = DistributedDataParallel(
                    self._module, **no_sync,
                    device_ids=[self.device] if self.device.type == "cuda" else None)
            ddp.register_comm_hook(self, _weighted_all_reduce)
            self._est = Backprop(ddp, self.est.loss_fn, seed=self.est.seed)
        else:
            self.kind = "gradients"

    def describe(self) -> str:
        n = sum(p.numel() for p in self._module.parameters() if p.requires_grad)
        how = {"scalar": "only directional derivatives travel", "ddp": "DDP",
               "gradients": "gradients all-reduced"}[self.kind]
        return (f"data-parallel {self.est.name} on {self.world_size} ranks "
                f"({self.backend}; {how}), {n:,} trainable parameters")

    # -- one training step -------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One step on the global batch ``(x, y)``: this rank takes its shard; the stats
        returned are the global batch's."""
        self.sizes = shard_sizes(len(x), self.world_size)
        lo, hi = shard_bounds(len(x), self.rank, self.world_size)
        if hi == lo:  # an empty shard runs one example, with weight 0
            lo, hi = 0, 1
        xb, yb = x[lo:hi].to(self.device), y[lo:hi].to(self.device)
        self.weight = self.sizes[self.rank] / len(x)
        label = f"step {self._est.steps_done + 1}"
        if self.kind == "scalar":
            self.label = f"all-gather of the directional derivatives, {label}"
            return self.est.step(xb, yb)
        if self.kind == "ddp":
            with self.watch(f"DDP gradient all-reduce, {label}"):
                stats = self._est.step(xb, yb)
            return self._average(stats, [], f"all-reduce of the loss, {label}")
        stats = self.est.step(xb, yb)
        params = [p for _, p in self.est.trainable()]
        return self._average(stats, params, f"all-reduce of the gradient, {label}")

    def reduce(self, loss: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """The estimators' ``reduce`` hook: ``(loss, d) -> Σ_r (n_r/N) (loss_r, d_r)`` by one
        all-gather, summed in float64 in rank order (the same bits on every rank)."""
        local = torch.cat([loss.detach().reshape(1).to(d.dtype), d.detach().reshape(-1)])
        if self.sizes[self.rank] == 0:  # this rank ran on a stand-in example: it counts for 0
            local = torch.zeros_like(local)
        rows = self.all_gather(local.to(self.device), self.label)  # (W, K + 1)
        weights = torch.tensor(self.sizes, dtype=torch.float64, device=rows.device)
        combined = (rows.double() * (weights / weights.sum()).unsqueeze(1)).sum(0)  # (K + 1,)
        combined = combined.to(d.device)
        return combined[0].to(loss.dtype), combined[1:].to(d.dtype).view_as(d)

    def _average(self, stats: dict[str, float], params: Sequence[Tensor], label: str
                 ) -> dict[str, float]:
        """``Σ_r (n_r/N)`` of ``params``' gradients and of ``stats``, in one all-reduce."""
        keys = sorted(stats)
        grads = cast(list[Tensor], [p.grad for p in params])  # every one filled by the step
        dtype = grads[0].dtype if grads else torch.float64
        flat = torch.cat([g.reshape(-1) for g in grads]
                         + [torch.tensor([stats[k] for k in keys], dtype=dtype,
                                         device=self.device)])
        flat = self.all_reduce(flat.mul_(self.weight), label)
        at = 0
        for g in grads:
            g.copy_(flat[at:at + g.numel()].view_as(g))
            at += g.numel()
        return dict(zip(keys, flat[at:].tolist(), strict=True))

    # -- the rest of the loop ----------------------------------------------------------------
    def error_rate(self, x: Tensor, y: Tensor, batch_size: int) -> float:
        """Fraction misclassified; each rank scores its shard, one all-reduce of the counts."""
        lo, hi = shard_bounds(len(x), self.rank, self.world_size)
        wrong = round(error_rate(self.est, x[lo:hi], y[lo:hi], batch_size) * (hi - lo))
        total = self.all_reduce(torch.tensor([wrong], dtype=torch.int64, device=self.device),
                             "the error count")
        return int(total.item()) / max(1, len(x))

    def clip_grad(self, max_norm: float) -> None:
        # every rank holds the same .grad: the local norm is the global one
        torch.nn.utils.clip_grad_norm_(self._module.parameters(), max_norm)

    def end_epoch(self, epoch: int) -> None:
        """Raise if any rank's parameters differ (by a single bit) from rank 0's."""
        digest = tensor_digest(list(self._module.state_dict().values()))
        digests = self.all_gather(torch.tensor([digest], dtype=torch.int64, device=self.device),
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
    worker.count("all_reduce", buf.nbytes, buf.nbytes)
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
