"""Failure detection with real gloo processes: failure-aware waits and the step commit protocol."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch.distributed as dist

from integration.recovery.commit import StepCommit
from integration.recovery.detect import FailureMonitor, failures_between, read_generation, record_failure
from tests.conftest import start_ranks
from tests.dist_utils import free_port


# Rank 0 sends nothing (it sleeps: alive but silent, or is killed); rank 1 waits on rank 0;
# rank 2 waits on rank 1. Each reports when and how its wait ended.
RANK = r"""
store.set(f"ready/{ctx.rank}", "1")
if ctx.rank == 0:
    time.sleep(120)
buf = torch.zeros(3)
t = time.time()
try:
    mon.wait(dist.irecv(buf, ctx.rank - 1), f"receive from {ctx.rank - 1}")
    out = {"ok": True}
except PeerFailure as exc:
    out = {"failure": str(exc)[:200], "at": time.time()}
with open(os.path.join(os.environ["OUT"], f"r{ctx.rank}.json"), "w") as f:
    json.dump(out, f)
os._exit(0)
"""


def start(tmp: Path, port: int) -> list[subprocess.Popen]:
    return start_ranks(RANK, 3, tmp, port)


def _master(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, world_size=None, is_master=True, wait_for_workers=False)


def _wait_ready(store, n=3):
    import datetime
    store.wait([f"ready/{r}" for r in range(n)], datetime.timedelta(seconds=120))
    time.sleep(0.3)  # let the receives be posted


def test_blocked_on_live_peer_fails_fast_on_recorded_failure(tmp_path):
    """Nobody died and nobody's connection broke: only the store's generation can free the waits."""
    port = free_port()
    store = _master(port)
    procs = start(tmp_path, port)
    try:
        _wait_ready(store)
        t_record = record_failure(store, 0, "test: recorded by hand").time
        for r in (1, 2):
            procs[r].wait(timeout=30)
        res = {r: json.loads((tmp_path / f"r{r}.json").read_text()) for r in (1, 2)}
        # Rank 1 waits on a live, silent rank 0: only the recorded generation can free it. Rank 2 is
        # freed by the same flag or, when rank 1 exits first, by the cascaded connection error.
        assert "failure recorded" in res[1]["failure"], res
        assert "failure" in res[2], res
        assert all(res[r]["at"] - t_record < 1.0 for r in (1, 2)), res  # vs. the process-group timeout
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_killed_peer_fails_waits_at_once(tmp_path):
    port = free_port()
    store = _master(port)
    procs = start(tmp_path, port)
    try:
        _wait_ready(store)
        t_kill = time.time()
        procs[0].send_signal(signal.SIGKILL)
        for r in (1, 2):
            procs[r].wait(timeout=30)
        for r in (1, 2):
            res = json.loads((tmp_path / f"r{r}.json").read_text())
            assert "failed" in res["failure"] and res["at"] - t_kill < 2.0, res  # no agent record needed
        assert read_generation(store) == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_commit_protocol_commit_and_abort():
    port = free_port()
    store = _master(port)
    mons = [FailureMonitor("127.0.0.1", port, r, 0, poll_s=0.02).start() for r in range(2)]
    commits = [StepCommit(dist.TCPStore("127.0.0.1", port, world_size=None, is_master=False), 2, m) for m in mons]
    try:
        results = {}
        th = threading.Thread(target=lambda: results.__setitem__(0, commits[0].decide(0, 7)))
        th.start()
        time.sleep(0.2)
        assert th.is_alive()  # waits for the other rank's vote
        results[1] = commits[1].decide(0, 7)
        th.join(5)
        assert results == {0: True, 1: True}
        # Step 8: rank 0 votes, then a failure is recorded before rank 1 votes -> aborted for both.
        th = threading.Thread(target=lambda: results.__setitem__(2, commits[0].decide(0, 8)))
        th.start()
        time.sleep(0.1)
        record_failure(store, 1, "test")
        th.join(5)
        assert results[2] is False
        assert commits[1].decide(0, 8) is False  # a late vote cannot turn an abort into a commit
        assert commits[1].abort(0, 7) is True     # and an abort cannot undo a commit
        assert [r.rank for r in failures_between(store, 0, 1)] == [1]
    finally:
        for m in mons:
            m.stop()


def test_settle_generation_coalesces_close_failures():
    """Ranks that first announce different generations all end on the newest one, never split."""
    import datetime
    import threading

    import torch.distributed as dist

    from integration.recovery.detect import record_failure
    from integration.recovery.rendezvous import settle_generation

    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    record_failure(store, 2, "killed")  # generation 1: survivors and replacement of rank 2 start here
    got: dict[int, int] = {}

    def rank(r: int, start: int) -> None:
        got[r] = settle_generation(store, 4, start, timeout_s=20)

    threads = [threading.Thread(target=rank, args=(r, 1)) for r in (0, 1, 2)]
    for t in threads:
        t.start()
    import time

    time.sleep(0.3)
    record_failure(store, 3, "killed")  # generation 2 before rank 3's replacement ever arrived at 1
    threads.append(threading.Thread(target=rank, args=(3, 2)))
    threads[-1].start()
    for t in threads:
        t.join(timeout=30)
    assert got == {0: 2, 1: 2, 2: 2, 3: 2}
