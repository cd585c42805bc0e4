"""The one estimator interface, and the registry that names estimators.

An estimator owns a model and a loss. ``step(inputs, targets)`` computes a gradient
estimate *somehow* (backprop, forward-mode AD, two forward passes, local losses ...) and
writes it into ``param.grad`` of every trainable parameter, so any ``torch.optim``
optimizer, scheduler or gradient clipping works unchanged::

    est = forwardonly.ForwardGradient(model, loss_fn, directions=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in loader:
        opt.zero_grad()
        stats = est.step(x, y)   # {"loss": ..., plus the estimator's own metrics}
        opt.step()

Randomness is explicit: every stochastic estimator derives its per-step seed from
``(seed, step index)``, so any step can be regenerated (after a resume, on another rank).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..autodiff import LossFn
from ..seeding import mix_seed

__all__ = ["ESTIMATORS", "Estimator", "ExactHead", "LossFn", "make_estimator", "mix_seed",
           "register", "set_grad"]

ESTIMATORS: dict[str, type[Estimator]] = {}

E = TypeVar("E", bound="type[Estimator]")


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an estimator selectable by ``name`` (CLI ``--method``)."""

    def wrap(cls: E) -> E:
        if name in ESTIMATORS:
            raise ValueError(f"estimator name {name!r} is already registered")
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return wrap


def make_estimator(name: str, model: nn.Module, loss_fn: LossFn, **options: Any) -> Estimator:
    """Build the estimator registered as ``name`` (e.g. ``"fg-w"``)."""
    if name not in ESTIMATORS:
        valid = ", ".join(repr(n) for n in sorted(ESTIMATORS))
        raise ValueError(f"method must be one of {valid}, got {name!r}")
    return ESTIMATORS[name](model, loss_fn, **options)


class Estimator:
    """Base class. Subclasses implement :meth:`estimate`.

    Arguments:
        model: any ``nn.Module`` mapping a batch of inputs to outputs.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch).
        seed: base seed of the estimator's own randomness (directions, perturbations).
    """

    name: ClassVar[str] = "base"

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.seed = int(seed)
        self.steps_done = 0

    # -- the interface -------------------------------------------------------------
    def step(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        """Fill ``.grad`` of every trainable parameter; return ``{"loss": ..., ...}``."""
        self._check_batch(inputs, targets)
        stats = self.estimate(inputs, targets)
        self.steps_done += 1
        return stats

    def sgd_step(self, inputs: Tensor, targets: Tensor, lr: float,
                 weight_decay: float = 0.0, head_lr: float | None = None) -> dict[str, float]:
        """One plain SGD step ``θ ← (1 − lr·wd)(θ − lr·g)`` applied in place.

        Estimators that can (``fg-w``, ``zo``) never materialize ``g``: they redraw each
        tensor's directions and add ``−lr·Σ_k c_k v_k`` straight into the parameter
        (MeZO-style), so a step needs about the memory of inference. Others fall back to
        ``step()`` and then free ``.grad``. ``head_lr``: the learning rate of the model's
        ``head`` (e.g. trained with its exact gradient, ``exact_head``), if not ``lr``.
        """
        self._check_batch(inputs, targets)
        stats = self.estimate_inplace(inputs, targets, lr)
        head = getattr(self.model, "head", None)
        in_head = {id(p) for p in head.parameters()} \
            if head_lr is not None and isinstance(head, nn.Module) else set()
        with torch.no_grad():
            for _, p in self.trainable():
                rate = head_lr if id(p) in in_head else lr
                assert rate is not None
                if p.grad is not None:  # the fallback: apply and free the estimate
                    p.add_(p.grad, alpha=-rate)
                    p.grad = None
                if weight_decay:
                    p.mul_(1.0 - rate * weight_decay)
        self.steps_done += 1
        return stats

    def estimate_inplace(self, inputs: Tensor, targets: Tensor, lr: float) -> dict[str, float]:
        """Apply ``θ −= lr·g`` without a gradient buffer where possible; the default fills
        ``.grad`` (which :meth:`sgd_step` then applies and frees)."""
        return self.estimate(inputs, targets)

    def _check_batch(self, inputs: Tensor, targets: Tensor) -> None:
        if inputs.shape[0] == 0:
            raise ValueError("step() got an empty batch (0 examples); check the data loader")
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs and targets disagree on the batch size: "
                f"{inputs.shape[0]} inputs vs {targets.shape[0]} targets"
            )

    def estimate(self, inputs: Tensor, targets: Tensor) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, inputs: Tensor) -> Tensor:
        """Scores ``(B, classes)`` used for evaluation; plain ``model(inputs)`` by default."""
        scores: Tensor = self.model(inputs)
        return scores

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint must keep so a resumed run draws the same directions."""
        return {"seed": self.seed, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.steps_done = int(state["steps_done"])

    # -- helpers for subclasses ----------------------------------------------------
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def step_seed(self) -> int:
        """Seed of the current step: a fixed mix of (seed, step index), 63-bit."""
        return mix_seed(self.seed, self.steps_done)


def check_micro_batch(micro_batch: int | None) -> int | None:
    """``micro_batch`` if it is ``None`` or a positive integer, else a ``ValueError``."""
    if micro_batch is None:
        return None
    if isinstance(micro_batch, bool) or int(micro_batch) != micro_batch or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive integer (examples per forward "
                         f"pass) or None, got {micro_batch!r}")
    return int(micro_batch)


def split_batch(inputs: Tensor, targets: Tensor, micro_batch: int | None
                ) -> list[tuple[Tensor, Tensor, float]]:
    """``(x_i, y_i, n_i / B)``: the batch in pieces of at most ``micro_batch`` examples (one
    piece when ``None``). A mean loss over the batch is ``Σ (n_i / B) L_i``, and so is each
    of its directional derivatives: evaluating a step piece by piece (the same directions for
    every piece) gives the same estimate at the activation memory of one piece."""
    b = inputs.shape[0]
    if micro_batch is None or micro_batch >= b:
        return [(inputs, targets, 1.0)]
    return [(inputs[i:i + micro_batch], targets[i:i + micro_batch],
             min(micro_batch, b - i) / b) for i in range(0, b, micro_batch)]


def set_grad(param: Tensor, value: Tensor) -> None:
    """Write ``value`` into ``param.grad`` (reusing the buffer when there is one)."""
    if param.grad is None:
        param.grad = value.detach().to(param.dtype).clone()
    else:
        param.grad.copy_(value)


class ExactHead:
    """A model's linear readout trained with its exact gradient, for ``exact_head=True``.

    The readout's gradient is local: ``∂L/∂W_head`` needs only the features ``h`` the head
    reads (``model.features(x)``), so autograd through the head alone gives it exactly, with
    no backward pass into the rest of the model (Ren et al. 2023, arXiv 2210.03310, train
    their FG-W heads the same way). The model must satisfy ``model(x) == model.head(
    model.features(x))``.

    Arguments:
        model: a module with a ``head`` (``nn.Linear``) and a ``features(x)`` method.
        method: the estimator's name, for the error message.
    """

    def __init__(self, model: nn.Module, method: str) -> None:
        head, features = getattr(model, "head", None), getattr(model, "features", None)
        if not isinstance(head, nn.Linear) or not callable(features):
            raise ValueError(
                f"exact_head needs a model with a linear readout `head` (an nn.Linear) and a "
                f"`features(x)` method returning the head's input; {type(model).__name__} "
                f"has {'no head' if head is None else 'a head of type ' + type(head).__name__}"
                f"{'' if callable(features) else ' and no features method'}. Use a model "
                f"built with a head, or drop exact_head ({method})"
            )
        self.head = head
        self.features: Callable[[Tensor], Tensor] = features
        self._ids = {id(p) for p in head.parameters()}

    def owns(self, param: Tensor) -> bool:
        """Whether ``param`` belongs to the head (and so gets no random direction)."""
        return id(param) in self._ids

    def gradient(self, loss_fn: LossFn, feats: Tensor, targets: Tensor, *,
                 wrt_features: bool = False, weight: float | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        """The loss ``loss_fn(head(feats), targets)``; writes the head's exact gradient into
        the ``.grad`` of its trainable parameters.

        Arguments:
            feats: ``(B, ..., p)`` the head's input (detached here: nothing flows back).
            wrt_features: also return ``∂L/∂feats`` (same shape), from the same backward.
            weight: a piece of a batch (:func:`split_batch`): add ``weight ·`` the gradient
                to ``.grad`` instead of writing it (the caller zeroes it first).

        Returns:
            ``(loss, ∂L/∂feats or None)``, both detached.
        """
        params = [p for p in self.head.parameters() if p.requires_grad]
        with torch.enable_grad():
            h = feats.detach().requires_grad_(wrt_features)
            loss = loss_fn(self.head(h), targets)
            wrt = [*params, h] if wrt_features else params
            grads = torch.autograd.grad(loss, wrt) if wrt else ()
        for p, g in zip(params, grads, strict=False):
            if weight is None:
                set_grad(p, g)
            else:
                assert p.grad is not None  # zeroed by the caller
                p.grad.add_(g, alpha=weight)
        return loss.detach(), (grads[-1] if wrt_features else None)

    def zero_grad(self) -> None:
        """Zeroed ``.grad`` buffers for the head's trainable parameters."""
        for p in self.head.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
