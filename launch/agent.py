"""Per-host agent for fault-tolerant runs: spawns ranks, respawns only a dead one, replaces a lost host.

    python -m launch.agent --nproc 5 -- integration/train.py preset=recovery_test train.steps=20
    python -m launch.store --port 29400 --nnodes 2 &                                 # the job's store
    python -m launch.agent --external-store --store-host H --store-port 29400 --nnodes 2 --node-rank 1 --nproc 2 -- ...
    python -m launch.agent --external-store --store-host H --store-port 29400 --nnodes 2 --spare-host --nproc 2 -- ...

Why not the deepspeed launcher or torchrun: the former kills every local rank when one dies, the
latter restarts all workers (their in-memory weights and optimizer state are lost). This agent:

* uses the job's TCPStore outside the workers: node 0's agent hosts it, or, with
  ``--external-store``, a separate ``python -m launch.store`` process does (then no agent holds
  anything the job needs, and losing any training host, its agent included, is survivable);
* watches its local ranks: an exit with a non-zero code or a signal, or a heartbeat older than
  ``--heartbeat-timeout`` (a hung rank; it is SIGKILLed first), is recorded as a failure, which
  bumps the job's generation (:func:`integration.recovery.detect.record_failure`);
* respawns only that rank with ``SKIPFREE_GENERATION``/``SKIPFREE_JOINING=1`` set, or promotes a
  pre-started hot spare (``--hot-spares``: processes that already paid the import cost and wait in
  :func:`integration.recovery.context.RankContext.from_env` for a store assignment);
* heartbeats itself in the store and keeps a liveness connection to the store process
  (:class:`launch.store.LivenessListener`); a ``--spare-host`` agent waits, and when a training
  host's agent's liveness connection ended without a goodbye (its process died, or TCP keepalive
  gave up on its host: recorded by the store at once), or its heartbeat is silent for
  ``--host-timeout`` seconds (the fallback, e.g. for a store without the listener) (the host is lost, or only its agent: its ranks
  die with it, see below) it claims that host's node rank (first claim wins), records one failure
  per rank of the lost host (naming the host) and starts them as joining ranks, and the ladder
  rebuilds their stages. An agent that finds its node claimed by another stops its ranks;
* with ``--respawn-delay S`` holds a lost rank's replacement back S seconds (a node that comes back
  later): the rank is marked absent in the store meanwhile (survivors may re-plan around it,
  ``docs/replan.md``), then its replacement boots and, once ready, joins under one ``join``
  generation (several delayed ranks of a host join together);
* passes everything after ``--`` to the workers unchanged (Hydra overrides included). Workers die
  with their agent (``PR_SET_PDEATHSIG``): an agent killed with SIGKILL leaves no orphan rank.

Restarts: more than ``--max-restarts`` failures within ``--restart-window`` seconds (a crash loop)
sets the store key ``abort`` and every agent stops its ranks; a long run that loses a node every
few minutes keeps going. ``--restart-window 0`` counts over the whole run.

A worker that exits 75 (a peer failed while it was being built, before any step) is started again
as it was started, without a failure record and not counted: nothing was lost.

Exit codes: 0 the job finished; 1 the job stopped (gave up, aborted, or this agent was replaced);
2 bad input (a bad agent flag, or a worker exited 2: a config error is never respawned, every
agent stops); 128+N stopped by signal N (SIGTERM: 143, SIGINT: 130): the agent stops its workers,
records the stop in the store (the job stops) and writes ``agent<node>.json`` under ``--log-dir``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# The store keys shared with the workers; detect.py imports torch, which flag checks and --help
# should not wait for, so it is imported when an Agent is built.
ABORT_KEY = "abort"  # == integration.recovery.detect.ABORT_KEY (checked in Agent.__init__)

FINISHED_KEY = "agents_finished"
# Set by the first rank through the final barrier (== integration.recovery.detect.COMPLETE_KEY):
# every rank wrote its summary, so a rank that dies now has nothing left to do and is not replaced.
COMPLETE_KEY = "job_complete"
ABORT_CODE_KEY = "abort_code"  # exit code every agent reports once the job was aborted (2: bad input)
EXIT_OK, EXIT_STOPPED, EXIT_BAD_INPUT = 0, 1, 2
# A worker's "start me again" (== integration.recovery.detect.RESTART_EXIT_CODE): a peer failed while
# it was being built; that failure is already recorded and counted, the restart is not a failure.
EXIT_RESTART = 75


def spare_key(node: int | str, index: int) -> str:
    return f"spare/{node}/{index}"


def spare_ready_key(node: int | str, index: int) -> str:
    """Set by a spare once it waits for its assignment (imports, data and plan done)."""
    return f"{spare_key(node, index)}/ready"


def owner_key(node: int) -> str:
    return f"node/{node}/owner"


def host_key(node: int) -> str:
    return f"node/{node}/host"


def done_key(node: int) -> str:
    return f"node/{node}/done"


def agent_heartbeat_key(agent_id: str) -> str:
    return f"agent/{agent_id}/heartbeat"


try:  # resolved once here: the child between fork and exec must not load libraries
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the agent dies (Linux), so no rank outlives its agent."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen
    started: float
    spare: bool = False
    kill_reason: str | None = None
    generation: int = 0   # the generation it was started with (a restart starts it the same way)
    joining: bool = False


@dataclass
class AgentConfig:
    nproc: int
    command: list[str]
    nnodes: int = 1
    node_rank: int = 0
    store_host: str = "127.0.0.1"
    store_port: int = 0
    external_store: bool = False
    spare_host: bool = False
    host_name: str = ""
    hot_spares: int = 0
    heartbeat_timeout: float = 10.0
    host_timeout: float = 10.0
    startup_grace: float = 120.0
    max_restarts: int = 10
    restart_window: float = 600.0
    poll_s: float = 0.05
    log_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    rank_order: str = "block"
    respawn_delay: float = 0.0  # seconds a lost rank stays without a process before its replacement starts

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def ranks_of(self, node: int) -> list[int]:
        """Global ranks of training host ``node``: consecutive (block) or every nnodes-th (strided).

        Strided puts the replicas of a stage (consecutive ranks in the stage-major grid) on
        different hosts, so a lost host loses at most one replica of a stage."""
        if self.rank_order == "strided":
            return [node + i * self.nnodes for i in range(self.nproc)]
        return list(range(node * self.nproc, (node + 1) * self.nproc))

    def local_rank(self, rank: int) -> int:
        return rank // self.nnodes if self.rank_order == "strided" else rank % self.nproc


class _Stop(Exception):
    """The agent received SIGTERM/SIGINT."""


class Agent:
    """One host's agent. :meth:`run` returns the exit code of the job as seen from this host."""

    def __init__(self, cfg: AgentConfig):
        import torch.distributed as dist

        from integration.recovery import detect

        assert detect.ABORT_KEY == ABORT_KEY and detect.RESTART_EXIT_CODE == EXIT_RESTART
        assert detect.COMPLETE_KEY == COMPLETE_KEY
        self.detect = detect  # failure records, generation, rank heartbeats: the workers' side of the contract

        self.cfg = cfg
        self.hosts_store = cfg.node_rank == 0 and not cfg.external_store and not cfg.spare_host
        self.store = dist.TCPStore(cfg.store_host, cfg.store_port, world_size=None, is_master=self.hosts_store,
                                   wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=60 if self.hosts_store else 300))
        cfg.store_port = self.store.port
        self.host = cfg.host_name or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.agent_id = f"{self.host}-{os.getpid()}"
        self.ranks: dict[int, _Rank] = {}
        self.spares: list[tuple[int, subprocess.Popen]] = []
        self.spare_count = 0
        self.failure_times: list[float] = []
        self.failures: list[dict] = []
        self.late_failures: list[dict] = []  # deaths after the job completed (no recovery needed)
        self.done: set[int] = set()
        self.delayed: dict[int, float] = {}  # rank -> when its failure was seen (--respawn-delay)
        self.signal: int | None = None
        self._beat_stop = threading.Event()
        self._liveness: socket.socket | None = None
        self._next_owner_check = 0.0
        # (generation, since): hot spares used up by that recovery are started again once it is over
        self._refill_after: tuple[int, float] | None = None
        self.worker_env = self._network_env()

    # ------------------------------------------------------------------ environment
    def _network_env(self) -> dict[str, str]:
        """Under SLURM, point gloo at the interface holding this node's address (hostnames may not resolve)."""
        if "GLOO_SOCKET_IFNAME" in os.environ or "SLURMD_NODENAME" not in os.environ:
            return {}
        from launch.slurm_env import interface_for, node_address
        iface = interface_for(node_address(os.environ["SLURMD_NODENAME"]))
        return {"GLOO_SOCKET_IFNAME": iface} if iface else {}

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.worker_env)
        env.update(self.cfg.env)
        env.setdefault("OMP_NUM_THREADS", "1")
        ext = Path(sys.prefix) / "torch_extensions"  # launch/setup.sh builds DeepSpeed's CPU op there
        if (ext / ".skipfree-built").exists():
            env.setdefault("TORCH_EXTENSIONS_DIR", str(ext))
        # No LOCAL_SIZE: with it DeepSpeed's CPU backend sets up a shared-memory all-reduce whose
        # init-time handshake a replacement can never complete (it spins, holding the GIL, on the
        # survivors' long-unlinked buffers: no heartbeat, a false hang). We do not use that path.
        env.pop("LOCAL_SIZE", None)
        env.update({"WORLD_SIZE": str(self.cfg.world_size), "SKIPFREE_LOCAL_SIZE": str(self.cfg.nproc),
                    "MASTER_ADDR": self.cfg.store_host, "MASTER_PORT": str(self.cfg.store_port),
                    "SKIPFREE_STORE_HOST": self.cfg.store_host, "SKIPFREE_STORE_PORT": str(self.cfg.store_port),
                    "TORCHELASTIC_USE_AGENT_STORE": "True",  # env:// connects as a client of our store
                    "SKIPFREE_NODE": str(self.cfg.node_rank), "SKIPFREE_HOST": self.host})
        env.update(extra)
        return env

    def _popen(self, extra: dict[str, str], tag: str) -> subprocess.Popen:
        out = None
        if self.cfg.log_dir:
            Path(self.cfg.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(self.cfg.log_dir) / f"{tag}.log", "ab")
        return subprocess.Popen([sys.executable, *self.cfg.command], env=self._env(extra), stdout=out,
                                stderr=subprocess.STDOUT if out else None, cwd=os.getcwd(),
                                preexec_fn=_die_with_parent)

    def _rank_env(self, rank: int, generation: int, joining: bool) -> dict[str, str]:
        return {"RANK": str(rank), "LOCAL_RANK": str(self.cfg.local_rank(rank)),
                "SKIPFREE_GENERATION": str(generation), "SKIPFREE_JOINING": "1" if joining else "0"}

    @property
    def _spare_tag(self) -> str:
        return f"s-{self.agent_id}" if self.cfg.spare_host else str(self.cfg.node_rank)

    def _start_spare(self) -> None:
        idx = self.spare_count
        self.spare_count += 1
        proc = self._popen({"SKIPFREE_SPARE": spare_key(self._spare_tag, idx)}, f"spare{idx}-{self.host}")
        self.spares.append((idx, proc))

    def _respawn(self, rank: int, generation: int) -> str:
        while self.spares:
            idx, proc = self.spares.pop(0)
            if proc.poll() is None:
                self.store.set(spare_key(self._spare_tag, idx),
                               json.dumps({"rank": rank, "generation": generation,
                                           "local_rank": self.cfg.local_rank(rank)}))
                self.ranks[rank] = _Rank(rank, proc, time.time(), spare=True, generation=generation, joining=True)
                self._defer_refill(generation)
                return f"promoted hot spare {idx} (pid {proc.pid})"
        proc = self._popen(self._rank_env(rank, generation, True), f"rank{rank}-g{generation}")
        self.ranks[rank] = _Rank(rank, proc, time.time(), generation=generation, joining=True)
        return f"spawned pid {proc.pid}"

    def _defer_refill(self, generation: int) -> None:
        """Replace used hot spares only after the recovery's first good step: a new spare's start-up
        (imports, config, data) would take CPU from the joining ranks exactly when they need it."""
        since = self._refill_after[1] if self._refill_after else time.time()
        self._refill_after = (max(generation, self._refill_after[0] if self._refill_after else 0), since)

    def _maybe_refill(self) -> None:
        """Start the deferred hot spares once that recovery (or a newer one) reached its first good
        step (:func:`integration.recovery.detect.recovery_done`), or ``--startup-grace`` s at most."""
        if self._refill_after is None:
            return
        generation, since = self._refill_after
        waited = time.time() - since
        if not self.detect.recovery_done(self.store, generation) and waited < self.cfg.startup_grace:
            return
        self._refill_after = None
        self.spares = [(i, p) for i, p in self.spares if p.poll() is None]
        started = 0
        while len(self.spares) < self.cfg.hot_spares:
            self._start_spare()
            started += 1
        if started:
            self.log("spares_refilled", started=started, generation=generation, after_s=round(waited, 2))

    def log(self, event: str, **fields) -> None:
        rec = {"agent": self.cfg.node_rank if self.ranks or not self.cfg.spare_host else "spare", "host": self.host,
               "event": event, "time": round(time.time(), 3), **fields}
        print("agent: " + json.dumps(rec), file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ liveness of this agent
    def _heartbeat(self) -> None:
        """Own store client and thread: a busy main loop never makes this agent look lost."""
        from integration.recovery.detect import connect_store

        try:
            store = connect_store(self.cfg.store_host, self.cfg.store_port)
            while not self._beat_stop.is_set():
                store.set(agent_heartbeat_key(self.agent_id), repr(time.time()))
                self._beat_stop.wait(0.5)
        except Exception:  # the store went away at the job's end; nothing to report to
            return

    def _connect_liveness(self) -> None:
        """One TCP connection to the store process's liveness port, held open for this agent's life:
        if this process dies, the kernel closes it and the store records the loss at once."""
        from launch.store import LIVENESS_PORT_KEY

        if not self.cfg.external_store:
            return  # node 0 hosts the store: there is no spare host to tell
        deadline = time.time() + 2.0
        while not self.store.check([LIVENESS_PORT_KEY]):  # published right after the store starts
            if time.time() > deadline:
                self.log("liveness", connected=False, reason="the store publishes no liveness port; "
                                                             "host loss is found by --host-timeout only")
                return
            time.sleep(0.05)
        port = int(self.store.get(LIVENESS_PORT_KEY))
        try:
            self._liveness = socket.create_connection((self.cfg.store_host, port), timeout=10)
            self._liveness.sendall(self.agent_id.encode() + b"\n")
        except OSError as exc:
            self._liveness = None
            self.log("liveness", connected=False, reason=f"{self.cfg.store_host}:{port}: {exc}")

    def _say_goodbye(self) -> None:
        """A clean exit is not a loss: tell the store before the connection closes."""
        from launch.store import GOODBYE

        if self._liveness is not None:
            try:
                self._liveness.sendall(GOODBYE)
                self._liveness.close()
            except OSError:
                pass
            self._liveness = None

    def _claim(self, node: int) -> None:
        self.store.set(owner_key(node), self.agent_id)
        self.store.set(host_key(node), self.host)

    def _deposed(self) -> bool:
        """Another agent claimed this node (this one was silent too long): stop, never run twice."""
        now = time.time()
        if self.cfg.nnodes == 1 and not self.cfg.external_store or now < self._next_owner_check:
            return False
        self._next_owner_check = now + 0.5
        return self.store.get(owner_key(self.cfg.node_rank)).decode() != self.agent_id

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        def on_signal(signum, _frame):
            self.signal = signum
            raise _Stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        beat = threading.Thread(target=self._heartbeat, name="agent-heartbeat", daemon=True)
        clean = True
        try:
            beat.start()
            self._connect_liveness()
            if self.cfg.spare_host:
                rc = self._wait_as_spare()
                if rc is not None:
                    return rc
            else:
                self._claim(self.cfg.node_rank)
                self._start_ranks(self.detect.read_generation(self.store), joining=False)
            return self._loop()
        except _Stop:
            return self._stopped()
        except BaseException:
            clean = False  # an agent that crashed lost its node: let a spare host take it
            raise
        finally:
            self._beat_stop.set()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self._stop_all()
            if clean:
                self._say_goodbye()

    def _start_ranks(self, generation: int, joining: bool) -> None:
        for rank in self.cfg.ranks_of(self.cfg.node_rank):
            if joining:
                how = self._respawn(rank, generation)
            else:
                self.ranks[rank] = _Rank(rank, self._popen(self._rank_env(rank, generation, False),
                                                           f"rank{rank}-g{generation}"), time.time(),
                                         generation=generation)
                how = "started"
            if joining:
                self.log("replaced", rank=rank, generation=generation, respawn=how)
        if joining:
            self._defer_refill(generation)
        while not joining and len(self.spares) < self.cfg.hot_spares:
            self._start_spare()
        self.log("started", node=self.cfg.node_rank, ranks=list(self.ranks),
                 store=f"{self.cfg.store_host}:{self.cfg.store_port}", hot_spares=self.cfg.hot_spares)

    def _abort(self, reason: str, code: int = EXIT_STOPPED) -> None:
        self.store.compare_set(ABORT_CODE_KEY, "", str(code))
        self.store.compare_set(ABORT_KEY, "", reason)

    def _abort_code(self) -> int:
        return int(self.store.get(ABORT_CODE_KEY)) if self.store.check([ABORT_CODE_KEY]) else EXIT_STOPPED

    def _stopped(self) -> int:
        name = signal.Signals(self.signal).name if self.signal else "a signal"
        reason = f"agent of node {self.cfg.node_rank} ({self.host}) stopped by {name}"
        try:
            self._abort(reason, 128 + (self.signal or 15))
        except Exception:
            pass
        self.log("stopped", signal=name, reason=reason, ranks=sorted(self.ranks))
        self._write_summary("stopped", reason)
        return 128 + (self.signal or 15)

    def _write_summary(self, outcome: str, reason: str = "") -> None:
        if not self.cfg.log_dir:
            return
        Path(self.cfg.log_dir).mkdir(parents=True, exist_ok=True)
        name = f"agent{self.cfg.node_rank}.json" if not self.cfg.spare_host or self.ranks else f"agent-spare-{self.host}.json"
        Path(self.cfg.log_dir, name).write_text(json.dumps(
            {"outcome": outcome, "reason": reason, "host": self.host, "node": self.cfg.node_rank,
             "ranks": sorted(self.ranks), "finished": sorted(self.done), "failures": self.failures,
             "after_completion": self.late_failures,
             "time": time.time()}, indent=1))

    # ------------------------------------------------------------------ spare host
    def _wait_as_spare(self) -> int | None:
        """Wait until a training host is lost, then take its place; None = took over (run the loop)."""
        for _ in range(self.cfg.hot_spares):
            self._start_spare()
        self.log("waiting", spare_host=True, hot_spares=self.cfg.hot_spares, nnodes=self.cfg.nnodes)
        while True:
            if self.store.check([ABORT_KEY]):
                self.log("abort", reason=self.store.get(ABORT_KEY).decode())
                return self._abort_code()
            if int(self.store.add(FINISHED_KEY, 0)) >= self.cfg.nnodes:
                self.log("finished", spare_host=True)
                return EXIT_OK
            for node in range(self.cfg.nnodes):
                if self._try_take_over(node):
                    return None
            time.sleep(max(self.cfg.poll_s, 0.1))

    def _try_take_over(self, node: int) -> bool:
        from launch.store import agent_gone_key

        if not self.store.check([owner_key(node)]) or self.store.check([done_key(node)]):
            return False
        owner = self.store.get(owner_key(node)).decode()
        key, gkey = agent_heartbeat_key(owner), agent_gone_key(owner)
        last = float(self.store.get(key)) if self.store.check([key]) else None
        gone = float(self.store.get(gkey)) if self.store.check([gkey]) else None
        if gone is None and (last is None or time.time() - last <= self.cfg.host_timeout):
            return False  # alive (or not started yet: its start-up is the other agent's business)
        if self.store.compare_set(owner_key(node), owner, self.agent_id).decode() != self.agent_id:
            return False  # another spare host was faster
        lost = self.store.get(host_key(node)).decode()
        self.cfg.node_rank = node
        ranks = self.cfg.ranks_of(node)
        if gone is not None:  # the store saw the agent's connection end: the moment of the loss
            silent, at, how = time.time() - gone, gone, "connection"
            reason = f"host {lost} lost (its agent's store connection dropped {silent:.1f} s ago)"
        else:
            silent, at, how = time.time() - last, last, "timeout"
            reason = f"host {lost} lost (its agent silent {silent:.1f} s)"
        # One record per lost rank, all timed from the host's loss; coalesced by the workers.
        recs = [self.detect.record_failure(self.store, r, reason, lost, at=at) for r in ranks]
        self.failures.append({"host": lost, "ranks": ranks, "reason": reason, "generation": recs[-1].generation})
        self._count_restart(f"host {lost}")
        self.store.set(host_key(node), self.host)
        self.log("host_lost", node=node, host=lost, ranks=ranks, silent_s=round(silent, 2), detected_by=how,
                 generation=recs[-1].generation, replaced_by=self.host)
        self._start_ranks(recs[-1].generation, joining=True)
        return True

    # ------------------------------------------------------------------ training host
    def _count_restart(self, what: str) -> bool:
        """Record a failure; False (and abort) past the restart limit."""
        now = time.time()
        self.failure_times.append(now)
        window = self.cfg.restart_window
        recent = [t for t in self.failure_times if window <= 0 or now - t <= window]
        if len(recent) > self.cfg.max_restarts:
            span = f"within {window:.0f} s" if window > 0 else "in this run"
            self._abort(f"{what} failed; more than {self.cfg.max_restarts} restarts {span}")
            self.log("give_up", what=what, restarts=len(recent))
            return False
        return True

    def _loop(self) -> int:
        while True:
            if self.store.check([ABORT_KEY]):
                self.log("abort", reason=self.store.get(ABORT_KEY).decode())
                self._write_summary("aborted", self.store.get(ABORT_KEY).decode())
                return self._abort_code()
            if self._deposed():
                self.log("deposed", node=self.cfg.node_rank, reason="another agent took over this node")
                return EXIT_STOPPED
            for rank, r in list(self.ranks.items()):
                if rank in self.done:
                    continue
                rc = r.proc.poll()
                if rc is None:
                    self._check_heartbeat(r)
                    continue
                if rc == 0:
                    self.done.add(rank)
                    continue
                if self.store.check([ABORT_KEY]):  # the job gave up (e.g. unrecoverable loss): no respawn
                    self.log("abort", rank=rank, reason=self.store.get(ABORT_KEY).decode())
                    return self._abort_code()
                if rc == EXIT_BAD_INPUT and not r.kill_reason:
                    reason = f"rank {rank} refused its input (exit code 2; its message says which field)"
                    self._abort(reason, EXIT_BAD_INPUT)
                    self.log("bad_input", rank=rank, reason=reason)
                    self._write_summary("bad_input", reason)
                    return EXIT_BAD_INPUT
                if rc == EXIT_RESTART and not r.kill_reason:
                    self._restart(r)
                    continue
                reason = r.kill_reason or (f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}")
                if self.store.check([COMPLETE_KEY]):  # past the final barrier: its work (and summary) is done
                    self.done.add(rank)
                    self.late_failures.append({"rank": rank, "reason": reason})
                    self.log("failure_after_completion", rank=rank, reason=reason)
                    continue
                absent = None
                if self.cfg.respawn_delay > 0:  # no process for this rank until the delay ran out
                    self.store.set(self.detect.absent_key(rank), "1")
                    absent = self.detect.absent_ranks(self.store, self.cfg.world_size)
                rec = self.detect.record_failure(self.store, rank, reason, self.host, absent=absent)
                self.failures.append({"rank": rank, "reason": reason, "generation": rec.generation})
                if not self._count_restart(f"rank {rank} ({reason})"):
                    self._write_summary("gave_up", reason)
                    return EXIT_STOPPED
                if self.cfg.respawn_delay > 0:
                    self._delay(rank, reason, rec)
                    continue
                how = self._respawn(rank, rec.generation)
                self.log("failure", rank=rank, reason=reason, generation=rec.generation, respawn=how)
            self._maybe_refill()
            if self.delayed and time.time() >= max(self.delayed.values()) + self.cfg.respawn_delay:
                self._respawn_delayed()
            if len(self.done) == len(self.ranks) and (self.done or not self.delayed):
                if self.delayed:
                    self.log("respawn_cancelled", ranks=sorted(self.delayed), reason="the other ranks finished")
                    self.delayed.clear()
                self.log("finished", ranks=sorted(self.done))
                self.store.set(done_key(self.cfg.node_rank), "1")
                self.store.add(FINISHED_KEY, 1)
                self._write_summary("finished")
                if self.hosts_store:
                    self._wait_other_agents()  # the store lives here: keep it up until every agent is done
                return EXIT_OK
            time.sleep(self.cfg.poll_s)

    def _restart(self, r: _Rank) -> None:
        """A worker that exited :data:`EXIT_RESTART` (a peer failed during its construction, before any
        step: nothing is lost) starts again as it was started, and settles on the newer generation.
        Not a failure: no record, not counted against ``--max-restarts`` (the peer's failure was)."""
        if r.joining:
            how = self._respawn(r.rank, r.generation)
        else:
            proc = self._popen(self._rank_env(r.rank, r.generation, False), f"rank{r.rank}-g{r.generation}-restart")
            self.ranks[r.rank] = _Rank(r.rank, proc, time.time(), generation=r.generation)
            how = f"spawned pid {proc.pid}"
        self.log("restart", rank=r.rank, reason=f"exit code {EXIT_RESTART}: a peer failed during its construction",
                 generation=self.detect.read_generation(self.store), respawn=how)

    def _delay(self, rank: int, reason: str, rec) -> None:
        """``--respawn-delay``: the rank has no process for now (survivors may re-plan around it)."""
        del self.ranks[rank]
        self.delayed[rank] = time.time()
        self.log("failure", rank=rank, reason=reason, generation=rec.generation,
                 respawn=f"delayed {self.cfg.respawn_delay:g} s", absent=list(rec.absent))

    def _respawn_delayed(self) -> None:
        """Every delayed rank of this host gets its replacement at once, announced as one ``join``
        generation once the replacements are ready (spares that finished their imports and wait for
        a rank): the survivors leave their smaller group and re-form the full one with them."""
        ranks = sorted(self.delayed)
        self.spares = [(i, p) for i, p in self.spares if p.poll() is None]
        while len(self.spares) < len(ranks):
            self._start_spare()  # the replacement "node" boots
        ready = [(i, p) for i, p in self.spares if self.store.check([spare_ready_key(self._spare_tag, i)])]
        if len(ready) < len(ranks):
            return  # still importing: the survivors keep training meanwhile
        self.spares = ready + [(i, p) for i, p in self.spares if (i, p) not in ready]
        for rank in ranks:
            self.store.delete_key(self.detect.absent_key(rank))
        self.delayed.clear()
        rec = self.detect.record_failure(self.store, ranks[0], f"replacement(s) for rank(s) {ranks} join after "
                                         f"--respawn-delay {self.cfg.respawn_delay:g} s", self.host,
                                         absent=self.detect.absent_ranks(self.store, self.cfg.world_size),
                                         kind="join")
        for rank in ranks:
            how = self._respawn(rank, rec.generation)
            self.log("replaced", rank=rank, generation=rec.generation, respawn=how, after_delay=True)

    def _wait_other_agents(self) -> None:
        while int(self.store.add(FINISHED_KEY, 0)) < self.cfg.nnodes and not self.store.check([ABORT_KEY]):
            time.sleep(self.cfg.poll_s)

    def _check_heartbeat(self, r: _Rank) -> None:
        if self.cfg.heartbeat_timeout <= 0 or r.kill_reason:
            return
        now = time.time()
        key = self.detect.heartbeat_key(r.rank)
        last = float(self.store.get(key)) if self.store.check([key]) else 0.0
        if last < r.started:  # no beat from this process yet: allow start-up time
            silent, limit = now - r.started, self.cfg.startup_grace
        else:
            silent, limit = now - last, self.cfg.heartbeat_timeout
        if silent > limit:
            r.kill_reason = f"hang (no heartbeat for {silent:.1f} s)"
            self.log("hang", rank=r.rank, silent_s=round(silent, 2))
            r.proc.send_signal(signal.SIGKILL)  # SIGKILL also ends a SIGSTOPped process

    def _stop_all(self) -> None:
        procs = [r.proc for r in self.ranks.values()] + [p for _, p in self.spares]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.agent", usage="python -m launch.agent [options] -- script.py [hydra overrides ...]",
        description=__doc__.split("\n\n")[0], epilog="Exit codes: 0 finished, 1 stopped (gave up / aborted / "
        "replaced), 2 bad input (agent flag or a worker's exit 2, never respawned), 128+N stopped by signal N.")
    p.add_argument("--nproc", type=int, required=True, help="ranks on this host (>= 1)")
    p.add_argument("--nnodes", type=int, default=1, help="training hosts in the job (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this host's index among the training hosts")
    p.add_argument("--store-host", default="127.0.0.1", help="address of the job's store")
    p.add_argument("--store-port", type=int, default=0,
                   help="port of the job's store; 0: node 0 picks a free one (without --external-store only)")
    p.add_argument("--external-store", action="store_true",
                   help="the store is a separate process (python -m launch.store); no agent hosts it")
    p.add_argument("--spare-host", action="store_true",
                   help="this host trains nothing at first: it waits and takes the place of a lost host "
                        "(needs --external-store)")
    p.add_argument("--host-name", default="", help="name for this host in events (default $SLURMD_NODENAME "
                                                    "or the hostname)")
    p.add_argument("--hot-spares", "--spares", dest="hot_spares", type=int, default=0,
                   help="pre-started replacement processes on this host (default 0)")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds without a rank's heartbeat before it counts as hung and is killed; 0: off")
    p.add_argument("--host-timeout", type=float, default=10.0,
                   help="seconds without an agent's heartbeat before a spare host takes over its node")
    p.add_argument("--startup-grace", type=float, default=120.0,
                   help="seconds a new rank may take before its first heartbeat")
    p.add_argument("--max-restarts", type=int, default=10,
                   help="give up (stop the job) after more than this many failures within --restart-window "
                        "(default 10: a crash loop stops, a long run with occasional failures goes on)")
    p.add_argument("--restart-window", type=float, default=600.0,
                   help="seconds over which --max-restarts counts failures (default 600; 0: the whole run)")
    p.add_argument("--rank-order", choices=("block", "strided"), default="block",
                   help="which ranks a host runs: block (node k: k*nproc ..) or strided (node k: k, k+nnodes, ..: "
                        "the replicas of a stage on different hosts, so a lost host is a replica copy)")
    p.add_argument("--respawn-delay", type=float, default=0.0,
                   help="seconds a lost rank stays without a process before its replacement starts (default 0: at "
                        "once); meanwhile the survivors wait, or re-plan around it with routing.replan.enabled=true")
    p.add_argument("--log-dir", default=None, help="per-process logs and agent<node>.json here")
    return p


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if "--" not in argv:
        if any(a in ("-h", "--help") for a in argv):
            p.parse_args(["--help"])
        p.error("missing '--' before the worker command: python -m launch.agent [options] -- script.py [overrides]")
    cut = argv.index("--")
    a = p.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if a.nproc < 1:
        p.error(f"--nproc: must be >= 1 (ranks on this host), got {a.nproc}")
    if a.nnodes < 1:
        p.error(f"--nnodes: must be >= 1, got {a.nnodes}")
    if not a.spare_host and not 0 <= a.node_rank < a.nnodes:
        p.error(f"--node-rank: must be in 0..{a.nnodes - 1} (--nnodes {a.nnodes}), got {a.node_rank}")
    if not 0 <= a.store_port <= 65535:
        p.error(f"--store-port: {a.store_port} is not a TCP port (0-65535)")
    if (a.node_rank > 0 or a.external_store or a.spare_host) and not a.store_port:
        p.error("--store-port: required unless this is node 0 hosting the store (set the port the store listens on)")
    if a.spare_host and not a.external_store:
        p.error("--spare-host: needs --external-store (a spare must not host the store it waits on)")
    for name in ("hot_spares", "max_restarts"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(a, name)}")
    for name in ("heartbeat_timeout", "host_timeout", "startup_grace", "restart_window", "respawn_delay"):
        v = getattr(a, name)
        if not v == v or v < 0 or v == float("inf"):
            p.error(f"--{name.replace('_', '-')}: must be a finite number >= 0, got {v}")
    if a.host_timeout == 0:
        p.error("--host-timeout: must be > 0 seconds")
    if not command:
        p.error("nothing to run after '--': give the worker script and its overrides")
    return AgentConfig(nproc=a.nproc, command=command, nnodes=a.nnodes, node_rank=0 if a.spare_host else a.node_rank,
                       store_host=a.store_host, store_port=a.store_port, external_store=a.external_store,
                       spare_host=a.spare_host, host_name=a.host_name, hot_spares=a.hot_spares,
                       heartbeat_timeout=a.heartbeat_timeout, host_timeout=a.host_timeout,
                       startup_grace=a.startup_grace, max_restarts=a.max_restarts,
                       restart_window=a.restart_window, log_dir=a.log_dir, rank_order=a.rank_order,
                       respawn_delay=a.respawn_delay)


def main(argv: list[str] | None = None) -> int:
    return Agent(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
