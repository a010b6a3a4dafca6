"""Shared launchers of the tests: the main job through the deepspeed launcher or as one process, and
a job under the fault-tolerant agent; readers of the per-rank JSON-lines files jobs write.

Import them by name (``from tests.conftest import run_agent_job``); every launch is a real process
group (gloo) of real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from integration.runtime.spawn import free_port

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
#: The recovery tests' job: the main job with its small audited preset (hydra_conf/preset/recovery_test.yaml).
RECOVERY_TEST_JOB = ("integration/train.py", "preset=recovery_test")


def run_job(args: list[str], tmp_path: Path, world: int | None = None, env_extra: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``integration/train.py`` through the deepspeed launcher (``world`` ranks) or directly as one rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    overrides = [f"output_root={tmp_path}/out", *args]
    if world is None:
        cmd = [sys.executable, "integration/train.py", *overrides]
    else:
        cmd = [DEEPSPEED, "--no_local_rank", "--num_gpus", str(world), "--master_port", str(free_port()),
               "integration/train.py", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_agent(script: tuple[str, ...] | list[str], *args: str, nproc: int, log_dir: Path, hot_spares: int = 1,
              heartbeat_timeout: float | None = None, max_restarts: int | None = None,
              timeout: int = 300, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m launch.agent --nproc N --hot-spares K ... -- <script> <args>`` from the repo root
    (``extra``: more agent flags)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for k in ("RANK", "SKIPFREE_DEBUG", "HYDRA_FULL_ERROR"):
        env.pop(k, None)
    opts = ["--nproc", str(nproc), "--hot-spares", str(hot_spares), "--log-dir", str(log_dir)]
    if heartbeat_timeout is not None:
        opts += ["--heartbeat-timeout", str(heartbeat_timeout)]
    if max_restarts is not None:
        opts += ["--max-restarts", str(max_restarts)]
    cmd = [sys.executable, "-m", "launch.agent", *opts, *(extra or []), "--", *script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_agent_job(tmp: Path, *overrides: str, nproc: int = 5, heartbeat_timeout: float = 5.0, max_restarts: int = 4,
                  timeout: int = 300) -> tuple[int, str]:
    """The main job with ``preset=recovery_test`` under the agent, writing to ``tmp/rank<R>`` (agent logs
    under ``tmp/logs``); returns (exit code, the agent's lines)."""
    p = run_agent(RECOVERY_TEST_JOB, f"output_root={tmp}", *overrides, nproc=nproc, log_dir=tmp / "logs",
                  heartbeat_timeout=heartbeat_timeout, max_restarts=max_restarts, timeout=timeout)
    return p.returncode, "\n".join(x for x in p.stderr.splitlines() if x.startswith("agent: "))


def run_main_job_under_agent(out: Path, nproc: int, *overrides: str, heartbeat_timeout: float | None = None,
                             max_restarts: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m launch.agent --nproc N --spares 1 -- integration/train.py ...`` as a user types it,
    outputs under ``out/out/rank<R>``, agent logs under ``out/logs``."""
    return run_agent(("integration/train.py",), f"output_root={out}/out", "progress=false", "tensorboard=false",
                     *overrides, nproc=nproc, log_dir=out / "logs", heartbeat_timeout=heartbeat_timeout,
                     max_restarts=max_restarts, timeout=timeout)


def agent_events(p: subprocess.CompletedProcess) -> list[dict]:
    """The agent's JSON records (``agent: {...}`` lines on its stderr)."""
    return [json.loads(line[len("agent: "):]) for line in p.stderr.splitlines() if line.startswith("agent: {")]


# The head of a rank script for the store-based recovery primitives: a rank context from the
# environment, its store client, a failure monitor (generation 0) and the gloo group.
RANK_PRELUDE = r"""
import json, os, signal, sys, time, torch
import torch.distributed as dist
from integration.recovery.context import RankContext
from integration.recovery.detect import FailureMonitor, PeerFailure, all_reduce, all_gather_object
ctx = RankContext.from_env()
store = ctx.connect()
mon = FailureMonitor(ctx.store_host, ctx.store_port, ctx.rank, 0, poll_s=0.05).start()
ctx.init_group(store, 0)
"""


def start_ranks(script: str, world: int, out: Path, store_port: int) -> list[subprocess.Popen]:
    """``world`` processes running ``RANK_PRELUDE + script`` against the store at ``store_port``
    (the caller owns the store, outside the ranks); ``OUT`` in their environment is ``out``."""
    procs = []
    for r in range(world):
        env = dict(os.environ, OUT=str(out), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RANK=str(r),
                   WORLD_SIZE=str(world), SKIPFREE_STORE_HOST="127.0.0.1", SKIPFREE_STORE_PORT=str(store_port))
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_PRELUDE + script], env=env, cwd=ROOT))
    return procs


def rows(tmp: Path, rank: int, name: str) -> list[dict]:
    """The JSON lines of ``tmp/rank<rank>/<name>`` (``events.jsonl``, ``audit.jsonl``)."""
    return [json.loads(x) for x in (tmp / f"rank{rank}" / name).read_text().splitlines()]


def events(tmp: Path, rank: int) -> list[dict]:
    return rows(tmp, rank, "events.jsonl")


def audit(tmp: Path, rank: int) -> list[dict]:
    return rows(tmp, rank, "audit.jsonl")
