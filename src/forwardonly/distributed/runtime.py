"""One process of a distributed run: its process group, its watchdog, the start-up checks.

``torchrun --nproc-per-node N -m forwardonly train --distributed data ...`` starts N processes
and gives each, in its environment, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` (and ``TORCHELASTIC_USE_AGENT_STORE=True`` when torchrun's agent hosts the
rendezvous store; otherwise rank 0 hosts it). :class:`Session` turns that into

- a ``torch.distributed`` process group — ``gloo`` on CPU, ``nccl`` on CUDA (rank on
  ``cuda:LOCAL_RANK``) — whose collectives time out after ``dist_timeout`` seconds;
- a :class:`~forwardonly.distributed.watchdog.Watchdog` with its own store connection;
- a :class:`~forwardonly.distributed.comm.Comm` for counted, watched collectives;

and checks at start that every rank was given the same configuration (one all-gather of a
64-bit hash; the differing settings are named when it fails).
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..config import ConfigError
from .comm import Comm
from .watchdog import RankFailure, Watchdog

T = TypeVar("T")

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Settings that may differ between ranks: where files are, which device, cosmetics. The run
# directory ("out") is chosen by rank 0 (a default name holds each process's own clock).
PER_RANK_FIELDS = frozenset({"out", "device", "threads", "progress", "data_dir"})
LAUNCH_HINT = ("launch with torchrun, e.g. torchrun --nproc-per-node 2 -m forwardonly train "
               "--distributed data --method fg-w")


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells one process about the run."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun's agent hosts the store (else rank 0 does)
    restart: int  # torchrun's restart count: keeps the keys of a restarted group apart

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if environ is None else environ
        missing = [v for v in LAUNCH_VARS if not env.get(v)]
        if missing:
            raise ConfigError(f"--distributed needs the environment torchrun gives each "
                              f"process, but {', '.join(missing)} is not set; {LAUNCH_HINT}")
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            port = int(env["MASTER_PORT"])
            local = int(env.get("LOCAL_RANK", env["RANK"]))
            restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
        except ValueError as exc:
            raise ConfigError(f"the torchrun environment holds a non-integer value ({exc}); "
                              f"{LAUNCH_HINT}") from exc
        if not (world >= 1 and 0 <= rank < world):
            raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} do not describe a rank of a "
                              f"group; {LAUNCH_HINT}")
        return cls(rank, world, local, env["MASTER_ADDR"], port,
                   env.get("TORCHELASTIC_USE_AGENT_STORE") == "True", restart)


def config_digest(values: Mapping[str, Any]) -> int:
    """A 63-bit hash of the settings every rank must share."""
    shared = {k: v for k, v in values.items() if k not in PER_RANK_FIELDS}
    text = json.dumps(shared, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class Session:
    """The process group, watchdog and collectives of one rank; a context manager.

    Arguments:
        env: the launch environment (:meth:`LaunchEnv.from_environ`).
        device: the configured device: ``"cpu"`` (gloo) or ``"cuda"``/``"cuda:N"`` (nccl; each
            rank uses ``cuda:LOCAL_RANK``).
        timeout: ``dist_timeout`` in seconds.
    """

    _opened = 0  # sessions opened by this process so far

    def __init__(self, env: LaunchEnv, *, device: str = "cpu", timeout: float = 60.0) -> None:
        self.env = env
        self.rank, self.world_size = env.rank, env.world_size
        self.timeout = float(timeout)
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA "
                                  f"device; use --device cpu (the gloo backend)")
            self.device = torch.device("cuda", env.local_rank)
            self.backend = "nccl"
        else:
            self.device = torch.device("cpu")
            self.backend = "gloo"
        self.comm: Comm
        self.watchdog: Watchdog

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run directory, the metrics and the checkpoints."""
        return self.rank == 0

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)

    def open(self) -> None:
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group is already initialized in "
                               "this process; train one distributed run per process")
        env = self.env
        host = f"{env.master_addr}:{env.master_port}"
        # every rank opens its sessions in the same order: their keys never mix
        Session._opened += 1
        prefix = f"forwardonly/{env.restart}/{Session._opened}/"
        if self.backend == "nccl":
            torch.cuda.set_device(self.device)
        try:
            store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                                  is_master=env.rank == 0 and not env.agent_store,
                                  timeout=timedelta(seconds=self.timeout))
            self.watchdog = Watchdog(dist.PrefixStore(prefix + "health", store.clone()),
                                     env.rank, env.world_size, self.timeout, store_host=host)
            # nccl collectives do not raise on time-out; give the watchdog the first word
            extra = 3 * self.watchdog.grace if self.backend == "nccl" else 0.0
            dist.init_process_group(self.backend, store=dist.PrefixStore(prefix + "pg", store),
                                    rank=env.rank, world_size=env.world_size,
                                    timeout=timedelta(seconds=self.timeout + extra))
            self.watchdog.start()  # waits for every rank's first heartbeat
        except RuntimeError as exc:
            if dist.is_initialized():
                dist.destroy_process_group()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise RankFailure(
                f"rank {env.rank} could not form the group of {env.world_size} ranks through "
                f"the store at {host} within dist_timeout = {self.timeout:g} s ({first}); check "
                f"that all {env.world_size} processes started and reach MASTER_ADDR:MASTER_PORT",
                f"the group did not form at {host}") from exc
        self._store = store
        self.comm = Comm(env.rank, env.world_size, self.device, self.watchdog)

    def close(self, exc: BaseException | None = None) -> None:
        """End the run: a final barrier when all went well; the status the others read."""
        if not dist.is_initialized():
            return
        try:
            if exc is None:
                self.comm.barrier("the end of the run")
                self.watchdog.set_status("done")
            elif isinstance(exc, RankFailure):
                self.watchdog.set_status(f"abort: {exc.cause}")
            else:
                where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
                at = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.watchdog.set_status(f"error: {type(exc).__name__}: {first}{at}")
            if self.rank == 0 and not self.env.agent_store:
                self.watchdog.linger()  # the store lives in this process: let it be read
        finally:
            self.watchdog.stop()
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group: the process ends anyway
                pass

    # -- start-up checks and rank-0 work -----------------------------------------------------
    def check_same_config(self, values: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` on every rank unless all ranks share the settings."""
        mine = config_digest(values)
        digests = self.comm.all_gather(torch.tensor([mine], dtype=torch.int64,
                                                    device=self.device),
                                       "the configuration check").view(-1).tolist()
        if len(set(digests)) == 1:
            return
        shared = {k: v for k, v in values.items() if k not in PER_RANK_FIELDS}
        everyone = [None] * self.world_size
        with self.watchdog.watch("the configuration check (differences)"):
            dist.all_gather_object(everyone, shared)
        lines = []
        for r, other in enumerate(everyone):
            if r == 0 or digests[r] == digests[0]:
                continue
            diffs = ", ".join(f"{k}: rank 0 has {everyone[0].get(k)!r}, rank {r} has "
                              f"{other.get(k)!r}"
                              for k in sorted(set(other) | set(everyone[0]))
                              if other.get(k) != everyone[0].get(k))
            lines.append(f"rank {r} differs from rank 0 ({diffs})")
        raise ConfigError("the ranks were started with different settings: " + "; ".join(lines)
                          + ". Start every rank with the same command line and config file.")

    def on_writer(self, fn: Callable[[], T], label: str) -> T:
        """Run ``fn`` on rank 0 and give its result to every rank; an error it raises is
        raised on every rank (a ``ConfigError`` as itself)."""
        outcome: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self.is_writer:
            try:
                outcome = ("ok", fn())
            except (ConfigError, OSError, ValueError) as exc:
                error = exc
                outcome = (type(exc).__name__, str(exc))
        outcome = self.comm.broadcast_object(outcome, 0, label)
        if error is not None:
            raise error
        kind, value = outcome
        if kind == "ConfigError":
            raise ConfigError(value)
        if kind != "ok":
            raise RuntimeError(f"rank 0 failed during {label}: {kind}: {value}")
        return value

    def all_true(self, flag: bool, label: str) -> bool:
        """``True`` when ``flag`` holds on every rank."""
        t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self.device)
        return int(self.comm.all_reduce(t, label).item()) == 0


def tensor_digest(tensors: list[torch.Tensor]) -> int:
    """A 63-bit hash of the exact bytes of ``tensors`` (to check ranks hold the same)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1
