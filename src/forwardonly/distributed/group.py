"""One rank's process group, joined from torchrun's environment (``env://``).

``gloo`` on CPU, ``nccl`` on CUDA (rank on ``cuda:LOCAL_RANK``); every collective, send and
receive times out after ``dist_timeout`` seconds. Faults are torch's: torchrun's agent ends the
group when a rank exits and names it (restarting it under ``--max-restarts``); a hung or
stopped rank makes the others' collectives time out (gloo raises; nccl's watchdog aborts). As
gloo does not say *which* rank it was, a failed call makes each rank check in under a key in the
rendezvous store, and a :class:`RankFailure` names the ranks that did not (or left their error
there): unlike ``dist.monitored_barrier`` (rank 0 only, no name once connections close).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ConfigError
from ..estimators import Estimator

T = TypeVar("T")

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = ("launch with torchrun, e.g. torchrun --nproc-per-node 2 -m forwardonly train "
               "--distributed data --method fg-w")
# Settings that may differ between ranks: where files are, which device, cosmetics. The run
# directory ("out") is chosen by rank 0 (a default name holds each process's own clock).
PER_RANK_FIELDS = frozenset({"out", "device", "threads", "progress", "data_dir"})


class RankFailure(RuntimeError):
    """Another rank died, hung or failed, or the group did not form; the message says who."""


@dataclass
class Traffic:
    """Payload bytes of one kind of operation: this rank's own (sent), others' (received)."""
    calls: int = 0
    sent: int = 0
    received: int = 0


def launch_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or a clear
    :class:`ConfigError` when it is missing."""
    env = os.environ if environ is None else environ
    missing = [v for v in LAUNCH_VARS if not env.get(v)]
    if missing:
        raise ConfigError(f"--distributed needs the environment torchrun gives each process, "
                          f"but {', '.join(missing)} is not set; {LAUNCH_HINT}")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} do not describe a rank of a "
                          f"group; {LAUNCH_HINT}")
    return rank, world, int(env.get("LOCAL_RANK", rank))


def config_digest(values: Mapping[str, Any]) -> int:
    """A 63-bit hash of the settings every rank must share."""
    shared = {k: v for k, v in values.items() if k not in PER_RANK_FIELDS}
    text = json.dumps(shared, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def tensor_digest(tensors: list[Tensor]) -> int:
    """A 63-bit hash of the exact bytes of ``tensors`` (to check ranks hold the same)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Group:
    """This process's rank of a torchrun group; :meth:`start` joins, :meth:`finish` leaves.

    Arguments:
        device: the configured device: ``"cpu"`` (gloo) or ``"cuda"``/``"cuda:N"`` (nccl;
            each rank uses ``cuda:LOCAL_RANK``).
        timeout: ``dist_timeout``: seconds any one collective, send or receive may wait.
    """

    _opened = 0  # groups opened by this process: keeps the store keys of each apart

    def __init__(self, device: str = "cpu", timeout: float = 60.0) -> None:
        self.rank, self.world_size, local = launch_ranks()
        self.timeout = float(timeout)
        # how long a failed rank waits for the others to check in before naming who did not
        self.grace = min(10.0, max(2.0, self.timeout / 10))
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA "
                                  f"device; use --device cpu (the gloo backend)")
            self.device, self.backend = torch.device("cuda", local), "nccl"
        else:
            self.device, self.backend = torch.device("cpu"), "gloo"
        self.traffic: dict[str, Traffic] = {}
        self.store: Any = None

    def start(self, values: Mapping[str, Any]) -> None:
        """Join the group, then check that every rank was given the same ``values``."""
        self._join()
        self.check_same_config(values)

    def _join(self) -> None:
        Group._opened += 1
        self._keys = f"forwardonly/{Group._opened}/"
        timeout = timedelta(seconds=self.timeout)
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        if self.backend == "nccl":
            torch.cuda.set_device(self.device)
            # nccl collectives return when queued; its watchdog ends a rank whose collective
            # outlives the timeout instead of letting it hang (the default on recent torch)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        try:
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
            # torchrun's agent keeps its store across --max-restarts: each attempt's keys apart
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self.store = dist.PrefixStore(f"attempt/{restart}", store)
            dist.init_process_group(self.backend, store=self.store, rank=self.rank,
                                    world_size=self.world_size, timeout=timeout,
                                    device_id=self.device if self.backend == "nccl" else None)
        except (RuntimeError, ValueError) as exc:
            raise RankFailure(
                f"rank {self.rank} could not form the group of {self.world_size} ranks at "
                f"{where} within dist_timeout = {self.timeout:g} s ({_first_line(exc)}); check "
                f"that all {self.world_size} processes started and reach MASTER_ADDR:"
                f"MASTER_PORT") from exc

    def finish(self, exc: BaseException | None = None) -> None:
        """Leave the group: a final barrier when all went well; otherwise this rank's error
        is left in the store, where the others' diagnosis reads it."""
        try:
            if exc is None:
                self.barrier("the end of the run")
            elif not isinstance(exc, RankFailure):
                self.store.set(self._keys + f"fault/{self.rank}",
                               f"error: {type(exc).__name__}: {_first_line(exc)}")
        except (RuntimeError, RankFailure):
            pass  # the group is already broken; the process ends anyway
        finally:
            dist.destroy_process_group()

    def check_same_config(self, values: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` on every rank unless all ranks share the settings."""
        mine = torch.tensor([config_digest(values)], dtype=torch.int64, device=self.device)
        digests = self.all_gather(mine, "the configuration check").view(-1).tolist()
        if len(set(digests)) == 1:
            return
        shared = {k: v for k, v in values.items() if k not in PER_RANK_FIELDS}
        everyone: list[Any] = [None] * self.world_size
        with self.watch("the configuration check"):
            dist.all_gather_object(everyone, shared)
        lines, keys = [], set()
        for r, other in enumerate(everyone):
            if r == 0 or digests[r] == digests[0]:
                continue
            differ = sorted(k for k in set(other) | set(everyone[0])
                            if other.get(k) != everyone[0].get(k))
            keys.update(differ)
            lines.append(f"rank {r} differs from rank 0 (" + ", ".join(
                f"{k}: rank 0 has {everyone[0].get(k)!r}, rank {r} has {other.get(k)!r}"
                for k in differ) + ")")
        hint = (" Give --resume (with the same value) to every rank or to none."
                if "resume" in keys else "")
        raise ConfigError("the ranks were started with different settings: " + "; ".join(lines)
                          + f".{hint} Start every rank with the same command line and config "
                          f"file.")

    def share(self, fn: Callable[[], T], label: str) -> T:
        """Run ``fn`` on rank 0 and give its result to every rank; an error it raises is
        raised on every rank."""
        outcome: tuple[Any, Exception | None] = (None, None)
        if self.rank == 0:
            try:
                outcome = (fn(), None)
            except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised
                outcome = (None, exc)
        value, error = self.broadcast_object(outcome, 0, label)
        if error is not None:
            raise error
        return value

    # -- collectives and messages, counted and watched ----------------------------------------
    def count(self, op: str, sent: int, received: int) -> None:  # payload bytes
        t = self.traffic.setdefault(op, Traffic())
        t.calls, t.sent, t.received = t.calls + 1, t.sent + sent, t.received + received

    def reset_traffic(self) -> dict[str, Traffic]:
        """The counts so far; start again from zero."""
        counts, self.traffic = self.traffic, {}
        return counts

    def all_gather(self, t: Tensor, label: str) -> Tensor:
        """``(W, *t.shape)``: every rank's ``t``, in rank order, on every rank."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with self.watch(label):
            dist.all_gather(out, t)
        self.count("all_gather", t.nbytes, (self.world_size - 1) * t.nbytes)
        return torch.stack(out)

    def all_reduce(self, t: Tensor, label: str) -> Tensor:
        """Sum of every rank's ``t``, in place."""
        with self.watch(label):
            dist.all_reduce(t)
        self.count("all_reduce", t.nbytes, t.nbytes)
        return t

    def broadcast(self, t: Tensor, src: int, label: str) -> Tensor:
        """``t`` of rank ``src`` into ``t`` of every rank, in place."""
        with self.watch(label):
            dist.broadcast(t, src)
        mine = self.rank == src
        self.count("broadcast", t.nbytes if mine else 0, 0 if mine else t.nbytes)
        return t

    def barrier(self, label: str) -> None:
        with self.watch(label):
            dist.barrier()

    # objects (start-up, checkpoints, a boundary's shape) are not counted
    def broadcast_object(self, obj: Any, src: int, label: str) -> Any:
        """A picklable object of rank ``src``, on every rank."""
        box = [obj if self.rank == src else None]
        with self.watch(label):
            dist.broadcast_object_list(box, src, device=self.device)
        return box[0]

    def gather_object(self, obj: Any, dst: int, label: str) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank ``dst``; ``None`` elsewhere."""
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        with self.watch(label):
            dist.gather_object(obj, out, dst=dst)
        return out

    def send(self, t: Tensor, dst: int, label: str) -> None:
        with self.watch(label):
            dist.send(t.contiguous(), dst)
        self.count("send", t.nbytes, 0)

    def recv(self, t: Tensor, src: int, label: str) -> Tensor:
        """Receive into ``t`` (its shape and dtype must be the sent tensor's)."""
        with self.watch(label):
            dist.recv(t, src)
        self.count("recv", 0, t.nbytes)
        return t

    def send_object(self, obj: Any, dst: int, label: str) -> None:
        with self.watch(label):
            dist.send_object_list([obj], dst, device=self.device)

    def recv_object(self, src: int, label: str) -> Any:
        box = [None]
        with self.watch(label):
            dist.recv_object_list(box, src, device=self.device)
        return box[0]

    # -- who is at fault ---------------------------------------------------------------------
    @contextmanager
    def watch(self, label: str) -> Iterator[None]:
        """Turn a failed collective (timed out, or a peer gone) into a :class:`RankFailure`
        naming the rank(s) at fault; any other error passes unchanged."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, RankFailure) or not dist.is_initialized():
                raise
            failure = self.diagnose(label, exc)
            if failure is None:
                raise
            raise failure from exc

    def diagnose(self, label: str, exc: BaseException) -> RankFailure | None:
        """Check in under this failure's key in the store, wait up to :attr:`grace` seconds
        for the others, and name the ranks that did not check in or left their error there.
        ``None`` when all checked in and nothing timed out (the error is this rank's own)."""
        key, cause = self._keys + "fault/", f"during {label} ({_first_line(exc)})"
        missing = [r for r in range(self.world_size) if r != self.rank]
        try:
            self.store.set_timeout(timedelta(seconds=self.grace))
            self.store.set(key + str(self.rank), "waiting")
            deadline = time.monotonic() + self.grace
            while missing and time.monotonic() < deadline:
                time.sleep(0.05)
                missing = [r for r in missing if not self.store.check([key + str(r)])]
            notes = {r: self.store.get(key + str(r)).decode() for r in range(self.world_size)
                     if r not in missing}
            self.store.set(key + f"done/{self.rank}", "")
            # rank 0 may host the store: it stays until the others that checked in have read it
            waiting = [key + f"done/{r}" for r, note in notes.items() if note == "waiting"]
            while self.rank == 0 and time.monotonic() < deadline + self.grace and not \
                    self.store.check(waiting):
                time.sleep(0.05)
        except RuntimeError:
            return RankFailure(f"rank {self.rank}: the group broke {cause}, and the rendezvous "
                               f"store with it: the process that hosts it (torchrun's agent, "
                               f"or rank 0) ended. See its output")
        failed = [f"rank {r} failed: {e[7:]}" for r, e in notes.items() if e.startswith("error: ")]
        if failed:
            return RankFailure("; ".join(failed) + f" (rank {self.rank} stopped {cause})")
        if missing:
            who, s = ", ".join(map(str, missing)), "s" if len(missing) > 1 else ""
            return RankFailure(
                f"rank{s} {who} stopped responding: rank {self.rank} waited {cause} with "
                f"dist_timeout = {self.timeout:g} s, and rank{s} {who} did not answer in the "
                f"rendezvous store within {self.grace:g} s more (dead, stopped or hung). The "
                f"last checkpoint is kept; continue with --resume, or let torchrun "
                f"--max-restarts N with --resume auto do it")
        if "timed out" in str(exc).lower():
            return RankFailure(f"rank {self.rank} gave up {cause}, though every rank is still "
                               f"running: one was slower than dist_timeout = {self.timeout:g} s "
                               f"allows; raise --dist-timeout")
        return None


class RankWorker(Group):
    """A :class:`Group` rank with a model part: what the workers of every mode share."""
    _module: nn.Module
    _est: Estimator

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run directory, the metrics and the checkpoints."""
        return self.rank == 0

    @property
    def module(self) -> nn.Module:
        """The parameters this rank trains."""
        return self._module

    @property
    def estimator(self) -> Estimator:
        return self._est

    def all_finite(self) -> bool:
        """Whether every parameter of every rank is finite."""
        ok = all(bool(torch.isfinite(p).all()) for p in self._module.parameters())
        t = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        return int(self.all_reduce(t, "the finiteness check").item()) == 0

    def sgd_step(self, x: Tensor, y: Tensor, lr: float, weight_decay: float,
                 head_lr: float | None = None) -> dict[str, float]:
        raise ConfigError("--optimizer sgd-inplace is single-process only; use sgd or adam "
                          "with --distributed")
