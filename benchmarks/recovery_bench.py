"""Recovery cost on this machine: run a job under launch.agent, SIGKILL a stage, print the time breakdown.

    python benchmarks/recovery_bench.py [--job worker|main] [--spare hot,cold] [--phase forward] [--steps 6]

``--job worker``: the small fault-tolerant worker (ring model d=32, 5 ranks);
``--job main``: the main job (``integration/train.py recovery=checkfree``, default tiny model, 4 ranks).
``--spare hot``: a pre-started hot spare is promoted; ``cold``: the agent spawns a fresh process.
One table row per (job, spare) from rank 0's recovery event (rank 0 is a survivor): method,
detection, regroup, transfer (exchange + state, includes waiting for the joiner), engine rebuild,
failure -> first good step, loss before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLS = ("methods", "detect_s", "regroup_s", "transfer_s", "engine_rebuild_s", "first_good_step_s",
        "loss_before", "loss_after")


def run(job: str, steps: int, phase: str, kill_stage: int, spare: bool, routing: str) -> list[dict]:
    """One run; returns rank 0's recovery events."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
        env.pop("RANK", None)
        inject = f"kill:stage={kill_stage},step={steps // 2},phase={phase}"
        if job == "worker":
            nproc, events = 5, Path(tmp) / "rank0" / "events.jsonl"
            target = ["-m", "integration.recovery.worker", f"out={tmp}", f"train.steps={steps}", f"routing={routing}",
                      f'recovery.inject="{inject}"']
        else:
            nproc, events = 4, Path(tmp) / "out" / "rank0" / "events.jsonl"
            target = ["integration/train.py", "recovery=checkfree", f"recovery.inject={inject}", f"output_root={tmp}/out",
                      f"train.steps={steps}", "progress=false", "tensorboard=false"]
        cmd = [sys.executable, "-m", "launch.agent", "--nproc", str(nproc), "--hot-spares", "1" if spare else "0",
               "--heartbeat-timeout", "10", "--log-dir", f"{tmp}/logs", "--", *target]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"job failed ({p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-20:]))
        rows = [json.loads(x) for x in events.read_text().splitlines()]
        return [r for r in rows if r["event"] == "recovery"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="worker", choices=["worker", "main"])
    ap.add_argument("--spare", default="hot,cold", help="comma list of hot / cold")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--phase", default="forward", choices=["forward", "backward", "boundary"])
    ap.add_argument("--kill-stage", type=int, default=2)
    ap.add_argument("--routing", default="full", help="worker only")
    a = ap.parse_args()
    print("| job | spare | " + " | ".join(COLS) + " |")
    print("|" + "---|" * (len(COLS) + 2))
    for mode in a.spare.split(","):
        for e in run(a.job, a.steps, a.phase, a.kill_stage, mode == "hot", a.routing):
            cells = [f"{e[c]:.3f}" if isinstance(e[c], float) else str(e[c]) for c in COLS]
            print(f"| {a.job} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
