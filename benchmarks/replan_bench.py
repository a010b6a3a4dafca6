"""Node loss without a spare: stall until the replacement vs re-plan around it, against no failure.

    python benchmarks/replan_bench.py [--steps 200] [--delay 10] [--kill-step 3]

Three runs of the same job (the main job with ``preset=recovery_test``: 5 ranks, ring model d=32,
full routing) under ``launch.agent --hot-spares 1``, in this order, in one invocation:

* ``no failure``: the reference;
* ``stall``: stage 2 SIGKILLed at ``--kill-step``, its replacement held back ``--delay`` s
  (``--respawn-delay``); the survivors wait for it (the static plan needs every stage);
* ``replan``: the same kill and delay with ``routing.replan.enabled=true``: the survivors train on
  a plan that skips stage 2 meanwhile, then switch back when the replacement joined.

Columns: wall seconds from the first step's start to the last step's end on rank 0 (start-up
excluded: the same in every arm), the ratio to the no-failure run, the steps trained while the
replacement was missing, each recovery's failure -> first good step, and each switch's predicted
and measured gain (``replan`` events). The job's total work is the same number of steps in every
arm; the re-planned steps skip one stage (less compute, and stage 2 learns nothing meanwhile).
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


def run(steps: int, kill_step: int | None, delay: float, replan: bool) -> dict:
    """One run; rank 0's audit rows, recovery and replan events."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
        env.pop("RANK", None)
        target = ["integration/train.py", "preset=recovery_test", f"output_root={tmp}", f"train.steps={steps}",
                  f"routing.replan.enabled={str(replan).lower()}", "recovery.rendezvous_timeout_s=300"]
        agent = ["--nproc", "5", "--hot-spares", "1", "--heartbeat-timeout", "30", "--log-dir", f"{tmp}/logs"]
        if kill_step is not None:
            target.append(f'recovery.inject="kill:stage=2,step={kill_step},phase=backward"')
            agent += ["--respawn-delay", str(delay)]
        p = subprocess.run([sys.executable, "-m", "launch.agent", *agent, "--", *target], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"job failed ({p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-20:]))
        rows = [json.loads(x) for x in (Path(tmp) / "rank0" / "audit.jsonl").read_text().splitlines()]
        events = [json.loads(x) for x in (Path(tmp) / "rank0" / "events.jsonl").read_text().splitlines()] \
            if (Path(tmp) / "rank0" / "events.jsonl").exists() else []
        times = [json.loads(x)["time"] for x in (Path(tmp) / "rank0" / "audit.jsonl").read_text().splitlines()]
        summary = json.loads((Path(tmp) / "rank0" / "summary.json").read_text())
    steps_done = [r["step"] for r in rows]
    assert steps_done == list(range(steps)), "every step applied exactly once"
    return {"rows": rows, "events": events, "t_first": times[0], "t_last": times[-1],
            "loss_last3": summary["loss_last3"], "val": summary["val_loss_full_model"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--delay", type=float, default=10.0, help="seconds the replacement is held back")
    ap.add_argument("--kill-step", type=int, default=3)
    a = ap.parse_args()
    arms = [("no failure", None, False), ("stall", a.kill_step, False), ("replan", a.kill_step, True)]
    results = {name: run(a.steps, k, a.delay, rp) for name, k, rp in arms}
    base = results["no failure"]["t_last"] - results["no failure"]["t_first"]
    print(f"steps {a.steps}, stage 2 of 5 killed at step {a.kill_step}, replacement held back {a.delay:g} s\n")
    print("| arm | wall s (first step -> last step) | vs no failure | steps without the lost rank | "
          "failure -> first good step, per recovery | switch: predicted / measured gain | final loss (last 3) "
          "| validation loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _, _ in arms:
        r = results[name]
        wall = r["t_last"] - r["t_first"]
        rec = [e for e in r["events"] if e["event"] == "recovery"]
        rp = [e for e in r["events"] if e["event"] == "replan"]
        degraded = sum(1 for row in r["rows"] if rp and row["generation"] == rp[0]["generation"])
        goods = ", ".join(f"{e['first_good_step_s']:.2f} s" for e in rec) or "-"
        gains = ", ".join(f"{e['predicted_gain']:.3f} / {e['measured_gain']:.3f}" for e in rp) or "-"
        print(f"| {name} | {wall:.2f} | {wall / base:.2f}x | {degraded} | {goods} | {gains} | "
              f"{r['loss_last3']:.4f} | {r['val']:.4f} |")


if __name__ == "__main__":
    main()
