"""Pipeline stages: the model's layers split over the ranks, each rank updating its own.

An ``nn.Sequential`` model (``mlp``, ``cnn``; nested ones are flattened) is cut into W
contiguous stages balanced by parameter count; a rank holds only its stage's parameters and
optimizer state. **Forward gradient** (``fg-w``, ``fg-sign``): stage ``s`` draws its tensors'
directions from ``(seed, step, tensor index)`` — indices over the whole model, so exactly the
single process's directions — carries the activation ``h`` and its K tangents ``ḣ`` from stage
``s-1`` through its layers (forward mode, Baydin et al. 2022) and sends them on. The last
stage broadcasts the loss and the K directional derivatives; every stage forms its share of
``g = (1/K) Σ_k c(d_k) v_k`` by redrawing its ``v_k``. Nothing travels backward.
**Backprop** (``bp``), the baseline: activations forward, input gradients backward.

Both compute what the single process computes, op for op. A boundary's feature shape and
dtype travel once (``dist.send_object_list``); after that, bare tensors: ``h`` (B × width) and
``ḣ`` (K × B × width) — K + 1 activations per boundary and step, backprop two.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from ..autodiff import Factored, loss_and_derivatives, run_layers, sequential_layers
from ..config import ConfigError
from ..estimators import Backprop, ForwardGradient
from ..estimators.base import set_grad
from ..train.worker import MakeEstimator
from .group import RankWorker

STAGE_METHODS = ("fg-w", "fg-sign", "bp")
Layer = tuple[str, nn.Module]


def trainable_count(module: nn.Module) -> tuple[int, int]:
    """``(tensors, elements)`` of the trainable parameters of ``module``."""
    params = [p for p in module.parameters() if p.requires_grad]
    return len(params), sum(p.numel() for p in params)


def split_stages(model: nn.Module, stages: int) -> list[list[Layer]]:
    """Cut ``model``'s layers into ``stages`` contiguous groups, balanced by parameters.

    A stage starts at a layer with trainable parameters; parameter-free layers (activations,
    pooling, flatten) stay with the layer before them (leading ones with the first stage).
    Among all such cuts, the one with the smallest largest stage (in parameters) is taken.
    """
    layers = sequential_layers(model)
    if layers is None:
        raise ConfigError(f"--distributed stages cuts an nn.Sequential model into pipeline "
                          f"stages, but the model is a {type(model).__name__}; use a "
                          f"sequential model (mlp, cnn) or --distributed data")
    units: list[list[Layer]] = []
    for name, layer in layers:
        if trainable_count(layer)[1] > 0 or not units:
            units.append([(name, layer)])
        else:
            units[-1].append((name, layer))
    if len(units) > 1 and trainable_count(nn.ModuleList(m for _, m in units[0]))[1] == 0:
        units[1] = units[0] + units[1]
        units = units[1:]
    costs = [trainable_count(nn.ModuleList(m for _, m in u))[1] for u in units]
    if len(units) < stages or costs[0] == 0:
        raise ConfigError(f"--distributed stages with {stages} ranks needs at least {stages} "
                          f"layers with trainable parameters, the model has {len(units)}; "
                          f"start fewer processes (--nproc-per-node) or use a deeper model")
    cuts = _balanced_cuts(costs, stages)
    return [[layer for u in units[a:b] for layer in u] for a, b in pairwise(cuts)]


def _balanced_cuts(costs: list[int], parts: int) -> list[int]:
    """Boundaries ``0 = c_0 < ... < c_parts = n`` minimizing the largest part's sum."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest possible largest part when the first i units form s parts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    back = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for s in range(1, parts + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], back[s][i] = cost, j
    cuts = [n]
    for s in range(parts, 0, -1):
        cuts.append(back[s][cuts[-1]])
    return cuts[::-1]


def merge_optimizer_states(states: list[dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    """The per-stage optimizer states as the one state a single-process optimizer over the
    whole model has (its parameter indices run over all stages in order)."""
    merged: dict[int, Any] = {}
    offset = 0
    for state, n in zip(states, counts, strict=True):
        if len(state["param_groups"]) != 1:
            raise ValueError("stage checkpoints support optimizers with one parameter group")
        for i, s in state["state"].items():
            merged[offset + int(i)] = s
        offset += n
    group = dict(states[0]["param_groups"][0], params=list(range(offset)))
    return {"state": merged, "param_groups": [group]}


def split_optimizer_state(state: dict[str, Any], offset: int, count: int) -> dict[str, Any]:
    """Stage ``[offset, offset + count)``'s share of a whole-model optimizer state."""
    group = dict(state["param_groups"][0], params=list(range(count)))
    mine = {int(i) - offset: s for i, s in state["state"].items()
            if offset <= int(i) < offset + count}
    return {"state": mine, "param_groups": [group]}


class StageWorker(RankWorker):
    """One rank of a stage-sharded run (see the module docstring); a
    :class:`~forwardonly.train.Worker`.

    Arguments:
        device: the configured device (``cpu``: gloo; ``cuda``: nccl on ``cuda:LOCAL_RANK``).
        timeout: ``dist_timeout`` in seconds.
    """

    def __init__(self, device: str = "cpu", timeout: float = 60.0) -> None:
        super().__init__(device, timeout)
        self._in_spec: tuple[tuple[int, ...], torch.dtype] | None = None  # from rank - 1
        self._out_sent = False  # the spec of what this rank sends on has gone

    def attach(self, model: nn.Module, make_estimator: MakeEstimator) -> None:
        stages = split_stages(model, self.world_size)
        self.layers = stages[self.rank]
        self._module = nn.Sequential(*[m for _, m in self.layers]).to(self.device)
        self.counts = [trainable_count(nn.ModuleList(m for _, m in st))[0] for st in stages]
        self.offset = sum(self.counts[:self.rank])
        self.first, self.last = self.rank == 0, self.rank == self.world_size - 1
        self.est = self._est = make_estimator(self._module)
        if not isinstance(self.est, ForwardGradient | Backprop) or \
                self.est.name not in STAGE_METHODS:
            raise ConfigError(f"--distributed stages trains with {', '.join(STAGE_METHODS)}; "
                              f"got method {self.est.name!r} (use --distributed data for it)")
        self.stages = [f"stage {r}: layers {st[0][0]}..{st[-1][0]} "
                       f"({trainable_count(nn.ModuleList(m for _, m in st))[1]:,} parameters)"
                       for r, st in enumerate(stages)]

    def describe(self) -> str:
        return (f"stage-sharded {self.est.name} on {self.world_size} ranks "
                f"({self.backend})" + "".join(f"\n  {d}" for d in self.stages))

    # -- messages between neighbouring stages -------------------------------------------------
    def send_on(self, tensors: list[Tensor], label: str) -> None:
        """Activations (and tangents) to the next stage; the first time, their spec."""
        if not self._out_sent:
            self.send_object((tuple(tensors[0].shape[1:]), tensors[0].dtype), self.rank + 1, label)
            self._out_sent = True
        for t in tensors:
            self.send(t, self.rank + 1, label)

    def recv_from_previous(self, batch: int, k: int | None, label: str) -> list[Tensor]:
        """The activations of a batch of ``batch`` (and ``k`` tangents) from the previous
        stage."""
        if self._in_spec is None:
            self._in_spec = self.recv_object(self.rank - 1, label)
        features, dtype = self._in_spec
        shapes = [(batch, *features)] + ([] if k is None else [(k, batch, *features)])
        return [self.recv(torch.empty(s, dtype=dtype, device=self.device), self.rank - 1, label)
                for s in shapes]

    # -- one training step -------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One step on the global batch ``(x, y)``: stage 0 reads ``x``, the last stage
        ``y``; every rank gets the batch's stats."""
        forward = isinstance(self.est, ForwardGradient)
        stats = (self._forward_gradient_step if forward else self._backprop_step)(x, y)
        self.est.steps_done += 1
        return stats

    def _forward_gradient_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        est = self.est
        assert isinstance(est, ForwardGradient)
        k, label = est.directions, f"step {est.steps_done + 1}"
        sampler = est.sampler()  # the estimator's distribution and rank, this step's seed
        params = [p for _, p in est.trainable()]
        index = {id(p): i for i, p in enumerate(params)}
        in_grad: set[int] = set()

        def tangent(p: nn.Parameter) -> Tensor | Factored:  # as ForwardGradient, global indices
            i = index[id(p)]
            if sampler.is_factored(p.shape):
                return sampler.factors(self.offset + i, p, k)
            if k == 1:
                if p.grad is None or p.grad.shape != p.shape:
                    p.grad = torch.empty_like(p)
                in_grad.add(i)
                return sampler.dense(self.offset + i, p, 1, out=p.grad.unsqueeze(0))
            return sampler.dense(self.offset + i, p, k)

        if self.first:
            h, h_dot = x.to(self.device), None
        else:
            h, h_dot = self.recv_from_previous(len(x), k, f"activations and tangents, {label}")
        with torch.no_grad():
            h, h_dot = run_layers(self.layers, h, h_dot, tangent, k)
            if self.last:
                loss, d = loss_and_derivatives(est.loss_fn, h, h_dot, y.to(self.device), k)
                scalars = torch.cat([loss.reshape(1), d])  # (K + 1,)
            else:
                if h_dot is None:  # nothing before here is trained: the tangents are zero
                    h_dot = h.new_zeros((k, *h.shape))
                self.send_on([h, h_dot], f"activations and tangents, {label}")
                scalars = torch.empty(k + 1, dtype=h.dtype, device=self.device)
            self.broadcast(scalars, self.world_size - 1, f"broadcast of d, {label}")
            loss, d = scalars[0], scalars[1:]
            coeffs = est.coefficients(d)
            for i, p in enumerate(params):
                if i in in_grad:
                    assert p.grad is not None  # tangent() drew the direction into it
                    p.grad.mul_(coeffs[0])
                else:
                    set_grad(p, sampler.combine(self.offset + i, p, coeffs))
        return {"loss": loss.item(), "dir_deriv_rms": d.pow(2).mean().sqrt().item()}

    def _backprop_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        est = self.est
        label = f"step {est.steps_done + 1}"
        params = [p for _, p in est.trainable()]
        for p in params:
            p.grad = None
        if self.first:
            h_in = x.to(self.device)
        else:
            (h_in,) = self.recv_from_previous(len(x), None, f"activations, {label}")
            h_in.requires_grad_(True)
        with torch.enable_grad():
            out = self._module(h_in)
            if self.last:
                loss = est.loss_fn(out, y.to(self.device))
                loss.backward()
                loss = loss.detach().reshape(1)
            else:
                self.send_on([out.detach()], f"activations, {label}")
                # the gradient of out, and the loss, from the next stage
                grad_out = self.recv(torch.empty_like(out), self.rank + 1, f"gradient, {label}")
                loss = self.recv(out.new_empty(1), self.rank + 1, f"gradient, {label}")
                out.backward(grad_out)
        if not self.first:
            assert h_in.grad is not None  # the backward above reached the stage's input
            self.send(h_in.grad, self.rank - 1, f"gradient, {label}")
            self.send(loss.to(h_in.dtype), self.rank - 1, f"gradient, {label}")
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return {"loss": loss.item()}

    # -- the rest of the loop ----------------------------------------------------------------
    @torch.no_grad()
    def error_rate(self, x: Tensor, y: Tensor, batch_size: int) -> float:
        """Fraction misclassified, the batches flowing through the pipeline."""
        was_training = self._module.training
        self._module.eval()
        wrong = 0
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            label = f"evaluation, batch {i // batch_size}"
            h = xb.to(self.device) if self.first else \
                self.recv_from_previous(len(xb), None, label)[0]
            h = self._module(h)
            if self.last:
                wrong += int((h.argmax(-1) != y[i:i + batch_size].to(self.device)).sum().item())
            else:
                self.send_on([h], label)
        self._module.train(was_training)
        total = torch.tensor([wrong], dtype=torch.int64, device=self.device)
        self.broadcast(total, self.world_size - 1, "the error count")
        return int(total.item()) / max(1, len(x))

    def clip_grad(self, max_norm: float) -> None:
        """Clip by the norm of the whole model's gradient (one all-reduce of the per-tensor
        norms; the same formula as ``torch.nn.utils.clip_grad_norm_``)."""
        params = [p for _, p in self.est.trainable()]
        norms = torch.zeros(sum(self.counts), dtype=torch.float32, device=self.device)
        if params:
            norms[self.offset:self.offset + len(params)] = torch.stack(
                [torch.linalg.vector_norm(p.grad).float() for p in params])
        norms = self.all_reduce(norms, f"gradient norms, step {self.est.steps_done}")
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.linalg.vector_norm(norms))

    def end_epoch(self, epoch: int) -> None:
        """Nothing to check: each rank holds different parameters."""

    def model_state(self) -> dict[str, Tensor] | None:
        """The whole model's state dict on rank 0 (gathered), ``None`` elsewhere."""
        mine = {f"{name}.{key}": value.detach().cpu()
                for name, layer in self.layers for key, value in layer.state_dict().items()}
        parts = self.gather_object(mine, 0, "gathering the model")
        return None if parts is None else {k: v for part in parts for k, v in part.items()}

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The whole model's optimizer state on rank 0 (as a single process has it)."""
        state = opt.state_dict()
        state["state"] = {i: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
                          for i, s in state["state"].items()}
        parts = self.gather_object(state, 0, "gathering the optimizer state")
        return None if parts is None else merge_optimizer_states(parts, self.counts)

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(split_optimizer_state(state, self.offset,
                                                  self.counts[self.rank]))

