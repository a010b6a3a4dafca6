"""Step commit protocol: no rank applies an optimizer step for an iteration another rank aborts.

Every rank votes ``ready`` for (generation, step) in the rendezvous store after its last
collective of the iteration; the vote that completes the count writes the decision ``commit``
with an atomic compare-and-set. A rank that sees a failure before a decision exists writes
``abort`` the same way. The first write wins and is final, so every rank reads the same decision:
on ``commit`` every survivor steps (even if a failure is seen afterwards: the lost rank is rebuilt
from the post-step neighbours), on ``abort`` nobody steps and the step is replayed with the same
microbatches. The store is used rather than a collective because a gloo collective can complete on
some ranks and fail on others.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from .detect import FailureMonitor

COMMIT = b"commit"
ABORT = b"abort"


class StepCommit:
    """Vote and read the decision for one step through ``store`` (the main thread's client)."""

    def __init__(self, store: dist.Store, world_size: int, monitor: FailureMonitor, poll_s: float = 0.002):
        self.store = store
        self.world_size = world_size
        self.monitor = monitor
        self.poll_s = poll_s

    @staticmethod
    def key(generation: int, step: int) -> str:
        return f"commit/g{generation}/s{step}"

    def decide(self, generation: int, step: int) -> bool:
        """Vote ready for ``step``; True when the step is committed, False when it is aborted."""
        key = self.key(generation, step)
        if int(self.store.add(f"{key}/ready", 1)) == self.world_size:
            self.store.compare_set(f"{key}/decision", "", COMMIT.decode())
        while True:
            if self.store.check([f"{key}/decision"]):
                return self.store.get(f"{key}/decision") == COMMIT
            if self.monitor.failed:
                return self.abort(generation, step)
            time.sleep(self.poll_s)

    def abort(self, generation: int, step: int) -> bool:
        """Try to abort ``step``; returns True if it had already been committed (then it must be applied)."""
        key = self.key(generation, step)
        return bytes(self.store.compare_set(f"{key}/decision", "", ABORT.decode())) == COMMIT
