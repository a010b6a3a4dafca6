"""Re-plan while training: a node loss without a spare, and a link slowed mid-run.

    python benchmarks/replan_bench.py [--steps 200] [--delay 10] [--kill-step 3]
    flock /tmp/wan.lock python benchmarks/replan_bench.py --link [--steps 80] [--slow-step 20]   # root

``--link`` (measured drift, ``routing.replan.drift``): the job on 6 emulated hosts (3 stages x 2
replicas, ``integration/runtime/wanjob.py``; 200 KB/s between stages, free between the replicas of
a stage), link 2 -> 4 slowed 5x at ``--slow-step`` with ``tc`` while the job runs. Three runs, one
after another in one invocation:

* ``static``: the job's plan (full pipelines) throughout, drift off;
* ``re-plan``: drift on (window 4, cooldown 4, 2 windows): the job measures, re-plans, switches;
* ``planned for the slowed link``: a plan made for the slowed network from the start (the same
  planner, :meth:`integration.plan.measured.MeasuredCosts.plan`, fed the *configured* link rates
  instead of measurements), run with the link slow from step 0 (``routing=file``, drift off).

Columns: median step time (rank 0's audit, consecutive step ends) before the slowdown and after
the re-plan arm's first switch (+ ``measure_steps``), the same step range in every arm; the ratio to
the planned arm; the switches with their predicted and measured gain and the time each took.
The node-loss arms (default mode) are described below.

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


# ----------------------------------------------------------------------------- --link: a link slowed mid-run
N, BW, SLOW_LINK = 6, 200e3, (2, 4)
JOB = ["preset=recovery_test", "parallel.stages=3", "parallel.replicas=2", "routing.replan.enabled=true",
       "recovery.rendezvous_timeout_s=300"]
DRIFT = ["routing.replan.drift=true", "routing.replan.window=4", "routing.replan.cooldown=4",
         "routing.replan.drift_windows=2"]


def _network(slow: bool) -> list[list[float]]:
    inf = float("inf")
    net = [[BW if a != b and a // 2 != b // 2 else inf for b in range(N)] for a in range(N)]
    if slow:
        net[SLOW_LINK[0]][SLOW_LINK[1]] = BW / 5
    return net


def _plan_for_slow_link(path: Path) -> list[list[int]]:
    """The reference plan: the planner on the configured slowed network (activation + header bytes /
    rate per link, uniform compute), written for ``routing=file``."""
    from integration.plan.builders import full_pipeline
    from integration.plan.measured import MeasuredCosts
    from integration.plan.routeplan import grid_stage_nodes
    from integration.plan.rules import Rules

    nbytes = 2 * 16 * 32 * 4 + 96  # recovery_test: micro_batch_size x seq_len x d_model fp32, + the p2p header
    net = _network(True)
    costs = MeasuredCosts(N)
    costs.link_s = {(a, b): nbytes / net[a][b] for a in range(N) for b in range(N) if a != b and net[a][b] < 1e30}
    costs.op_s = {(n, ph): 0.002 for n in range(N) for ph in "FLB"}
    costs.overhead_s = 0.0005
    full = full_pipeline(grid_stage_nodes(3, 2), 2)
    plan = costs.plan(full, Rules(), 2, budget_s=5.0)
    plan.save(path)
    return [list(r.nodes) for r in plan.routes]


def run_link(out: Path, steps: int, slow_step: int, arm: str, plan_file: Path | None) -> dict:
    from integration.runtime.wanjob import run_on_wan, wan_lock

    overrides = [*JOB, f"train.steps={steps}"]
    changes = [(slow_step, *SLOW_LINK, BW / 5)]
    if arm == "re-plan":
        overrides += DRIFT
    if arm == "planned":
        overrides += ["routing=file", f"routing.path={plan_file}"]
        changes = []
    with wan_lock():
        p, applied = run_on_wan(out, N, _network(arm == "planned"), overrides, changes=changes, timeout_s=900)
    if p.returncode:
        raise SystemExit(f"{arm}: job failed ({p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-20:]))
    rows = [json.loads(x) for x in (out / "rank0" / "audit.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps)), "every step applied exactly once"
    events = [json.loads(x) for x in (out / "rank0" / "events.jsonl").read_text().splitlines()] \
        if (out / "rank0" / "events.jsonl").exists() else []
    return {"times": [r["time"] for r in rows], "events": [e for e in events if e["event"] == "replan"],
            "applied": applied}


def _median_step(times: list[float], lo: int, hi: int) -> float:
    import statistics
    return statistics.median(b - a for a, b in zip(times[lo:hi], times[lo + 1:hi + 1]))


def main_link(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref_routes = _plan_for_slow_link(tmp / "slow_plan.json")
        load = {}
        results = {}
        for arm in ("static", "re-plan", "planned"):
            (tmp / arm).mkdir()
            load[arm] = Path("/proc/loadavg").read_text().split()[:3]
            results[arm] = run_link(tmp / arm, a.steps, a.slow_step, arm, tmp / "slow_plan.json")
    sw = results["re-plan"]["events"]
    if not sw:
        raise SystemExit("re-plan: no switch happened; nothing to compare")
    after = sw[0]["at_step"] + 3  # the first switch's measured steps start there
    before = (3, a.slow_step)
    print(f"steps {a.steps}, link {SLOW_LINK[0]}->{SLOW_LINK[1]} slowed 5x ({BW / 1e3:.0f} -> {BW / 5e3:.0f} KB/s) "
          f"at step {a.slow_step}; after = steps {after}..{a.steps - 1}; reference plan routes {ref_routes}\n")
    ref = _median_step(results["planned"]["times"], after, a.steps - 1)
    print("| arm | load avg (1/5/15 min) at start | median step s before slowdown | median step s after | "
          "after / planned-for-slow |")
    print("|---|---|---|---|---|")
    for arm, name in (("static", "static plan"), ("re-plan", "re-plan on drift"),
                      ("planned", "planned for the slowed link (slow from step 0)")):
        t = results[arm]["times"]
        pre = _median_step(t, *before)
        post = _median_step(t, after, a.steps - 1)
        print(f"| {name} | {' '.join(load[arm])} | {pre:.3f} | {post:.3f} | {post / ref:.2f} |")
    print("\n| switch at step | routes after | predicted gain | measured gain | planner s | switch s (boundary "
          "start -> new plan set) |")
    print("|---|---|---|---|---|---|")
    for e in sw:
        print(f"| {e['at_step']} | {e['routes']} | {e['predicted_gain']:.3f} | {e['measured_gain']:.3f} | "
              f"{e['plan_s']:.2f} | {e['switch_s']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 200; --link: 80)")
    ap.add_argument("--delay", type=float, default=10.0, help="seconds the replacement is held back")
    ap.add_argument("--kill-step", type=int, default=3)
    ap.add_argument("--link", action="store_true", help="a link slowed mid-run (measured drift), on emulated hosts")
    ap.add_argument("--slow-step", type=int, default=20, help="--link: the step the link is slowed at")
    a = ap.parse_args()
    if a.link:
        a.steps = a.steps or 80
        return main_link(a)
    a.steps = a.steps or 200
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
