"""Replaying a model's frozen prefix between evaluations of the same batch.

A zeroth-order step (:class:`~forwardonly.estimators.ZerothOrder`) evaluates the loss of one
batch several times — at ``θ + εz`` and ``θ − εz`` for each direction, and at ``θ`` for an
exact head — and only the *perturbed* parameters differ between these evaluations. Every
module that holds none of them and runs before the first module that owns one computes the
same output each time: with only the last encoder layer of a six-layer BERT perturbed (and
its head trained exactly), the embeddings and layers 0–4, five sixths of the forward pass.
:class:`FrozenPrefix` runs this *frozen prefix* once per batch: the first evaluation records
the outputs of its modules, the following ones return them instead of running the modules.

**What is recorded.** The candidates are the *maximal frozen modules*: the modules holding no
perturbed parameter whose parent holds one (a frozen module's children are covered by it and
get no entry of their own), less those that hold no parameter or buffer at all — activations,
dropouts, reshapes: cheap to run again, and without them a model whose every parameter is
perturbed has no candidate, so nothing is done. During the first evaluation of a piece of the
batch, each candidate's ``forward`` is wrapped, and a call is recorded — its arguments and its
output, by reference — when

- it ended before any module owning a perturbed parameter started;
- it is a function of its arguments alone: no autograd graph is being built (``no_grad``), no
  dropout module inside it is active (training mode with ``p > 0``), the call drew nothing from
  the global random generators and modified neither its arguments nor its own parameters and
  buffers in place (BatchNorm's running statistics in training mode).

A candidate's calls are numbered in order (a module that runs twice per forward has two
entries; a call nested in another candidate's call is part of that call). The whole recording
is dropped if a perturbed parameter's module never ran during it: the parameter was read by
another module's code, so where the prefix ends cannot be told.

**Replay.** A later evaluation of the same piece wraps the same modules; the ``i``-th call of a
module returns the output recorded for its ``i``-th call when its arguments equal the recorded
ones — the same structure and non-tensor values, tensors of the same shape, strides, dtype,
device and values (the very tensor object, e.g. the output the previous module replayed,
needs no look) — and no recorded tensor has been modified in place since; otherwise the module
runs. A replayed output is thus bit for bit the one the module would compute, and the random
numbers drawn after it are unchanged, as the replayed calls drew none.

**Cost.** The recorded outputs (and arguments, mostly the same tensors) stay alive until the
recording is dropped at the end of the step: for a BERT-like encoder with only its last layer
perturbed, one ``(B, L, hidden)`` hidden state per frozen layer and the embeddings' output.
With micro-batches there is one recording per piece, all held at once: the prefix outputs of
the whole batch. A replayed call compares its tensor arguments that are new objects (the
attention mask of a transformer layer) with the recorded ones, small against running the
module. When nothing is recorded (the first module run owns a perturbed parameter), the later
evaluations run the model untouched.

Assumed: a module computes from its arguments, its own parameters and buffers and the global
random generators only. A module that reads another module's parameters through a plain
attribute, or draws from its own ``torch.Generator``, would be replayed wrongly.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..seeding import rng_state

__all__ = ["FrozenPrefix"]

Forward = Callable[..., Any]
# a module's numbered calls in one evaluation: the recorded ones, None where not recordable
Record = dict[nn.Module, list["_Call | None"]]

_TENSOR = object()  # a tensor's place in a flattened structure
_MISSING = object()
_SCALARS = (type(None), bool, int, complex, str, bytes, torch.dtype, torch.device,
            torch.layout, torch.memory_format, enum.Enum)


class _Opaque:
    """A non-tensor leaf of unknown type: equal only to the same object."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Opaque) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _flatten(obj: Any, tensors: list[Tensor], opaque: list[object]) -> Any:
    """``obj``'s structure, comparable with ``==``: its tensors are appended to ``tensors``
    (their places marked), other leaves of unknown type to ``opaque`` (equal only to
    themselves)."""
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return _TENSOR
    if isinstance(obj, (tuple, list)):
        return type(obj), tuple(_flatten(o, tensors, opaque) for o in obj)
    if isinstance(obj, dict):  # kwargs, and Hugging Face's ModelOutput
        return type(obj), tuple(obj), tuple(_flatten(v, tensors, opaque) for v in obj.values())
    if isinstance(obj, float):
        return float, obj.hex()  # -0.0 is not 0.0, nan is nan
    if isinstance(obj, _SCALARS):
        return type(obj), obj
    opaque.append(obj)
    return _Opaque(obj)


def _plain(t: Tensor) -> bool:
    """Whether ``t`` can be recorded: a strided tensor with a version counter."""
    return t.layout == torch.strided and not t.is_inference()


def _same(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` are interchangeable as a module's input."""
    return a is b or (type(a) is type(b) and a.layout == b.layout == torch.strided
                      and a.dtype == b.dtype and a.device == b.device
                      and a.shape == b.shape and a.stride() == b.stride()
                      and a.requires_grad == b.requires_grad and torch.equal(a, b))


def _rng_state() -> list[Tensor]:
    """The global random generators' states (CPU, and CUDA once it is initialised)."""
    state = rng_state()
    return [state["rng"], *state.get("cuda_rng", [])]


def _own_versions(module: nn.Module) -> list[int]:
    return [t._version for t in (*module.parameters(), *module.buffers())]


def _has_active_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
               for m in module.modules())


@dataclass
class _Call:
    """One recorded call: its arguments' structure and tensors, its output, and the version
    of every tensor involved when it was recorded."""

    spec: Any
    args: list[Tensor]
    output: Any
    versions: list[tuple[Tensor, int]] = field(default_factory=list)

    @classmethod
    def make(cls, spec: Any, args: list[Tensor], output: Any) -> _Call | None:
        outputs: list[Tensor] = []
        opaque: list[object] = []
        _flatten(output, outputs, opaque)
        if opaque or not all(_plain(t) for t in (*args, *outputs)):
            return None
        return cls(spec, args, output, [(t, t._version) for t in (*args, *outputs)])

    def matches(self, spec: Any, args: list[Tensor]) -> bool:
        """Whether a call with these arguments would return the recorded output."""
        return (spec == self.spec and len(args) == len(self.args)
                and all(t._version == v for t, v in self.versions)
                and all(_same(a, b) for a, b in zip(args, self.args, strict=True)))


@dataclass
class _Pass:
    """One evaluation of the model: the nesting depth of the wrapped modules' real calls, the
    calls counted so far per module, and (recording) whether the perturbed part has begun
    and which of its modules ran."""

    depth: int = 0
    counts: dict[nn.Module, int] = field(default_factory=dict)
    started: bool = False
    entered: set[int] = field(default_factory=set)

    def run(self, forward: Forward, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.depth += 1
        try:
            return forward(*args, **kwargs)
        finally:
            self.depth -= 1

    def number(self, module: nn.Module) -> int:
        """The index of ``module``'s current call (calls at depth 0 only)."""
        i = self.counts.get(module, 0)
        self.counts[module] = i + 1
        return i


class FrozenPrefix:
    """Records the frozen prefix of ``model`` on a batch's first evaluation and replays it on
    the next ones (see the module's docstring).

    Arguments:
        model: the model evaluated.
        perturbed: the parameters that change between the evaluations (every other parameter
            and buffer must stay as it is until the recordings are dropped).

    Use one instance per batch, one :meth:`evaluation` per forward pass::

        prefix = FrozenPrefix(model, perturbed)
        for each evaluation, for each piece i of the batch:
            with prefix.evaluation(i):
                loss = loss_fn(model(x_i), y_i)
        prefix.clear()  # or drop the instance
    """

    def __init__(self, model: nn.Module, perturbed: Iterable[Tensor]) -> None:
        moving = {id(p) for p in perturbed}
        self.model = model
        #: the maximal frozen modules (recorded and replayed: see the module's docstring)
        self._frozen = _maximal_frozen(model, moving)
        owners: dict[int, list[nn.Module]] = {i: [] for i in moving}
        if self._frozen:
            for m in model.modules():
                for p in m._parameters.values():
                    if p is not None and id(p) in moving:
                        owners[id(p)].append(m)
        #: the modules that own each perturbed parameter (one list per parameter)
        self._owners = list(owners.values())
        self._records: dict[Hashable, Record] = {}
        #: the number of calls replayed so far (instead of run)
        self.replayed = 0

    @contextmanager
    def evaluation(self, key: Hashable) -> Iterator[None]:
        """One forward pass on the piece of the batch named ``key``: recorded the first time,
        replayed from that recording after."""
        if not self._frozen:
            yield
            return
        record = self._records.get(key)
        if record is None:
            with self._recording() as (state, calls):
                yield
            missed = any(not any(id(m) in state.entered for m in ms) for ms in self._owners)
            self._records[key] = {} if missed else {
                m: cs for m, cs in calls.items() if any(c is not None for c in cs)}
        elif record:
            with self._replaying(record):
                yield
        else:
            yield

    def recorded(self, key: Hashable) -> list[str]:
        """The names of the modules with a recorded call for ``key``, in the model's order."""
        record = self._records.get(key, {})
        return [name for name, m in self.model.named_modules() if m in record]

    def clear(self) -> None:
        """Drop every recording (the end of a step)."""
        self._records.clear()

    # -- the two kinds of pass ----------------------------------------------------------------
    @contextmanager
    def _recording(self) -> Iterator[tuple[_Pass, Record]]:
        state = _Pass()
        calls: Record = {}
        dropout: dict[nn.Module, bool] = {}

        def entering(module: nn.Module, args: Any) -> None:
            state.started = True
            state.entered.add(id(module))

        def wrap(module: nn.Module, forward: Forward) -> Forward:
            def recording(*args: Any, **kwargs: Any) -> Any:
                if state.depth or state.started:
                    return state.run(forward, args, kwargs)
                if module not in dropout:
                    dropout[module] = _has_active_dropout(module)
                inputs: list[Tensor] = []
                spec = _flatten((args, kwargs), inputs, [])
                pure = not (torch.is_grad_enabled() or torch.is_inference_mode_enabled()
                            or dropout[module])
                before = (_rng_state(), _own_versions(module), [t._version for t in inputs]) \
                    if pure and all(_plain(t) for t in inputs) else None
                output = state.run(forward, args, kwargs)
                call = None
                if before is not None and not state.started:
                    rng, versions, arg_versions = before
                    if all(torch.equal(a, b) for a, b in zip(rng, _rng_state(), strict=True)) \
                            and versions == _own_versions(module) \
                            and arg_versions == [t._version for t in inputs]:
                        call = _Call.make(spec, inputs, output)
                calls.setdefault(module, []).append(call)
                return output
            return recording

        owners = {id(m): m for ms in self._owners for m in ms}
        hooks = [m.register_forward_pre_hook(entering) for m in owners.values()]
        try:
            with self._wrapped(wrap):
                yield state, calls
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def _replaying(self, record: Record) -> Iterator[None]:
        state = _Pass()

        def wrap(module: nn.Module, forward: Forward) -> Forward:
            recorded = record.get(module, [])

            def replaying(*args: Any, **kwargs: Any) -> Any:
                if state.depth:
                    return state.run(forward, args, kwargs)
                i = state.number(module)
                call = recorded[i] if i < len(recorded) else None
                if call is not None and not torch.is_grad_enabled():
                    inputs: list[Tensor] = []
                    if call.matches(_flatten((args, kwargs), inputs, []), inputs):
                        self.replayed += 1
                        return call.output
                return state.run(forward, args, kwargs)
            return replaying

        with self._wrapped(wrap):
            yield

    @contextmanager
    def _wrapped(self, wrap: Callable[[nn.Module, Forward], Forward]) -> Iterator[None]:
        """Each maximal frozen module's ``forward`` replaced by ``wrap(module, forward)``
        (an instance attribute), restored on exit."""
        saved: list[tuple[nn.Module, Any]] = []
        try:
            for m in self._frozen:
                saved.append((m, vars(m).get("forward", _MISSING)))
                m.forward = wrap(m, m.forward)
            yield
        finally:
            for m, old in reversed(saved):
                if old is _MISSING:
                    del vars(m)["forward"]
                else:
                    m.forward = old


def _maximal_frozen(model: nn.Module, moving: set[int]) -> list[nn.Module]:
    """The modules of ``model`` that hold no parameter in ``moving`` and whose parents do
    (each once), in the model's order, less those with neither parameters nor buffers (an
    activation, a dropout: cheap to run again) and scripted ones (their forward is fixed).
    None when every parameter and buffer is in ``moving`` (or none is)."""
    state = [*model.parameters(), *model.buffers()]
    if all(id(t) in moving for t in state) or not any(id(t) in moving for t in state):
        return []
    holds: dict[nn.Module, bool] = {}  # whether a module holds a parameter in ``moving``

    def mark(m: nn.Module) -> bool:
        if m not in holds:
            below = [mark(c) for c in m.children()]  # every child marked
            holds[m] = any(below) or any(
                p is not None and id(p) in moving for p in m._parameters.values())
        return holds[m]

    def has_state(m: nn.Module) -> bool:
        return bool(m._parameters or m._buffers) or any(has_state(c) for c in m.children())

    found: list[nn.Module] = []
    seen: set[nn.Module] = set()

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if child in seen:
                continue
            seen.add(child)
            if holds[child]:
                visit(child)
            elif has_state(child) and not isinstance(child, torch.jit.ScriptModule):
                found.append(child)

    mark(model)
    visit(model)
    return found
