"""A worker's view of the fault-tolerant job: rank, generation, store, and (re)grouping.

Set up by :mod:`launch.agent` through the environment. A hot spare calls :meth:`RankContext.from_env`
right after its imports and blocks there until the agent assigns it a rank.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass

import torch.distributed as dist

from .detect import connect_store

# Process groups of earlier generations, kept alive for a while: (when retired, the groups).
_RETIRED: list[tuple[float, list]] = []


def _retire_groups(timeout_s: float) -> None:
    """Keep a reference to every group of the generation being left, so that no destructor runs now.

    A gloo group's destructor joins its worker threads, and a collective pending with a peer that
    vanished without closing its sockets (power loss, partition) holds its thread until the group's
    timeout: dropping the last reference on this thread would stall the regroup that long (a killed
    peer's sockets close, so its collectives fail at once). Groups retired more than two timeouts
    ago have no pending work left and are released here.
    """
    now = time.time()
    _RETIRED[:] = [(t, groups) for t, groups in _RETIRED if now - t < 2 * timeout_s]
    pg_map = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", {})  # every group, world included
    _RETIRED.append((now, list(pg_map)))


@dataclass
class RankContext:
    rank: int
    world_size: int
    generation: int          # generation of the current process group
    joining: bool            # a replacement: no state, must be rebuilt by the ladder
    store_host: str
    store_port: int
    started: float

    @classmethod
    def from_env(cls, spare_timeout_s: float = 24 * 3600.0) -> "RankContext":
        """Read the agent's environment; a hot spare waits here for its assignment."""
        host = os.environ.get("SKIPFREE_STORE_HOST", os.environ.get("MASTER_ADDR", "127.0.0.1"))
        port = int(os.environ.get("SKIPFREE_STORE_PORT", os.environ.get("MASTER_PORT", "0")))
        spare = os.environ.get("SKIPFREE_SPARE")
        if spare:
            store = connect_store(host, port, spare_timeout_s)
            store.set(f"{spare}/ready", "1")  # launch.agent's spare_ready_key: a delayed replacement can join now
            store.wait([spare], datetime.timedelta(seconds=spare_timeout_s))
            job = json.loads(store.get(spare))
            per_node = int(os.environ.get("SKIPFREE_LOCAL_SIZE", "1"))
            local = job.get("local_rank", job["rank"] - int(os.environ.get("SKIPFREE_NODE", "0")) * per_node)
            os.environ.update({"RANK": str(job["rank"]), "LOCAL_RANK": str(local),
                               "SKIPFREE_GENERATION": str(job["generation"]), "SKIPFREE_JOINING": "1"})
        return cls(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                   generation=int(os.environ.get("SKIPFREE_GENERATION", "0")),
                   joining=os.environ.get("SKIPFREE_JOINING", "0") == "1", store_host=host, store_port=port,
                   started=time.time())

    def connect(self) -> dist.TCPStore:
        return connect_store(self.store_host, self.store_port)

    def init_group(self, store: dist.TCPStore, generation: int, timeout_s: float = 60.0,
                   members: list[int] | None = None) -> None:
        """(Re)create the default gloo group of ``generation`` under its own store prefix.

        ``members``: the ranks in the group when it is smaller than the job (survivors re-planned
        around ranks with no process); group ranks are their positions in the sorted list."""
        if dist.is_initialized():
            _retire_groups(timeout_s)
            dist.destroy_process_group()
        members = sorted(members) if members is not None else list(range(self.world_size))
        dist.init_process_group("gloo", store=dist.PrefixStore(f"gen{generation}/", store),
                                rank=members.index(self.rank), world_size=len(members),
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.generation = generation
