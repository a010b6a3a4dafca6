"""Recovery cost on this machine: run the fault-tolerant worker under launch.agent, kill a stage, print timings.

    python benchmarks/recovery_bench.py [--stages 5] [--steps 6] [--phase forward] [--no-spare]

Prints one table row per recovery event (as seen by rank 0, a survivor): method, detection,
regroup, transfer (exchange + state), engine rebuild, failure -> first good step, loss before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(stages: int, steps: int, phase: str, kill_stage: int, spare: bool, routing: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "launch.agent", "--nproc", str(stages), "--hot-spares", "1" if spare else "0",
               "--heartbeat-timeout", "5", "--log-dir", f"{tmp}/logs", "--", "-m", "integration.recovery.worker",
               f"out={tmp}", f"stages={stages}", f"train.steps={steps}", f"routing={routing}",
               f'recovery.inject="kill:stage={kill_stage},step={steps // 2},phase={phase}"']
        t0 = time.time()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"job failed ({p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-20:]))
        rows = [json.loads(x) for x in (Path(tmp) / "rank0" / "events.jsonl").read_text().splitlines()]
        for r in rows:
            r["job_s"] = time.time() - t0
        return [r for r in rows if r["event"] == "recovery"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--phase", default="forward", choices=["forward", "backward", "boundary"])
    ap.add_argument("--kill-stage", type=int, default=2)
    ap.add_argument("--routing", default="full")
    ap.add_argument("--no-spare", action="store_true")
    a = ap.parse_args()
    events = run(a.stages, a.steps, a.phase, a.kill_stage, not a.no_spare, a.routing)
    cols = ("methods", "detect_s", "regroup_s", "transfer_s", "engine_rebuild_s", "first_good_step_s",
            "loss_before", "loss_after")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for e in events:
        print("| " + " | ".join(f"{e[c]:.3f}" if isinstance(e[c], float) else str(e[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
