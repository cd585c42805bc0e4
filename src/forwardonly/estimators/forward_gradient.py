"""Forward gradient with weight perturbation (FG-W), and the essay's sign-only variant.

Baydin, Pearlmutter, Syme, Wood, Torr — *Gradients without Backpropagation* (2022,
arXiv 2202.08587). Draw directions ``v_k`` in parameter space with ``E[v vᵀ] = I``; one
forward-mode pass gives the exact directional derivatives ``d_k = ∇L · v_k``; then

    g = (1/K) Σ_k d_k v_k,            E[g] = ∇L  (unbiased)

and for Gaussian ``v``: ``E‖g‖² = (n + 2)‖∇L‖²`` at K = 1 — the variance grows with the
number of parameters ``n`` (the curse of dimensionality).

``fg-sign`` is the essay's naive variant: ``g = (1/K) Σ_k sign(d_k) v_k`` — the optimizer's
step moves along ``−sign(d)·v``, a descent direction whenever ``d ≠ 0``, but not unbiased.

Directions are drawn per parameter tensor from ``(seed, step, tensor index)`` when the layer
runs. At K = 1 a tensor's direction is drawn straight into its ``.grad`` and scaled there. At
K ≥ 2 the K directions of the step (and, outside ``sgd_step``, the factors of
``rank1``/``lowrank`` weight directions at any K: a few vectors) are kept until ``g`` is
formed when they fit
(``keep_directions="auto"``: at most ``KEEP_DIRECTIONS_MIB`` in all, and not in the in-place
``sgd_step``, whose point is the memory of inference), else drawn again to form ``g`` —
the same directions either way, so the choice changes speed and memory only. Only parameters with
``requires_grad`` get a direction (``--train-params`` freezes the rest): the estimate is
unbiased for the gradient restricted to that subspace, and frozen parameters get no ``.grad``.
``distribution="lowrank"`` draws rank-``direction_rank`` directions for weight matrices;
``distribution="gaussian-table"`` reads Gaussian directions as views of a per-tensor noise
table drawn once (:mod:`forwardonly.autodiff.noise_table`): no random numbers per step, at
the memory of ``(table_factor + 1) · K`` times the perturbed parameters.

In place (``sgd_step``, K = 1) a model other than an ``nn.Sequential`` is streamed
(:func:`~forwardonly.autodiff.streamed_jvp`): a module's parameter tangents exist only while
it runs, an embedding's only for the rows the batch looks up; an ``nn.Sequential`` runs layer
by layer, and a large weight matrix's direction is drawn block by block of rows inside its
layer's ``x Vᵀ`` (:class:`~forwardonly.autodiff.directions.Streamed`). The update
``θ −= lr·c·v`` redraws ``v`` chunk by chunk: the memory of inference plus the activations'
tangents.

``exact_head=True`` ("heads exact", as Ren et al. 2023 train their FG-W heads, arXiv
2210.03310): the model's linear readout ``model.head`` gets its exact gradient — local, it
needs only the features ``h = model.features(x)`` — and the directions perturb only the
other parameters. The JVP pass runs through ``features`` and its primal output is ``h`` at
θ; one autograd pass through the head alone gives both the head's gradient and ``∂L/∂h``,
and the body's directional derivatives are ``d_k = ∂L/∂h · ḣ_k`` (the chain rule, exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..autodiff import (
    DirectionSampler,
    ForwardModeError,
    LossFn,
    NoiseTable,
    directional_derivatives,
    sequential_layers,
    streamed_directional_derivative,
    streamed_jvp,
)
from ..autodiff.directions import CHUNK_ENTRIES, Factored, Streamed, check_rank
from ..autodiff.forward_mode import RowsFn
from ..autodiff.noise_table import TABLE_FACTOR
from ..autodiff.rules import TangentFn, batched_jvp, dense, failure_message
from .base import (
    Estimator,
    ExactHead,
    check_micro_batch,
    register,
    set_grad,
    split_batch,
)


@register("fg-w")
class ForwardGradient(Estimator):
    """Forward gradient, weight perturbation.

    Arguments:
        model, loss_fn, seed: see :class:`Estimator`.
        directions: K, the number of directions averaged per step (one batched pass).
        distribution: ``"gaussian"`` (Baydin et al.), ``"rademacher"``, ``"rank1"`` or
            ``"lowrank"`` or ``"gaussian-table"`` (see :mod:`forwardonly.autodiff.directions`).
        direction_rank: r of the ``lowrank`` directions, ``V = (1/√r) Σ_i b_i a_iᵀ`` per weight
            matrix (a positive integer; accepted and unused by the other distributions).
        table_factor: entries of a ``gaussian-table`` tensor's table per entry of its K
            directions (a positive integer; accepted and unused by the other distributions).
        exact_head: train ``model.head`` (an ``nn.Linear``) with its exact gradient from
            ``model.features(x)``, and draw directions for the other parameters only.
        keep_directions: keep the step's directions from the forward pass until ``g`` is
            formed (``True``), or draw them a second time (``False``: the memory of one
            layer's directions at a time instead of all of them); ``"auto"`` keeps them in
            :meth:`step` at K ≥ 2 when they take at most ``KEEP_DIRECTIONS_MIB`` MiB, and
            redraws in :meth:`sgd_step`. (At K = 1, :meth:`step` draws each direction into
            ``.grad``: nothing is drawn twice.)
        micro_batch: evaluate a batch in pieces of at most this many examples, the same
            directions for each (:func:`~forwardonly.estimators.base.split_batch`): the same
            estimate at the activation memory of one piece (``None``: the whole batch).
    """

    #: ``keep_directions="auto"`` keeps a step's directions up to this size (MiB).
    KEEP_DIRECTIONS_MIB = 256

    #: Combines this process's ``(loss, d)`` with the other processes' before the estimate is
    #: formed — set by :mod:`forwardonly.distributed` (data parallelism: one all-gather of
    #: the K + 1 numbers); ``None`` in a single process.
    reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, directions: int = 1,
                 distribution: str = "gaussian", direction_rank: int = 4,
                 table_factor: int = TABLE_FACTOR, exact_head: bool = False,
                 keep_directions: bool | str = "auto",
                 micro_batch: int | None = None, seed: int = 0) -> None:
        super().__init__(model, loss_fn, seed=seed)
        self.micro_batch = check_micro_batch(micro_batch)
        if int(directions) < 1:
            raise ValueError(f"directions must be a positive integer, got {directions}")
        if keep_directions not in (True, False, "auto"):
            raise ValueError(f"keep_directions must be True, False or 'auto', got "
                             f"{keep_directions!r}")
        self.keep_directions = keep_directions
        self.direction_rank = check_rank(direction_rank)
        DirectionSampler(distribution, 0)  # validates the name
        self.directions = int(directions)
        self.distribution = distribution
        # tables are made on first use; the object validates table_factor
        self._noise_table = NoiseTable(self.seed, table_factor) \
            if distribution == "gaussian-table" else None
        self.exact_head = ExactHead(model, self.name) if exact_head else None

    def sampler(self, step_seed: int | None = None) -> DirectionSampler:
        """The directions of a step (by default the current one): distribution and rank."""
        seed = self.step_seed() if step_seed is None else step_seed
        return DirectionSampler(self.distribution, seed, rank=self.direction_rank,
                                table=self.noise_table())

    def noise_table(self) -> NoiseTable | None:
        """The tables of ``gaussian-table`` directions (``None`` for the other distributions),
        drawn from the estimator's seed (again if a restored state changed it)."""
        table = self._noise_table
        if table is not None and table.seed != self.seed:
            table = self._noise_table = NoiseTable(self.seed, table.factor)
        return table

    def perturbed(self) -> list[nn.Parameter]:
        """The parameters that get directions: the trainable ones, less an exact head's."""
        head = self.exact_head
        return [p for _, p in self.trainable() if head is None or not head.owns(p)]

    def keeps(self, params: list[nn.Parameter], inplace: bool) -> bool:
        """Whether this step keeps its K directions (see ``keep_directions``)."""
        if self.keep_directions != "auto":
            return bool(self.keep_directions)
        if inplace or self.directions == 1:  # K = 1 in .grad needs no keeping
            return False
        rank = self.direction_rank if self.distribution == "lowrank" else 1
        size = 0  # bytes of the K directions: dense, or the factors of weight matrices
        for p in params:
            factored = self.distribution in ("rank1", "lowrank") and p.dim() >= 2
            n = rank * (p.shape[0] + math.prod(p.shape[1:])) if factored else p.numel()
            size += self.directions * n * p.element_size()
        return size <= self.KEEP_DIRECTIONS_MIB * 2**20

    def coefficients(self, d: Tensor) -> Tensor:
        """Weights of the K directions in the estimate: ``d_k / K``."""
        return d / self.directions

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        return self._step(inputs, targets, lr=None)

    def estimate_inplace(self, inputs: Tensor, targets: Tensor, lr: float) -> dict[str, float]:
        return self._step(inputs, targets, lr=lr)

    def _step(self, inputs: Tensor, targets: Tensor, lr: float | None) -> dict[str, float]:
        """``lr=None``: write ``g`` into ``.grad``; else ``θ −= lr·g`` with no ``g`` buffer."""
        k = self.directions
        sampler = self.sampler()
        params = self.perturbed()
        index = {id(p): i for i, p in enumerate(params)}
        in_grad: set[int] = set()  # tensors whose (single) direction was drawn into .grad
        kept: dict[int, Tensor | Factored] = {}  # the K directions, when the step keeps them
        keep = self.keeps(params, inplace=lr is not None)
        # in place at K = 1 (MeZO's memory): tangents drawn module by module, the embeddings'
        # only for the rows a batch uses (nn.Sequential models are streamed layer by layer)
        rows: RowsFn | None = None
        if lr is not None and k == 1 and sequential_layers(self.model) is None:
            def rows(p: Tensor, ids: Tensor) -> Tensor:
                return sampler.rows(index[id(p)], p, ids)

        def tangent(p: nn.Parameter) -> Tensor | Factored | Streamed:
            i = index[id(p)]
            if i in kept:  # a later piece of the batch
                return kept[i]
            if sampler.is_factored(p.shape):
                v: Tensor | Factored = sampler.factors(i, p, k)
                if lr is None and self.keep_directions is not False:  # a few vectors: kept
                    kept[i] = v
                    return v
            elif sampler.reads_table:  # a view of the table: kept at no cost, never redrawn
                v = sampler.dense(i, p, k)
                if lr is None or k > 1:  # (in place at K = 1, add_to reads the same view)
                    kept[i] = v
                return v
            elif lr is not None and k == 1 and p.dim() == 2 and p.numel() > CHUNK_ENTRIES:
                return Streamed(sampler, i, p)  # in place, layer by layer: block by block
            elif k == 1 and lr is None:  # straight into .grad: no second buffer, no redraw
                if p.grad is None or p.grad.shape != p.shape or not p.grad.is_contiguous():
                    p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
                in_grad.add(i)
                return sampler.dense(i, p, 1, out=p.grad.unsqueeze(0))
            else:
                v = sampler.dense(i, p, k)
            if keep:
                kept[i] = v
            return v

        def derivatives(x: Tensor, y: Tensor, weight: float | None) -> tuple[Tensor, Tensor]:
            if self.exact_head is None and rows is not None:
                return streamed_directional_derivative(self.model, self.loss_fn, x, y,
                                                       tangent, rows)
            if self.exact_head is None:
                return directional_derivatives(self.model, self.loss_fn, x, y, tangent, k)
            return self._head_step(x, y, params, tangent, k, rows, weight)

        if self.exact_head is not None and self.reduce is not None:
            raise NotImplementedError(
                "exact_head does not yet combine the head's gradient across processes; "
                "run it in a single process, or drop exact_head")
        pieces = split_batch(inputs, targets, self.micro_batch)
        if len(pieces) == 1:
            loss, d = derivatives(inputs, targets, None)
        else:  # the same directions for every piece; losses and derivatives weighted n_i/B
            if self.exact_head is not None:
                self.exact_head.zero_grad()
            parts = [(w, *derivatives(x, y, w)) for x, y, w in pieces]
            loss = torch.stack([w * part_loss for w, part_loss, _ in parts]).sum(0)
            d = torch.stack([w * part_d for w, _, part_d in parts]).sum(0)
        if self.reduce is not None:
            loss, d = self.reduce(loss, d)
        coeffs = self.coefficients(d)
        with torch.no_grad():
            for i, p in enumerate(params):
                drawn = kept.pop(i, None)
                if lr is not None and k == 1 and drawn is None:  # chunk by chunk
                    p.grad = None
                    sampler.add_to(i, p, -lr * float(coeffs[0]))
                elif lr is not None:
                    p.grad = None
                    p.add_(sampler.combine(i, p, coeffs, drawn), alpha=-lr)
                elif i in in_grad:
                    assert p.grad is not None  # the direction was drawn into it
                    p.grad.mul_(coeffs[0])
                elif p.grad is not None and p.grad.shape == p.shape:
                    sampler.combine(i, p, coeffs, drawn, out=p.grad)
                else:
                    set_grad(p, sampler.combine(i, p, coeffs, drawn))
        return {"loss": loss.item(), "dir_deriv_rms": d.pow(2).mean().sqrt().item()}

    def _head_step(self, inputs: Tensor, targets: Tensor, body: list[nn.Parameter],
                   tangent: TangentFn, k: int, rows: RowsFn | None = None,
                   weight: float | None = None) -> tuple[Tensor, Tensor]:
        """Exact head: ``(loss, d)`` with ``d_k = ∂L/∂h · ḣ_k``; the head's ``.grad`` written.
        With ``rows`` (K = 1), the features' tangent is streamed (:func:`streamed_jvp`)."""
        assert self.exact_head is not None
        features = self.exact_head.features
        h_dot: Tensor | None
        if rows is not None and body:
            h, h_dot = streamed_jvp(self.model, lambda: features(inputs), tangent, rows, body)
            h_dot = h_dot.unsqueeze(0)
        else:
            h, h_dot = features_jvp(self.model, features, body, inputs, tangent, k)
        loss, dl_dh = self.exact_head.gradient(self.loss_fn, h, targets, wrt_features=True,
                                               weight=weight)
        assert dl_dh is not None
        if h_dot is None:  # no body parameter is trainable: only the head learns
            return loss, torch.zeros(k, dtype=h.dtype, device=h.device)
        return loss, h_dot.flatten(1) @ dl_dh.flatten()  # (K, B·p) @ (B·p,) -> (K,)


class _Call(nn.Module):
    """``fn(x)`` as a module that owns ``model``, so ``functional_call`` can swap its tensors."""

    def __init__(self, model: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def features_jvp(model: nn.Module, features: Callable[[Tensor], Tensor],
                 body: list[nn.Parameter], inputs: Tensor, tangent: TangentFn, k: int
                 ) -> tuple[Tensor, Tensor | None]:
    """``h = features(inputs)`` and its K tangents ``(K, *h.shape)`` along the directions of
    the ``body`` parameters (the others held fixed), by ``torch.func.jvp`` over the model's
    tensors (factored directions are materialized, one tensor each); ``None`` when ``body``
    is empty."""
    with torch.no_grad():
        if not body:
            return features(inputs), None
        ids = {id(p) for p in body}
        named = dict(model.named_parameters())
        moving = {n: p for n, p in named.items() if id(p) in ids}
        fixed: dict[str, Tensor] = {f"model.{n}": p for n, p in named.items()
                                    if n not in moving}
        fixed.update({f"model.{n}": b for n, b in model.named_buffers()})
        primals = {f"model.{n}": p.detach() for n, p in moving.items()}
        tangents = {f"model.{n}": dense(tangent(p)) for n, p in moving.items()}
        wrapper = _Call(model, features)

        def f(params: dict[str, Tensor]) -> Tensor:
            out: Tensor = functional_call(wrapper, {**fixed, **params}, (inputs,))
            return out

        try:
            return batched_jvp(f, primals, tangents, k)
        except (RuntimeError, NotImplementedError) as exc:
            where = f"'features' ({type(model).__name__})"
            raise ForwardModeError(failure_message(where, exc)) from exc


@register("fg-sign")
class ForwardGradientSign(ForwardGradient):
    """The essay's naive forward gradient: ``g = (1/K) Σ_k sign(∇L·v_k) v_k``."""

    def coefficients(self, d: Tensor) -> Tensor:
        return torch.sign(d) / self.directions
