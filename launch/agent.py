"""Per-host agent for fault-tolerant runs: spawns ranks, respawns only a dead one, bumps the generation.

    python -m launch.agent --nproc 5 -- integration/recovery/worker.py recovery=checkfree train.steps=20
    python -m launch.agent --nnodes 2 --node-rank 1 --nproc 4 --store-host node0 --store-port 29500 -- ...

Why not the deepspeed launcher or torchrun: the former kills every local rank when one dies, the
latter restarts all workers (their in-memory weights and optimizer state are lost). This agent:

* keeps the job's TCPStore outside the workers (node 0's agent hosts it; other agents and all
  workers connect as clients), so a worker's death never takes the rendezvous down;
* watches its local ranks: an exit with a non-zero code or a signal, or a heartbeat older than
  ``--heartbeat-timeout`` (a hung rank; it is SIGKILLed first), is recorded as a failure, which
  bumps the job's generation (:func:`integration.recovery.detect.record_failure`);
* respawns only that rank with ``SKIPFREE_GENERATION``/``SKIPFREE_JOINING=1`` set, or promotes a
  pre-started hot spare (``--hot-spares``: processes that already paid the import cost and wait in
  :func:`integration.recovery.context.RankContext.from_env` for a store assignment);
* passes everything after ``--`` to the workers unchanged (Hydra overrides included).

The job ends when every rank of every host exited 0; after ``--max-restarts`` failures, or when any
agent gives up, the key ``abort`` is set and every agent stops its ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from integration.recovery.detect import ABORT_KEY, heartbeat_key, read_generation, record_failure  # noqa: E402

FINISHED_KEY = "agents_finished"


def spare_key(node: int, index: int) -> str:
    return f"spare/{node}/{index}"


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen
    started: float
    spare: bool = False
    kill_reason: str | None = None


@dataclass
class AgentConfig:
    nproc: int
    command: list[str]
    nnodes: int = 1
    node_rank: int = 0
    store_host: str = "127.0.0.1"
    store_port: int = 0
    hot_spares: int = 0
    heartbeat_timeout: float = 10.0
    startup_grace: float = 120.0
    max_restarts: int = 3
    poll_s: float = 0.05
    log_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


class Agent:
    """One host's agent. :meth:`run` returns the exit code of the job as seen from this host."""

    def __init__(self, cfg: AgentConfig):
        import datetime

        import torch.distributed as dist

        self.cfg = cfg
        if cfg.node_rank == 0:
            self.store = dist.TCPStore(cfg.store_host, cfg.store_port, world_size=None, is_master=True,
                                       wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
            cfg.store_port = self.store.port
        else:
            self.store = dist.TCPStore(cfg.store_host, cfg.store_port, world_size=None, is_master=False,
                                       wait_for_workers=False, timeout=datetime.timedelta(seconds=300))
        self.host = socket.gethostname()
        self.ranks: dict[int, _Rank] = {}
        self.spares: list[tuple[int, subprocess.Popen]] = []
        self.spare_count = 0
        self.restarts = 0
        self.done: set[int] = set()

    # ------------------------------------------------------------------ processes
    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.cfg.env)
        env.setdefault("OMP_NUM_THREADS", "1")
        # No LOCAL_SIZE: with it DeepSpeed's CPU backend sets up a shared-memory all-reduce whose
        # init-time handshake a replacement can never complete (it spins, holding the GIL, on the
        # survivors' long-unlinked buffers: no heartbeat, a false hang). We do not use that path.
        env.pop("LOCAL_SIZE", None)
        env.update({"WORLD_SIZE": str(self.cfg.world_size), "SKIPFREE_LOCAL_SIZE": str(self.cfg.nproc),
                    "MASTER_ADDR": self.cfg.store_host, "MASTER_PORT": str(self.cfg.store_port),
                    "SKIPFREE_STORE_HOST": self.cfg.store_host, "SKIPFREE_STORE_PORT": str(self.cfg.store_port),
                    "TORCHELASTIC_USE_AGENT_STORE": "True",  # env:// connects as a client of our store
                    "SKIPFREE_NODE": str(self.cfg.node_rank)})
        env.update(extra)
        return env

    def _popen(self, extra: dict[str, str], tag: str) -> subprocess.Popen:
        out = None
        if self.cfg.log_dir:
            Path(self.cfg.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(self.cfg.log_dir) / f"{tag}.log", "ab")
        return subprocess.Popen([sys.executable, *self.cfg.command], env=self._env(extra), stdout=out,
                                stderr=subprocess.STDOUT if out else None, cwd=os.getcwd())

    def _rank_env(self, rank: int, generation: int, joining: bool) -> dict[str, str]:
        return {"RANK": str(rank), "LOCAL_RANK": str(rank - self.cfg.node_rank * self.cfg.nproc),
                "SKIPFREE_GENERATION": str(generation), "SKIPFREE_JOINING": "1" if joining else "0"}

    def _start_spare(self) -> None:
        idx = self.spare_count
        self.spare_count += 1
        proc = self._popen({"SKIPFREE_SPARE": spare_key(self.cfg.node_rank, idx)}, f"spare{idx}")
        self.spares.append((idx, proc))

    def _respawn(self, rank: int, generation: int) -> str:
        while self.spares:
            idx, proc = self.spares.pop(0)
            if proc.poll() is None:
                self.store.set(spare_key(self.cfg.node_rank, idx),
                               json.dumps({"rank": rank, "generation": generation}))
                self.ranks[rank] = _Rank(rank, proc, time.time(), spare=True)
                self._start_spare()
                return f"promoted hot spare {idx} (pid {proc.pid})"
        proc = self._popen(self._rank_env(rank, generation, True), f"rank{rank}-g{generation}")
        self.ranks[rank] = _Rank(rank, proc, time.time())
        return f"spawned pid {proc.pid}"

    def log(self, event: str, **fields) -> None:
        rec = {"agent": self.cfg.node_rank, "event": event, "time": round(time.time(), 3), **fields}
        print("agent: " + json.dumps(rec), file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        first = self.cfg.node_rank * self.cfg.nproc
        generation = read_generation(self.store)
        for rank in range(first, first + self.cfg.nproc):
            proc = self._popen(self._rank_env(rank, generation, False), f"rank{rank}-g{generation}")
            self.ranks[rank] = _Rank(rank, proc, time.time())
        for _ in range(self.cfg.hot_spares):
            self._start_spare()
        self.log("started", ranks=list(self.ranks), store=f"{self.cfg.store_host}:{self.cfg.store_port}",
                 hot_spares=self.cfg.hot_spares)
        try:
            return self._loop()
        finally:
            self._stop_all()

    def _loop(self) -> int:
        while True:
            if self.store.check([ABORT_KEY]):
                self.log("abort", reason=self.store.get(ABORT_KEY).decode())
                return 1
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
                    return 1
                reason = r.kill_reason or (f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}")
                rec = record_failure(self.store, rank, reason, self.host)
                self.restarts += 1
                if self.restarts > self.cfg.max_restarts:
                    self.store.set(ABORT_KEY, f"rank {rank} failed ({reason}); more than {self.cfg.max_restarts} "
                                              f"restarts")
                    self.log("give_up", rank=rank, reason=reason, restarts=self.restarts)
                    return 1
                how = self._respawn(rank, rec.generation)
                self.log("failure", rank=rank, reason=reason, generation=rec.generation, respawn=how)
            if len(self.done) == len(self.ranks):
                self.log("finished", ranks=sorted(self.done))
                self.store.add(FINISHED_KEY, 1)
                if self.cfg.node_rank == 0:
                    self._wait_other_agents()  # the store lives here: keep it up until every agent is done
                return 0
            time.sleep(self.cfg.poll_s)

    def _wait_other_agents(self) -> None:
        while int(self.store.add(FINISHED_KEY, 0)) < self.cfg.nnodes and not self.store.check([ABORT_KEY]):
            time.sleep(self.cfg.poll_s)

    def _check_heartbeat(self, r: _Rank) -> None:
        if self.cfg.heartbeat_timeout <= 0 or r.kill_reason:
            return
        now = time.time()
        key = heartbeat_key(r.rank)
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


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m launch.agent [options] -- script.py [hydra overrides ...]")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="launch.agent", description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, required=True, help="ranks on this host")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--store-host", default="127.0.0.1")
    p.add_argument("--store-port", type=int, default=0, help="0: pick a free port (node 0 only)")
    p.add_argument("--hot-spares", "--spares", dest="hot_spares", type=int, default=0,
                   help="pre-started replacement processes on this host")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0)
    p.add_argument("--startup-grace", type=float, default=120.0)
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--log-dir", default=None)
    a = p.parse_args(argv[:cut])
    if a.node_rank > 0 and not a.store_port:
        raise SystemExit("launch.agent: --store-port is required on nodes other than 0")
    return AgentConfig(nproc=a.nproc, command=argv[cut + 1:], nnodes=a.nnodes, node_rank=a.node_rank,
                       store_host=a.store_host, store_port=a.store_port, hot_spares=a.hot_spares,
                       heartbeat_timeout=a.heartbeat_timeout, startup_grace=a.startup_grace,
                       max_restarts=a.max_restarts, log_dir=a.log_dir)


def main(argv: list[str] | None = None) -> int:
    return Agent(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
