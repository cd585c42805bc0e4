"""One rank's collectives and point-to-point messages: watched, and counted in bytes.

Every call runs under the :class:`~forwardonly.distributed.watchdog.Watchdog` (a failure
becomes a :class:`RankFailure` naming the rank at fault) and adds its payload to
:attr:`Comm.traffic`, per operation:

- ``sent``: bytes of this rank's own data handed to the operation;
- ``received``: bytes of other ranks' data delivered to this rank.

These are payload bytes, what the algorithm has to move; the bytes on the wire depend on the
backend's algorithm (a ring all-reduce of n bytes sends ``2 (W-1)/W · n`` per rank).

Point-to-point messages carry up to two tensors (an activation and its tangents, or a
gradient) and are preceded by a fixed 136-byte header with their dtypes and shapes, so the
receiver needs no prior knowledge of them (the last batch of an epoch is smaller).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .watchdog import Watchdog

MAX_TENSORS = 2
MAX_DIMS = 6
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64)
_SLOT = 2 + MAX_DIMS  # dtype code (-1: None), ndim, dims...
HEADER_LEN = 1 + MAX_TENSORS * _SLOT  # int64 entries


@dataclass
class Traffic:
    """Counted payload of one kind of operation."""

    calls: int = 0
    sent: int = 0
    received: int = 0


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Collectives of one rank over the default process group.

    Arguments:
        rank, world_size: this process's place in the group.
        device: where tensors must live for the backend (cpu for gloo, cuda:N for nccl).
        watchdog: turns a failed collective into an error naming the rank at fault.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device,
                 watchdog: Watchdog) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.watchdog = watchdog
        self.traffic: dict[str, Traffic] = {}

    def count(self, op: str, sent: int, received: int) -> None:
        t = self.traffic.setdefault(op, Traffic())
        t.calls += 1
        t.sent += sent
        t.received += received

    def reset_traffic(self) -> dict[str, Traffic]:
        """Return the counts so far and start again from zero."""
        counts, self.traffic = self.traffic, {}
        return counts

    # -- collectives -------------------------------------------------------------------------
    def all_gather(self, t: Tensor, label: str) -> Tensor:
        """``(W, *t.shape)``: every rank's ``t``, in rank order, on every rank."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with self.watchdog.watch(label):
            dist.all_gather(out, t)
        self.count("all_gather", nbytes(t), (self.world_size - 1) * nbytes(t))
        return torch.stack(out)

    def all_reduce(self, t: Tensor, label: str) -> Tensor:
        """Sum of every rank's ``t``, in place."""
        with self.watchdog.watch(label):
            dist.all_reduce(t)
        self.count("all_reduce", nbytes(t), nbytes(t))
        return t

    def broadcast(self, t: Tensor, src: int, label: str) -> Tensor:
        """``t`` of rank ``src`` into ``t`` of every rank, in place."""
        with self.watchdog.watch(label):
            dist.broadcast(t, src)
        mine = self.rank == src
        self.count("broadcast", nbytes(t) if mine else 0, 0 if mine else nbytes(t))
        return t

    def barrier(self, label: str) -> None:
        with self.watchdog.watch(label):
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int, label: str) -> Any:
        """A picklable object of rank ``src``, on every rank."""
        box = [obj if self.rank == src else None]
        with self.watchdog.watch(label):
            dist.broadcast_object_list(box, src, device=self._object_device())
        size = len(pickle.dumps(box[0]))
        self.count("object", size if self.rank == src else 0, 0 if self.rank == src else size)
        return box[0]

    def gather_objects(self, obj: Any, dst: int, label: str) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank ``dst``; ``None`` elsewhere."""
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        with self.watchdog.watch(label):
            dist.gather_object(obj, out, dst=dst)
        size = len(pickle.dumps(obj))
        self.count("object", size, 0 if out is None else sum(
            len(pickle.dumps(o)) for r, o in enumerate(out) if r != dst))
        return out

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    # -- point to point ----------------------------------------------------------------------
    def send(self, tensors: Sequence[Tensor | None], dst: int, label: str) -> None:
        """Send up to two tensors (``None`` allowed) to rank ``dst``."""
        if len(tensors) > MAX_TENSORS:
            raise ValueError(f"a message holds at most {MAX_TENSORS} tensors, got {len(tensors)}")
        header = torch.full((HEADER_LEN,), -1, dtype=torch.int64)
        header[0] = len(tensors)
        for i, t in enumerate(tensors):
            if t is None:
                continue
            if t.dim() > MAX_DIMS or t.dtype not in DTYPES:
                raise ValueError(f"cannot send a {t.dtype} tensor of shape {tuple(t.shape)}: "
                                 f"at most {MAX_DIMS} dimensions, dtypes {DTYPES}")
            slot = 1 + i * _SLOT
            header[slot] = DTYPES.index(t.dtype)
            header[slot + 1] = t.dim()
            header[slot + 2:slot + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        header = header.to(self.device)
        payload = [t.contiguous() for t in tensors if t is not None]
        with self.watchdog.watch(label):
            dist.send(header, dst)
            for t in payload:
                dist.send(t, dst)
        self.count("send", nbytes(header) + sum(nbytes(t) for t in payload), 0)

    def recv(self, src: int, label: str) -> list[Tensor | None]:
        """Receive the tensors rank ``src`` sent with :meth:`send`."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        out: list[Tensor | None] = []
        with self.watchdog.watch(label):
            dist.recv(header, src)
            spec = header.tolist()
            for i in range(int(spec[0])):
                slot = 1 + i * _SLOT
                if spec[slot] < 0:
                    out.append(None)
                    continue
                shape = spec[slot + 2:slot + 2 + spec[slot + 1]]
                t = torch.empty(shape, dtype=DTYPES[spec[slot]], device=self.device)
                dist.recv(t, src)
                out.append(t)
        self.count("recv", 0, nbytes(header) + sum(nbytes(t) for t in out if t is not None))
        return out
