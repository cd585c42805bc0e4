"""Rank health: heartbeats in the rendezvous store, and a diagnosis that names the bad rank.

A collective that fails tells a rank *that* something went wrong, not *who*: gloo says
"Connection closed by peer [127.0.0.1]:40213" when a rank dies and "Timed out waiting 60000ms"
when one hangs. So every rank also runs a daemon thread that writes one small record into the
rendezvous store (the TCPStore hosted by torchrun's agent, or by rank 0) every ``interval``
seconds, under ``hb/<rank>``::

    {"beat": 17, "progress": 230, "label": "all-gather of d, step 229", "waiting": true,
     "status": null | "done" | "error: <what went wrong>" | "abort: <whose fault>"}

``progress`` counts the collectives the main thread has entered; ``beat`` counts the records.
From the others' records a rank can tell, when its own collective fails:

- a rank whose ``beat`` has not changed for ``stale_s`` seconds has **died** (or was stopped);
- a rank whose status is ``error: ...`` **failed** on its own, for the reason it wrote;
- a rank that is alive but whose ``progress`` is behind ours never reached the collective we
  waited in: it **hung** (or is far slower than ``dist_timeout`` allows).

Ranks that stop because of someone else write ``abort: <reason>``, so the reason travels and
the first culprit is named everywhere. Timing, with ``T = dist_timeout``::

    stale_s  = clip(T / 6, 1, 10)      no heartbeat for this long: the rank is gone
    interval = stale_s / 5             heartbeat period
    dead rank -> error within about stale_s   (gloo reports the closed connection at once)
    hung rank -> error within about T + stale_s   (the collective's own timeout is T)

Last resort: if the main thread is stuck (no new collective) for ``grace`` seconds after
another rank failed, or stays inside one collective for ``T + grace`` seconds — a backend
whose collectives do not time out by themselves — the thread prints the diagnosis and ends
the process with exit code :data:`EXIT_CODE`. Nothing hangs silently.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

EXIT_CODE = 3  # a rank ended by the watchdog (another rank died, hung or failed)


class RankFailure(RuntimeError):
    """Another rank died, hung or failed; the message names it, ``cause`` is the short form."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def health_timing(timeout: float) -> tuple[float, float, float]:
    """``(stale_s, interval, grace)`` for a ``dist_timeout`` of ``timeout`` seconds."""
    stale = min(10.0, max(1.0, timeout / 6))
    interval = stale / 5
    return stale, interval, stale + 2 * interval


@dataclass
class _Peer:
    """What this rank knows about another rank."""

    beat: int = -1
    changed: float = field(default_factory=time.monotonic)  # local clock of the last new beat
    progress: int = 0
    label: str = "start-up"
    waiting: bool = False
    status: str | None = None


class Watchdog:
    """Heartbeat thread + diagnosis for one rank.

    Arguments:
        store: a client of the rendezvous store (its own connection; this object locks it).
        rank, world_size: this process's rank and the number of ranks.
        timeout: ``dist_timeout`` in seconds (see the module docstring for what follows).
        store_host: ``"host:port"`` of the store, named when the store itself is gone.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float,
                 store_host: str = "the rendezvous store") -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout = float(timeout)
        self.stale_s, self.interval, self.grace = health_timing(self.timeout)
        self.store_host = store_host
        self.progress = 0
        self.label = "start-up"
        self.waiting_since: float | None = None
        self.status: str | None = None
        self.fault: str | None = None  # the first diagnosis, once there is one
        self._peers = {r: _Peer() for r in range(world_size) if r != rank}
        self._beat = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._store_down_since: float | None = None
        self._fault_seen: float | None = None
        self._fault_progress = 0
        self._thread: threading.Thread | None = None
        self._last_refresh: float | None = None
        self.closing = False  # set once the main thread handles the end of the run itself

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Publish the first record, wait for every rank's, start the heartbeat thread."""
        self._publish()
        with self._lock:
            self.store.wait([f"hb/{r}" for r in sorted(self._peers)])
            # from now on a store that does not answer within stale_s counts as gone
            self.store.set_timeout(timedelta(seconds=self.stale_s))
        self._refresh()
        if self._peers:
            self._thread = threading.Thread(target=self._run, name="forwardonly-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat thread (call after setting a final status)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 1)

    def linger(self) -> None:
        """Keep the store up until every other rank has read this rank's final status (its
        heartbeat moved on twice since), published its own, or gone silent — at most
        ``2·grace`` seconds. Called by the rank hosting the store (no torchrun agent) before
        it ends, so that the others learn why the run stopped."""
        self.closing = True
        deadline = time.monotonic() + 2 * self.grace
        start: dict[int, int] | None = None
        while self._peers and time.monotonic() < deadline:
            try:
                self._refresh()
            except Exception:
                return
            start = start or {r: p.beat for r, p in self._peers.items()}
            now = time.monotonic()
            if all(p.status is not None or now - p.changed > self.stale_s
                   or p.beat >= start[r] + 2 for r, p in self._peers.items()):
                return
            time.sleep(self.interval / 2)

    def set_status(self, status: str) -> None:
        """``"done"``, ``"error: ..."`` or ``"abort: ..."``: published at once."""
        self.status = status
        try:
            self._publish()
        except Exception:  # the store may be gone too; the peers will see a stale beat
            pass

    # -- the main thread's collectives -------------------------------------------------------
    @contextmanager
    def watch(self, label: str, *, local_work: bool = False) -> Iterator[None]:
        """Run one collective under the watchdog: its failure becomes a
        :class:`RankFailure` that names the rank at fault. With ``local_work`` (a whole step
        whose collectives run inside, e.g. DDP's backward) an error no other rank explains is
        this rank's own and is raised as it is."""
        self.progress += 1
        self.label = label
        self.waiting_since = time.monotonic()
        try:
            yield
        except RankFailure:
            raise
        except RuntimeError as exc:  # gloo/nccl errors, DistBackendError, store errors
            if not self._peers:
                raise
            cause = self.diagnose()
            if cause is None and local_work:
                raise
            cause = cause or self._unexplained(exc)
            raise RankFailure(self.explain(cause), cause) from exc
        finally:
            self.waiting_since = None

    def _unexplained(self, exc: BaseException) -> str:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return (f"a collective failed ({first[:300]}) and no rank could be singled out "
                f"(ranks seen: {self._peer_summary()})")

    def explain(self, cause: str) -> str:
        """The whole error message around ``cause``."""
        return (f"rank {self.rank} stopped at '{self.label}': {cause}. Every rank stops; see "
                f"the named rank's own output for its cause. The last checkpoint is kept "
                f"(continue with --resume); raise --dist-timeout if ranks legitimately pause "
                f"longer than {self.timeout:g} s between collectives.")

    def diagnose(self) -> str | None:
        """Name the rank at fault, polling the records for up to ``stale_s + 2·interval``
        seconds (a dead rank's beat must first go stale); ``None`` if nobody stands out."""
        if self.fault is not None:
            return self.fault
        self.closing = True  # the main thread is handling the failure: no last resort
        deadline = time.monotonic() + self.stale_s + 2 * self.interval
        behind_since: float | None = None
        while True:
            try:
                self._refresh()
            except Exception as exc:
                return self._last_known_fault() or self._store_message(exc)
            cause = self._definite_fault(self.stale_s)
            if cause is not None:
                return cause
            behind = self._behind()
            if behind:
                behind_since = behind_since or time.monotonic()
                waited = time.monotonic() - (self.waiting_since or time.monotonic())
                # fresh records for two beats, and we did wait the full timeout: a hang
                if waited >= 0.9 * self.timeout and \
                        time.monotonic() - behind_since >= 2 * self.interval:
                    return self._hang_message(behind)
            if time.monotonic() >= deadline:
                return self._hang_message(behind) if behind else None
            time.sleep(self.interval / 2)

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
                self._refresh()
            except Exception as exc:  # the store is unreachable
                if self._stop.is_set():
                    return
                now = time.monotonic()
                self._store_down_since = self._store_down_since or now
                if now - self._store_down_since > self.stale_s:
                    self._note_fault(self._last_known_fault() or self._store_message(exc))
                    self._wait_for_the_end()
                    return
            else:
                self._store_down_since = None
                cause = self._definite_fault(self.timeout)
                if cause is None and self.waiting_since is not None and \
                        time.monotonic() - self.waiting_since > self.timeout:
                    behind = self._behind()
                    if behind:
                        cause = self._hang_message(behind)
                if cause is not None:
                    self._note_fault(cause)
            self._last_resort()

    def _wait_for_the_end(self) -> None:
        """The store is gone: stop calling it, keep only the last-resort exit."""
        while not self._stop.wait(self.interval):
            self._last_resort()

    def _note_fault(self, cause: str) -> None:
        if self.fault is None:
            self.fault = cause
            self._fault_seen = time.monotonic()
            self._fault_progress = self.progress

    def _last_resort(self) -> None:
        """End the process if the main thread is stuck although the run is over."""
        now = time.monotonic()
        stuck_after_fault = (self.fault is not None and self.progress == self._fault_progress
                             and now - (self._fault_seen or now) > self.grace)
        stuck_in_collective = (self.waiting_since is not None
                               and now - self.waiting_since > self.timeout + self.grace)
        if not (stuck_after_fault or stuck_in_collective) or self._stop.is_set() or \
                self.closing:
            return
        behind = self._behind()
        if self.fault is not None:
            cause = self.fault
        elif behind:
            cause = self._hang_message(behind)
        else:
            cause = (f"no answer from the other ranks for "
                     f"{now - (self.waiting_since or now):.0f} s")
        message = (f"forwardonly: error: rank {self.rank} ends its process (exit code "
                   f"{EXIT_CODE}) while at '{self.label}': {cause}.")
        print(message, file=sys.stderr, flush=True)
        if self._store_down_since is None:
            self.set_status(f"abort: {cause}")
        os._exit(EXIT_CODE)

    # -- records -----------------------------------------------------------------------------
    def _publish(self) -> None:
        self._beat += 1
        record = {"beat": self._beat, "progress": self.progress, "label": self.label,
                  "waiting": self.waiting_since is not None, "status": self.status}
        with self._lock:
            self.store.set(f"hb/{self.rank}", json.dumps(record))

    def _refresh(self) -> None:
        ranks = sorted(self._peers)
        if not ranks:
            return
        with self._lock:
            values = self.store.multi_get([f"hb/{r}" for r in ranks])
        now = self._last_refresh = time.monotonic()
        for r, raw in zip(ranks, values, strict=True):
            rec: dict[str, Any] = json.loads(bytes(raw).decode())
            peer = self._peers[r]
            if rec["beat"] != peer.beat:
                peer.beat, peer.changed = rec["beat"], now
            peer.progress, peer.label = rec["progress"], rec["label"]
            peer.waiting, peer.status = rec["waiting"], rec["status"]

    # -- reasoning ---------------------------------------------------------------------------
    def _definite_fault(self, stale_after: float) -> str | None:
        """A rank that failed, or that stopped beating; else the reason another rank gave."""
        now = time.monotonic()
        for r, peer in sorted(self._peers.items()):
            if peer.status and peer.status.startswith("error"):
                return f"rank {r} failed at '{peer.label}': {peer.status[len('error: '):]}"
        for r, peer in sorted(self._peers.items()):
            if peer.status is None and now - peer.changed > stale_after:
                return (f"rank {r} stopped responding (no heartbeat for "
                        f"{now - peer.changed:.1f} s: its process died or was stopped); its "
                        f"last reported work was '{peer.label}'")
        for _, peer in sorted(self._peers.items()):
            if peer.status and peer.status.startswith("abort"):
                return peer.status[len("abort: "):]
        return None

    def _last_known_fault(self) -> str | None:
        """With the store gone (rank 0 hosted it and has ended), the records last read: the
        rank whose heartbeat had stopped for a while already is the one at fault."""
        if self._last_refresh is None:
            return None
        quiet = [(self._last_refresh - p.changed, r) for r, p in self._peers.items()
                 if p.status is None]
        if not quiet:
            return None
        silence, r = max(quiet)
        if silence < 2 * self.interval:
            return None
        return (f"rank {r} stopped responding (no heartbeat for at least {silence:.1f} s before "
                f"the store went away: its process died or was stopped); its last reported "
                f"work was '{self._peers[r].label}'")

    def _behind(self) -> list[int]:
        return [r for r, p in sorted(self._peers.items())
                if p.status is None and p.progress < self.progress]

    def _hang_message(self, behind: list[int]) -> str:
        names = ", ".join(f"rank {r} (still after '{self._peers[r].label}')" for r in behind)
        return (f"{names} did not reach '{self.label}' within dist_timeout = {self.timeout:g} s "
                f"although alive: hung, or far slower than the other ranks")

    def _store_message(self, exc: BaseException) -> str:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
        return (f"the rendezvous store at {self.store_host} is unreachable ({first}); when "
                f"rank 0 hosts it (no torchrun agent), rank 0 died")

    def _peer_summary(self) -> str:
        now = time.monotonic()
        return "; ".join(f"rank {r}: at '{p.label}', last beat {now - p.changed:.1f} s ago"
                         + (f", {p.status}" if p.status else "")
                         for r, p in sorted(self._peers.items()))
