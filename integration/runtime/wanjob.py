"""The main job under ``launch.agent`` on emulated wide-area hosts, with link rates changed mid-run.

For the drift tests and the re-plan benchmark (``tests/recovery/test_drift.py``,
``benchmarks/replan_bench.py``): :func:`run_on_wan` builds ``n`` namespace hosts
(:class:`integration.runtime.wanhosts.WanHosts`, htb per destination), starts the agent in the root
namespace with the store on the bridge address, and every rank enters its own host first thing
(``SKIPFREE_WAN_HOSTS=1``, :func:`integration.runtime.wanhosts.enter_from_env`). ``changes`` are
``(step, i, j, bytes/s)``: once rank 0 has applied ``step`` steps (its ``audit.jsonl``, so the job
needs ``recovery.audit=true``, which ``preset=recovery_test`` sets), the i -> j rate changes
(``tc class change``, the bytes really queue in the kernel). Needs root; hold ``/tmp/wan.lock``
while it runs (:func:`wan_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from .wanhosts import NET, WanHosts, set_rate

ROOT = Path(__file__).resolve().parents[2]
LOCK = "/tmp/wan.lock"


@contextlib.contextmanager
def wan_lock() -> Iterator[None]:
    """The machine's emulated-network lock (one run of wan* namespaces at a time)."""
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _steps_done(out: Path) -> int:
    path = out / "rank0" / "audit.jsonl"
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def run_on_wan(out: Path, n: int, bandwidth_Bps: Sequence[Sequence[float]], overrides: Sequence[str],
               changes: Sequence[tuple[int, int, int, float]] = (), timeout_s: float = 600,
               agent_flags: Sequence[str] = ()) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``integration/train.py <overrides> output_root=<out>`` on ``n`` emulated hosts; returns the
    agent's result and the rate changes applied (``step``: rank 0's applied steps when it was made)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), SKIPFREE_WAN_HOSTS="1")
    for k in ("RANK", "SKIPFREE_DEBUG", "HYDRA_FULL_ERROR", "GLOO_SOCKET_IFNAME"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "launch.agent", "--nproc", str(n), "--hot-spares", "0", "--store-host", f"{NET}.1",
           "--heartbeat-timeout", "30", "--log-dir", str(out / "logs"), *agent_flags, "--",
           "integration/train.py", f"output_root={out}", *overrides]
    applied: list[dict] = []
    # A SIGTERM (a timeout) must still tear the hosts down: turn it into an exception here.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(cmd, env, out, n, bandwidth_Bps, changes, timeout_s, applied)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(cmd: list[str], env: dict, out: Path, n: int, bandwidth_Bps, changes, timeout_s: float,
         applied: list[dict]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    with WanHosts(n, bandwidth_Bps):
        with open(out.parent / f"{out.name}.agent.err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
            deadline = time.time() + timeout_s
            pending = sorted(changes)
            try:
                while proc.poll() is None:
                    if time.time() > deadline:
                        proc.terminate()
                        proc.wait(30)
                        break
                    done = _steps_done(out)
                    while pending and done >= pending[0][0]:
                        step, i, j, rate = pending.pop(0)
                        set_rate(i, j, rate)
                        applied.append({"step": step, "seen_steps": done, "link": [i, j], "Bps": rate,
                                        "time": time.time()})
                    time.sleep(0.05)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        stderr = (out.parent / f"{out.name}.agent.err").read_text()
    return subprocess.CompletedProcess(cmd, proc.returncode, "", stderr), applied
