"""Zeroth order: directional derivatives from forward passes only (SPSA / MeZO).

Malladi et al. — *Fine-Tuning Language Models with Just Forward Passes* (MeZO, 2023,
arXiv 2305.17333). For each direction ``z_k`` (regenerated from a seed, never stored):

    d_k ≈ (L(θ + ε z_k) − L(θ − ε z_k)) / 2ε,        g = (1/K) Σ_k d_k z_k

The parameters are perturbed *in place* (``θ += εz``, ``θ −= 2εz``, ``θ += εz``), so a step
needs no copy of the parameters: the memory of inference plus one chunk of a direction
(each tensor's ``z`` is drawn and added ``CHUNK_ENTRIES`` entries at a time, bit for bit the
whole draw: :meth:`DirectionSampler.add_to`). The
restore is exact up to float rounding (about one ulp of θ per step), and bit for bit when
every ``θ ± εz`` is representable (e.g. ±1 entries, ε a power of two, θ on a coarser grid).

Each step draws the direction ``z`` three times (for ``+εz``, ``−2εz``, and the restore that
also adds ``c·z`` to the estimate): in place that is the point, no copy of ``z`` is held. When
the estimate goes into ``.grad`` (``step``), ``keep_directions="auto"`` keeps the current
direction's tensors between the three uses when they take at most ``KEEP_DIRECTIONS_MIB``
(one draw instead of three, at the memory of one more copy of the perturbed parameters).

Only parameters with ``requires_grad`` are perturbed (``--train-params`` freezes the rest):
the estimate is that of the gradient restricted to them. ``distribution="lowrank"`` perturbs
weight matrices along rank-``direction_rank`` directions (materialized from the factors, a
block of rows at a time).

``exact_head=True``: the model's linear readout ``model.head`` is not perturbed; it gets its
exact gradient from one clean forward at θ (``model.head(model.features(x))``, autograd
through the head alone — the gradient is local to it; Ren et al. 2023, arXiv 2210.03310, do
the same for their FG-W heads), and SPSA estimates the gradient of the other parameters. A
step costs 2K + 1 forward passes instead of 2K (for ``zo-sign`` still K + 1: its ``L(θ)``
pass gives the head's gradient). Why a clean forward rather than averaging the head's
gradients at ``θ ± εz`` (no extra pass): that average is the gradient at θ only up to
``O(ε²)``; the clean pass gives it exactly, and the reported loss is ``L(θ)`` itself. In
place (``sgd_step``), the head's gradient is computed at θ before any perturbation and
applied after the body's update; its buffer is the head's size.

The frozen prefix is paid for once per step (``reuse_prefix``, :mod:`.frozen_prefix`): the
modules that hold no perturbed parameter and run before the first one that does (with
``--train-params 'encoder.encoder.layer.5.*' 'head.*'`` on MiniLM: the embeddings and layers
0–4) compute the same outputs at θ, θ + εz and θ − εz. The step's first evaluation of the
batch records them and the next ones replay them: bit for bit the same result, for the memory
of those recorded outputs until the step ends (by default not with ``micro_batch``, whose
pieces would all keep theirs).

``zo-sign`` is the essay's literal pseudo-code: compare ``L(θ + εv)`` with ``L(θ)`` and step
towards ``+v`` if the loss went down, ``−v`` otherwise:
``g = (1/K) Σ_k sign(L(θ+εv_k) − L(θ)) v_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..autodiff import DirectionSampler, LossFn
from ..autodiff.directions import CHUNK_ENTRIES as _CHUNK_ENTRIES
from ..autodiff.directions import SEEDED_DISTRIBUTIONS, check_rank
from ..seeding import mix_seed
from .base import Estimator, ExactHead, check_micro_batch, register, split_batch
from .frozen_prefix import FrozenPrefix


@register("zo")
class ZerothOrder(Estimator):
    """Two-point zeroth-order (SPSA) gradient estimate with in-place, seeded perturbations.

    Arguments:
        model, loss_fn, seed: see :class:`Estimator`.
        directions: K, the number of directions averaged per step.
        distribution: ``"gaussian"``, ``"rademacher"``, ``"rank1"`` or ``"lowrank"``.
        direction_rank: r of the ``lowrank`` directions (a positive integer; accepted and
            unused by the other distributions).
        exact_head: train ``model.head`` (an ``nn.Linear``) with its exact gradient from
            ``model.features(x)`` at θ, and perturb the other parameters only.
        epsilon: the perturbation size ε.
        keep_directions: keep the current direction's tensors between its three uses
            (``True``), or draw them each time (``False``, MeZO's memory); ``"auto"`` keeps
            them in :meth:`step` when they take at most ``KEEP_DIRECTIONS_MIB`` MiB and
            redraws in the in-place :meth:`sgd_step`.
        micro_batch: evaluate each loss in pieces of at most this many examples
            (:func:`~forwardonly.estimators.base.split_batch`): the same estimate at the
            activation memory of one piece (``None``: the whole batch).
        reuse_prefix: run the frozen prefix — the modules that hold no perturbed parameter
            and run before the first module that owns one — once per step: the step's first
            evaluation of the batch records their outputs and the others replay them
            (:class:`~forwardonly.estimators.frozen_prefix.FrozenPrefix`; the same result bit
            for bit, and nothing to do when every parameter is perturbed). It costs the
            memory of the recorded outputs until the step ends, e.g. one ``(B, L, hidden)``
            hidden state per frozen layer of a transformer. ``"auto"`` (the default) reuses
            the prefix except with ``micro_batch``, whose pieces would all keep theirs: the
            prefix outputs of the whole batch, more than micro-batching means to hold;
            ``True`` reuses it with micro-batches too, ``False`` never.
    """

    #: ``keep_directions="auto"`` keeps a direction up to this size (MiB).
    KEEP_DIRECTIONS_MIB = 256
    #: A direction that is not kept is drawn and added in blocks of about this many entries.
    CHUNK_ENTRIES = _CHUNK_ENTRIES

    #: Combines this process's ``(loss, raw)`` — the mean loss and the K raw directional
    #: numbers of :meth:`directional` — with the other processes' before the estimate is
    #: formed (set by :mod:`forwardonly.distributed`); ``None`` in a single process.
    reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    #: Set during :meth:`estimate_inplace`: the update goes into θ, not into ``.grad``.
    _inplace_lr: float | None = None
    #: Whether a step evaluates ``L(θ)`` itself (``zo-sign`` compares against it).
    uses_base_loss: bool = False

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, directions: int = 1,
                 distribution: str = "gaussian", direction_rank: int = 4,
                 exact_head: bool = False, epsilon: float = 1e-3,
                 keep_directions: bool | str = "auto", micro_batch: int | None = None,
                 reuse_prefix: bool | str = "auto", seed: int = 0) -> None:
        super().__init__(model, loss_fn, seed=seed)
        self.micro_batch = check_micro_batch(micro_batch)
        if int(directions) < 1:
            raise ValueError(f"directions must be a positive integer, got {directions}")
        if keep_directions not in (True, False, "auto"):
            raise ValueError(f"keep_directions must be True, False or 'auto', got "
                             f"{keep_directions!r}")
        self.keep_directions = keep_directions
        if reuse_prefix not in (True, False, "auto"):
            raise ValueError(f"reuse_prefix must be True, False or 'auto', got "
                             f"{reuse_prefix!r}")
        self.reuse_prefix = reuse_prefix
        # the frozen prefix of the current step's batch, when reused
        self._prefix: FrozenPrefix | None = None
        # the current direction's tensors, when kept: (its sampler, {tensor index: z})
        self._kept: tuple[DirectionSampler, dict[int, Tensor]] | None = None
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
        self.direction_rank = check_rank(direction_rank)
        DirectionSampler(distribution, 0, valid=SEEDED_DISTRIBUTIONS)
        self.directions = int(directions)
        self.distribution = distribution
        self.epsilon = float(epsilon)
        self.exact_head = ExactHead(model, self.name) if exact_head else None
        self._base: float | None = None

    def _samplers(self) -> list[DirectionSampler]:
        seed = self.step_seed()
        return [DirectionSampler(self.distribution, mix_seed(seed, k), rank=self.direction_rank)
                for k in range(self.directions)]

    def perturbed(self) -> list[nn.Parameter]:
        """The parameters that get perturbed: the trainable ones, less an exact head's."""
        head = self.exact_head
        return [p for _, p in self.trainable() if head is None or not head.owns(p)]

    def keeps(self, params: list[nn.Parameter], inplace: bool) -> bool:
        """Whether a direction's tensors are kept between its uses (``keep_directions``)."""
        if self.keep_directions != "auto":
            return bool(self.keep_directions)
        size = sum(p.numel() * p.element_size() for p in params)
        return not inplace and size <= self.KEEP_DIRECTIONS_MIB * 2**20

    def reuses_prefix(self) -> bool:
        """Whether a step records and replays the frozen prefix (``reuse_prefix``)."""
        if self.reuse_prefix != "auto":
            return bool(self.reuse_prefix)
        return self.micro_batch is None

    def _forward(self, fn: Callable[[Tensor], Tensor], piece: int, x: Tensor) -> Tensor:
        """``fn(x)`` for piece ``piece`` of the batch, the frozen prefix recorded on the
        piece's first evaluation in this step and replayed on the next ones."""
        if self._prefix is None:
            return fn(x)
        with self._prefix.evaluation(piece):
            return fn(x)

    def _direction(self, sampler: DirectionSampler, i: int, p: Tensor) -> Tensor:
        """Tensor ``i``'s ``z`` under ``sampler``, kept from its first draw."""
        assert self._kept is not None
        if self._kept[0] is not sampler:  # a new direction: drop the previous one's
            self._kept = (sampler, {})
        kept = self._kept[1]
        if i not in kept:
            kept[i] = sampler.dense(i, p, 1)[0]
        return kept[i]

    @torch.no_grad()
    def _perturb(self, sampler: DirectionSampler, scale: float, grad_coeff: float | None = None
                 ) -> None:
        """``θ += scale·z`` and, with ``grad_coeff``, add ``grad_coeff·z`` to the estimate
        (same draw): into ``.grad``, or — in place (MeZO) — as ``θ −= lr·grad_coeff·z``."""
        if grad_coeff is not None and self._inplace_lr is not None:
            scale, grad_coeff = scale - self._inplace_lr * grad_coeff, None
        for i, p in enumerate(self.perturbed()):
            if self._kept is None:  # drawn again, a block of z at a time
                self._perturb_blockwise(sampler, i, p, scale, grad_coeff)
                continue
            z = self._direction(sampler, i, p)
            if scale != 0.0:
                p.add_(z, alpha=scale)
            if grad_coeff is not None:
                assert p.grad is not None  # zeroed for this step by the caller
                p.grad.add_(z, alpha=grad_coeff)

    def _perturb_blockwise(self, sampler: DirectionSampler, i: int, p: Tensor, scale: float,
                           grad_coeff: float | None) -> None:
        """``_perturb`` for tensor ``i`` with ``z`` drawn in blocks of ``CHUNK_ENTRIES``."""
        grad = None
        if grad_coeff is not None:
            assert p.grad is not None  # zeroed for this step by the caller
            grad = (p.grad, grad_coeff)
        if scale != 0.0:
            sampler.add_to(i, p, scale, self.CHUNK_ENTRIES, also=grad)
        elif grad is not None:
            sampler.add_to(i, grad[0], grad[1], self.CHUNK_ENTRIES)

    @torch.no_grad()
    def _loss(self, inputs: Tensor, targets: Tensor) -> float:
        # Every evaluation of a step sees the same random numbers (dropout masks); the
        # global RNG state is restored by ``estimate``.
        torch.random.default_generator.manual_seed(mix_seed(self.step_seed(), 0x5EED))
        pieces = split_batch(inputs, targets, self.micro_batch)
        return sum(w * self.loss_fn(self._forward(self.model, i, x), y).item()
                   for i, (x, y, w) in enumerate(pieces))

    @torch.no_grad()
    def _loss_at_theta(self, inputs: Tensor, targets: Tensor) -> float:
        """``L(θ)``; with an exact head, also the head's exact gradient into its ``.grad``."""
        head = self.exact_head
        if head is None:
            return self._loss(inputs, targets)
        torch.random.default_generator.manual_seed(mix_seed(self.step_seed(), 0x5EED))
        pieces = split_batch(inputs, targets, self.micro_batch)
        if len(pieces) > 1:
            head.zero_grad()
        return sum(w * head.gradient(self.loss_fn, self._forward(head.features, i, x), y,
                                     weight=None if len(pieces) == 1 else w)[0].item()
                   for i, (x, y, w) in enumerate(pieces))

    def directional(self, sampler: DirectionSampler, inputs: Tensor, targets: Tensor
                    ) -> tuple[float, float]:
        """One direction: ``(loss estimate, raw number)``, the raw number being linear in the
        loss (so that it can be averaged over processes); θ ends at ``θ + ε z`` and the
        caller's final ``_perturb`` restores it."""
        eps = self.epsilon
        self._perturb(sampler, +eps)
        plus = self._loss(inputs, targets)
        self._perturb(sampler, -2 * eps)
        minus = self._loss(inputs, targets)
        return (plus + minus) / 2, (plus - minus) / (2 * eps)

    def coefficient(self, raw: float) -> float:
        """Weight of ``z`` in ``g`` before the 1/K, from :meth:`directional`'s raw number."""
        return raw

    def restore_shift(self) -> float:
        """Where ``directional`` leaves θ, in units of ε·z (restored by ``-shift``)."""
        return -1.0

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        rng = torch.get_rng_state()
        perturbed = self.perturbed()
        if self.keeps(perturbed, inplace=self._inplace_lr is not None):
            self._kept = (DirectionSampler(self.distribution, 0), {})
        if self.reuses_prefix():
            self._prefix = FrozenPrefix(self.model, perturbed)
        try:
            return self._estimate(inputs, targets)
        finally:
            self._kept = None
            self._prefix = None  # the recorded prefix goes with the step
            torch.set_rng_state(rng)

    def estimate_inplace(self, inputs: Tensor, targets: Tensor, lr: float) -> dict[str, float]:
        self._inplace_lr = lr
        try:
            return self.estimate(inputs, targets)
        finally:
            self._inplace_lr = None

    def _estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        for p in self.perturbed():
            if self._inplace_lr is not None:
                p.grad = None
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        if self.exact_head is not None and self.reduce is not None:
            raise NotImplementedError(
                "exact_head does not yet combine the head's gradient across processes; run "
                "it in a single process, or drop exact_head")
        # θ is untouched here: the head's exact gradient (a head-sized .grad, which sgd_step
        # applies after the body's in-place update) and zo-sign's L(θ)
        self._base = self._loss_at_theta(inputs, targets) \
            if self.exact_head is not None or self.uses_base_loss else None
        if self.reduce is not None or (self._inplace_lr is not None and self.directions > 1):
            # every direction evaluated at the same θ before any update enters θ
            return self._estimate_reduced(inputs, targets)
        losses, coeffs = [], []
        for sampler in self._samplers():
            loss, raw = self.directional(sampler, inputs, targets)
            c = self.coefficient(raw)
            # restore θ and accumulate c/K · z into .grad from the same draw
            self._perturb(sampler, -self.restore_shift() * self.epsilon, c / self.directions)
            losses.append(loss)
            coeffs.append(c)
        d = torch.tensor(coeffs)
        mean = sum(losses) / len(losses) if self._base is None or self.exact_head is None \
            else self._base
        return {"loss": mean, "dir_deriv_rms": d.pow(2).mean().sqrt().item()}

    def _estimate_reduced(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        """As ``_estimate``, but the K raw numbers of all processes are combined (one
        ``reduce`` call) before any ``z`` enters ``.grad``: θ is restored after each
        direction, and the directions are drawn once more to form ``g``."""
        samplers = self._samplers()
        losses, raws = [], []
        for sampler in samplers:
            loss, raw = self.directional(sampler, inputs, targets)
            self._perturb(sampler, -self.restore_shift() * self.epsilon)
            losses.append(loss)
            raws.append(raw)
        mean_loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        raw_all = torch.tensor(raws, dtype=torch.float64)
        if self.reduce is not None:
            mean_loss, raw_all = self.reduce(mean_loss, raw_all)
        coeffs = [self.coefficient(r) for r in raw_all.tolist()]
        for sampler, c in zip(samplers, coeffs, strict=True):
            self._perturb(sampler, 0.0, c / self.directions)
        d = torch.tensor(coeffs)
        mean = mean_loss.item() if self._base is None or self.exact_head is None \
            else self._base
        return {"loss": mean, "dir_deriv_rms": d.pow(2).mean().sqrt().item()}


@register("zo-sign")
class ZerothOrderSign(ZerothOrder):
    """The essay's pseudo-code: ``g = (1/K) Σ_k sign(L(θ + εv_k) − L(θ)) v_k``."""

    uses_base_loss = True

    def directional(self, sampler: DirectionSampler, inputs: Tensor, targets: Tensor
                    ) -> tuple[float, float]:
        assert self._base is not None
        self._perturb(sampler, +self.epsilon)
        return self._base, self._loss(inputs, targets) - self._base

    def coefficient(self, raw: float) -> float:
        return math.copysign(1.0, raw)

    def restore_shift(self) -> float:
        return 1.0
