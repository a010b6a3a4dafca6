"""Failure detection: heartbeats, a generation counter in the rendezvous store, failure-aware waits.

Facts this design rests on (gloo, torch 2.13): ``work.wait()`` cannot be interrupted (``abort()``
does not unblock it, an expired ``wait(timeout)`` poisons the pair, ``is_completed()`` never turns
true before ``wait()``), while a rank talking to a killed peer gets a connection error within
~0.1 s and a gloo context that saw one pair fail closes its other pairs, which cascades the error
to the ranks waiting on it. So:

* every blocking wait runs ``work.wait()`` on a helper thread; the calling thread waits on an
  event in short slices and raises :class:`PeerFailure` as soon as either the helper reports an
  error (connection reset: a direct or cascaded peer failure) or the store's failure counter
  moved past this process's generation (a death anywhere, a hang found by heartbeats). A helper
  left blocked is abandoned; it ends when the old process group is torn down;
* a watcher thread with its own store client (a blocking call on a shared client can stall
  gloo's connection set-up) polls the counter and writes this rank's heartbeat;
* the agent (:mod:`launch.agent`) is the authority that turns an exited or silent rank into a
  failure record: ``failures`` is bumped (the new generation) and ``failure/<n>`` names the rank;
* while a process builds its first group and backend (:meth:`FailureMonitor.construction`), a
  recorded failure ends it at once with :data:`RESTART_EXIT_CODE`: it may sit in a plain
  collective (DeepSpeed's or megatron's ``new_group``, a parameter broadcast) that nothing can
  interrupt, and it has applied no step, so the agent simply starts it again (not a failure).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..runtime.p2p import launch

FAILURES_KEY = "failures"
ABORT_KEY = "abort"  # set (by an agent or a rank) when the whole job must stop; no respawn after it
# Set by the first rank through the final barrier: every rank has finished (summary written); a
# death after it is no failure to recover (== launch.agent.COMPLETE_KEY).
COMPLETE_KEY = "job_complete"
# A rank's exit code for "a peer failed while I was being built, start me again" (EX_TEMPFAIL);
# == launch.agent.EXIT_RESTART. Not a failure: nothing was applied, nothing is lost.
RESTART_EXIT_CODE = 75


def failure_key(n: int) -> str:
    return f"failure/{n}"


def heartbeat_key(rank: int) -> str:
    return f"heartbeat/{rank}"


def absent_key(rank: int) -> str:
    """Set by an agent while ``rank`` has no process and none is coming yet (``--respawn-delay``)."""
    return f"absent/{rank}"


def recovered_key(generation: int) -> str:
    """Set by a rank at the first good step after regrouping on ``generation`` (its recovery is over)."""
    return f"recovered/g{generation}"


def recovery_done(store: dist.TCPStore, generation: int) -> bool:
    """Whether the recovery of ``generation``, or of a newer one, reached its first good step."""
    return any(store.check([recovered_key(g)]) for g in range(generation, read_generation(store) + 1))


def absent_ranks(store: dist.TCPStore, world_size: int) -> list[int]:
    """Ranks without a process right now (every agent's ``absent/<rank>`` marks)."""
    return [r for r in range(world_size) if store.check([absent_key(r)])]


class PeerFailure(RuntimeError):
    """Another rank of the job failed (or this rank lost contact with it) during ``what``."""

    def __init__(self, message: str, generation: int | None = None):
        super().__init__(message)
        self.generation = generation


def connect_store(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    """A new client connection to the job's TCPStore (kept outside the workers, in the agent)."""
    return dist.TCPStore(host, port, world_size=None, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def read_generation(store: dist.TCPStore) -> int:
    """Current generation = number of failures the agents recorded (non-blocking)."""
    return int(store.add(FAILURES_KEY, 0))


@dataclass
class FailureRecord:
    generation: int
    rank: int
    reason: str
    time: float  # when the agent recorded it
    host: str = ""
    absent: tuple[int, ...] = ()  # ranks with no process when this was recorded (replacement delayed)
    kind: str = "failure"         # failure | join (delayed replacements start: the full group re-forms)

    @property
    def failed_at(self) -> float:
        """When the rank stopped answering: for a hang the agent's record comes a heartbeat timeout
        later, so count from the last heartbeat (the agent's reason says how long it was silent)."""
        m = _HANG_REASON.search(self.reason)
        return self.time - float(m.group(1)) if m else self.time


_HANG_REASON = re.compile(r"no heartbeat for ([0-9.]+) s")  # launch.agent's reason for a hang


def record_failure(store: dist.TCPStore, rank: int, reason: str, host: str = "",
                   at: float | None = None, absent: list[int] | None = None, kind: str = "failure") -> FailureRecord:
    """Agent side: bump the generation and describe the failure under ``failure/<generation>``.

    ``at``: when the failure happened, if known better than now (a lost host's last heartbeat).
    ``absent``: ranks that have no process now (their replacement is delayed); ``kind="join"``:
    not a failure but delayed replacements starting, so the survivors re-form the full group."""
    now = time.time() if at is None else at
    absent = sorted(absent or [])
    n = int(store.add(FAILURES_KEY, 1))
    store.set(failure_key(n), json.dumps({"rank": rank, "reason": reason, "time": now, "host": host,
                                          "absent": absent, "kind": kind}))
    return FailureRecord(n, rank, reason, now, host, tuple(absent), kind)


def failures_between(store: dist.TCPStore, old: int, new: int, timeout_s: float = 10.0) -> list[FailureRecord]:
    """The failure records of generations ``old+1 .. new`` (waits briefly for records being written)."""
    out = []
    for n in range(old + 1, new + 1):
        store.wait([failure_key(n)], datetime.timedelta(seconds=timeout_s))
        d = json.loads(store.get(failure_key(n)))
        out.append(FailureRecord(n, int(d["rank"]), d["reason"], float(d["time"]), d.get("host", ""),
                                 tuple(d.get("absent", ())), d.get("kind", "failure")))
    return out


class _Waiter:
    """One helper thread that runs ``work.wait()`` calls handed to it, one at a time."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="skipfree-waiter", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            work, box, done = self.jobs.get()
            try:
                work.wait()
            except BaseException as exc:  # reported to the caller, who raises PeerFailure
                box.append(exc)
            done.set()


class FailureMonitor:
    """Per-process watcher: heartbeats, generation polling and the failure-aware ``wait``.

    ``generation`` is the generation this process's current process group belongs to; after a
    regroup call :meth:`set_generation`. Timings: the counter is polled every ``poll_s`` and the
    heartbeat written every ``heartbeat_s``; a failure raises in ``wait`` within ``poll_s`` of the
    agent's record, or at once on a connection error.
    """

    def __init__(self, host: str, port: int, rank: int, generation: int, heartbeat_s: float = 0.5,
                 poll_s: float = 0.05, slice_s: float = 0.02, confirm_timeout_s: float = 30.0):
        self.host, self.port, self.rank = host, port, rank
        self.confirm_timeout_s = confirm_timeout_s
        self.generation = generation
        self.heartbeat_s, self.poll_s, self.slice_s = heartbeat_s, poll_s, slice_s
        self.latest = generation
        self.detected_at: float | None = None
        self._constructing: str | None = None  # what is being built (see :meth:`construction`)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiter = _Waiter()

    # ------------------------------------------------------------------ watcher thread
    def start(self) -> "FailureMonitor":
        self._thread = threading.Thread(target=self._watch, name="skipfree-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        store = connect_store(self.host, self.port)  # own client, never shared with gloo's rendezvous
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now >= next_beat:
                store.set(heartbeat_key(self.rank), repr(now))
                next_beat = now + self.heartbeat_s
            g = read_generation(store)
            if g > self.latest:
                self.latest = g
                if self.detected_at is None:
                    self.detected_at = time.time()
            if self._constructing is not None and self.failed:
                self.restart_process()
            self._stop.wait(self.poll_s)

    # ------------------------------------------------------------------ construction window
    @contextlib.contextmanager
    def construction(self, what: str):
        """While the block runs (this process's first group and backend are built, no step applied
        anywhere), a failure recorded past this generation ends the process with
        :data:`RESTART_EXIT_CODE` (from the watcher thread: the main thread may be blocked in a
        plain collective with the dead peer); a ``RuntimeError`` the block raises (gloo: a peer's
        reset connection) is such a failure when the agents record one within
        ``confirm_timeout_s``, else it is raised as it is."""
        self._constructing = what
        try:
            yield
        except RuntimeError as exc:
            self.restart_process(self.confirm_peer_failure(exc))
        finally:
            self._constructing = None

    def confirm_peer_failure(self, exc: RuntimeError) -> str:
        """A plain collective's error (gloo: a peer's reset connection) is a peer's failure once the
        agents record one within ``confirm_timeout_s``: returns the error in one line. Else it is this
        process's own error and is raised as it is."""
        try:
            self.wait_for_generation(self.generation, self.confirm_timeout_s)
        except PeerFailure:
            raise exc from None
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

    def restart_process(self, error: str = "") -> None:
        """End this process for the agent to start it again (a peer failed during its construction)."""
        print(f"rank {self.rank}: a peer failed (generation {self.latest} > {self.generation}) during "
              f"{self._constructing or 'construction'}{' (' + error + ')' if error else ''}; nothing was applied "
              f"yet: exiting with code {RESTART_EXIT_CODE} for the agent to start this rank again",
              file=sys.stderr, flush=True)
        os._exit(RESTART_EXIT_CODE)

    # ------------------------------------------------------------------ state
    @property
    def failed(self) -> bool:
        """A failure was recorded after this process's generation began."""
        return self.latest > self.generation

    def set_generation(self, generation: int) -> None:
        """Regrouped on ``generation``: failures up to it are handled; start a fresh waiter thread."""
        self.generation = generation
        self.latest = max(self.latest, generation)
        self.detected_at = None
        self._waiter = _Waiter()  # the old one may be stuck on a wait of the dead group

    def check(self, what: str = "") -> None:
        """Raise :class:`PeerFailure` if a failure was recorded (cheap: reads a cached counter)."""
        if self.failed:
            raise PeerFailure(f"rank {self.rank}: failure recorded (generation {self.latest} > "
                              f"{self.generation}){' during ' + what if what else ''}", self.latest)

    def wait_for_generation(self, above: int, timeout_s: float) -> int:
        """Block until the agents recorded a failure past ``above``; returns the new generation."""
        deadline = time.time() + timeout_s
        while self.latest <= above:
            if time.time() > deadline:
                raise PeerFailure(f"rank {self.rank}: lost contact with a peer but no agent recorded a failure "
                                  f"within {timeout_s:.0f} s (generation stays {above}); the error was not a "
                                  f"rank failure")
            time.sleep(self.poll_s / 2)
        return self.latest

    # ------------------------------------------------------------------ failure-aware wait
    def wait(self, work: Any, what: str) -> None:
        """``work.wait()`` that raises :class:`PeerFailure` within ``poll_s`` of a recorded failure.

        Matches ``RoutedP2P``'s ``wait(work, what)`` hook; also used for collectives.
        """
        self.check(what)
        box: list[BaseException] = []
        done = threading.Event()
        self._waiter.jobs.put((work, box, done))
        while not done.wait(self.slice_s):
            if self.failed:
                self._waiter = _Waiter()  # this one stays blocked until the old group is torn down
                self.check(what)
        if box:
            if self.detected_at is None:
                self.detected_at = time.time()
            raise PeerFailure(f"rank {self.rank}: {what} failed: {str(box[0]).splitlines()[0][:200]}",
                              self.latest) from box[0]


def all_reduce(tensor: torch.Tensor, monitor: FailureMonitor, what: str, group=None,
               op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Failure-aware in-place all-reduce (async launch + :meth:`FailureMonitor.wait`)."""
    monitor.wait(launch(dist.all_reduce, tensor, op=op, group=group, async_op=True), what)
    return tensor


def all_gather_object(obj: Any, monitor: FailureMonitor, what: str, world_size: int) -> list[Any]:
    """Failure-aware all-gather of small picklable objects (one int64 length round, one payload round)."""
    import io
    import pickle

    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    monitor.wait(launch(dist.all_gather, sizes, torch.tensor([payload.numel()]), async_op=True), what)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[:payload.numel()] = payload
    outs = [torch.zeros(width, dtype=torch.uint8) for _ in range(world_size)]
    monitor.wait(launch(dist.all_gather, outs, padded, async_op=True), what)
    return [pickle.load(io.BytesIO(o[:int(s.item())].numpy().tobytes())) for o, s in zip(outs, sizes)]
