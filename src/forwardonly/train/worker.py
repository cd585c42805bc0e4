"""How one process takes part in a run: the :class:`Worker` that :func:`~.fit.fit` drives.

:func:`~.fit.fit` owns everything every way of training shares — the run directory, the data
order drawn from ``(seed, epoch)``, the optimizer and schedule, resume, checkpoints, metrics,
divergence checks. A worker owns what differs between them: which part of the model this
process holds, how one step's gradient estimate is formed, how an error rate is counted, and
how processes agree. :class:`LocalWorker` is the single-process worker; the workers of
``--distributed data`` and ``--distributed stages`` live in :mod:`forwardonly.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from ..estimators import Estimator

T = TypeVar("T")
MakeEstimator = Callable[[nn.Module], Estimator]


class Worker(Protocol):
    """One process of a run, as :func:`~.fit.fit` sees it.

    Lifecycle: ``start`` → ``share``/``attach`` → many ``step`` and ``error_rate`` →
    ``finish``. Every method is called on every process in the same order (collectives).
    """

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run directory, the checkpoints and the log."""

    def start(self, values: dict[str, Any]) -> None:
        """Join the run; ``values`` are the settings every process must share."""

    def finish(self, exc: BaseException | None) -> None:
        """Leave the run (``exc``: the error that ends it, if any)."""

    def share(self, fn: Callable[[], T], label: str) -> T:
        """Run ``fn`` on the writer and hand its result to every process; an error it raises
        is raised on every process."""

    def attach(self, model: nn.Module, make_estimator: MakeEstimator) -> None:
        """Take this process's part of ``model`` (already holding any resumed weights) and
        build its estimator with ``make_estimator(part)``."""

    @property
    def module(self) -> nn.Module:
        """The parameters this process trains (the optimizer is built over them)."""

    @property
    def estimator(self) -> Estimator:
        """The estimator of :attr:`module`."""

    def describe(self) -> str:
        """One line (or a few) for the log at the start of a run."""

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Fill ``.grad`` from the global mini-batch ``(x, y)``; its stats, equal everywhere."""

    def sgd_step(self, x: Tensor, y: Tensor, lr: float, weight_decay: float,
                 head_lr: float | None = None) -> dict[str, float]:
        """``θ ← θ − lr·g`` with no gradient buffer (``--optimizer sgd-inplace``); the
        model's ``head`` at ``head_lr`` when given."""

    def clip_grad(self, max_norm: float) -> None:
        """Clip the global norm of the gradient estimate."""

    def error_rate(self, x: Tensor, y: Tensor, batch_size: int) -> float:
        """Fraction of ``(x, y)`` whose top-scoring class is wrong."""

    def all_finite(self) -> bool:
        """Whether every parameter of every process is finite."""

    def end_epoch(self, epoch: int) -> None:
        """Checks at the end of an epoch (e.g. every rank holds the same parameters)."""

    def model_state(self) -> dict[str, Tensor] | None:
        """The whole model's ``state_dict`` on the writer (``None`` elsewhere)."""

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The whole optimizer's state in the single-process format, on the writer."""

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load this process's part of a single-process optimizer state."""


class LocalWorker:
    """The whole model in this process: ``fit``'s default worker."""

    is_writer = True

    def __init__(self) -> None:
        self._module: nn.Module | None = None
        self._estimator: Estimator | None = None

    def start(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exc: BaseException | None) -> None:
        pass

    def share(self, fn: Callable[[], T], label: str) -> T:
        return fn()

    def attach(self, model: nn.Module, make_estimator: MakeEstimator) -> None:
        self._module = model
        self._estimator = make_estimator(model)

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            raise RuntimeError("LocalWorker.attach() has not been called")
        return self._module

    @property
    def estimator(self) -> Estimator:
        if self._estimator is None:
            raise RuntimeError("LocalWorker.attach() has not been called")
        return self._estimator

    def describe(self) -> str:
        n = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        return f"{self.estimator.name} on one process, {n:,} trainable parameters"

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        return self.estimator.step(x, y)

    def sgd_step(self, x: Tensor, y: Tensor, lr: float, weight_decay: float,
                 head_lr: float | None = None) -> dict[str, float]:
        return self.estimator.sgd_step(x, y, lr=lr, weight_decay=weight_decay, head_lr=head_lr)

    def clip_grad(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def error_rate(self, x: Tensor, y: Tensor, batch_size: int) -> float:
        return error_rate(self.estimator, x, y, batch_size)

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.module.parameters())

    def end_epoch(self, epoch: int) -> None:
        pass

    def model_state(self) -> dict[str, Tensor] | None:
        return self.module.state_dict()

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        return opt.state_dict()

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(state)


@torch.no_grad()
def error_rate(est: Estimator, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Fraction of examples whose top-scoring class (``est.predict``) is wrong; batches are
    moved to the model's device (no copy when ``x`` and ``y`` are there already, as in
    :func:`~.fit.fit`). The count stays on the device until the end: one synchronization
    per call, not one per batch."""
    device = next(iter(est.model.parameters()), torch.empty(0)).device
    was_training = est.model.training
    est.model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        wrong += (est.predict(xb).argmax(-1) != yb).sum()
    est.model.train(was_training)
    return int(wrong.item()) / max(1, len(x))


#: The estimator methods :func:`speed_up` wraps: the training step (both forms) and the
#: evaluation forward.
STEP_METHODS = ("estimate", "estimate_inplace", "predict")


def speed_up(est: Estimator, *, compile: bool = False, precision: str = "float32",
             device: str | torch.device = "cpu") -> Estimator:
    """Make ``est``'s steps faster alike for every method: ``precision="bfloat16"`` runs them
    under ``torch.autocast`` (matrix products in bfloat16; autocast keeps losses, softmax and
    normalizations in float32, and every ``.grad`` is written in the parameter's float32), and
    ``compile=True`` passes them through ``torch.compile`` (operations it cannot capture —
    ``.item()``, generator set-up — split the graph and run eagerly; the result is the same
    computation). Wraps the instance's :data:`STEP_METHODS` only: the class, the model, its
    ``state_dict`` and checkpoints are untouched. Returns ``est``."""
    if not compile and precision == "float32":
        return est
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    device_type = torch.device(device).type
    for name in STEP_METHODS:
        fn = getattr(est, name)
        if precision == "bfloat16":
            fn = _autocast(fn, device_type, torch.bfloat16)
        if compile:
            fn = torch.compile(fn)
        setattr(est, name, fn)
    return est


def _autocast(fn: Callable[..., T], device_type: str, dtype: torch.dtype) -> Callable[..., T]:
    def run(*args: Any, **kwargs: Any) -> T:
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args, **kwargs)

    run.__name__ = getattr(fn, "__name__", "step")
    return run
