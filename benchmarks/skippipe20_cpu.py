"""CPU seconds of one skippipe-20 plan with our placement search, per seed (the planner-time goal).

Run:  OMP_NUM_THREADS=1 python benchmarks/skippipe20_cpu.py [seeds, e.g. 0,1,2,3,4]
Same call as ``planner_bench.skippipe20`` ("our placement search" rows); CP-SAT is imported first, as
there. Prints per seed the simulated iteration (paper mode), its ratio to SkipPipe's published
full-pipeline baseline, the FIFO replay, CPU (``time.process_time``) and wall seconds, and the load
average at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ortools.sat.python.cp_model  # noqa: E402,F401  (import cost outside the timed plans)

from integration.plan.cluster import load_cluster, load_committed_setting  # noqa: E402
from integration.plan.planner import plan_routes  # noqa: E402
from integration.plan.simulator import simulate  # noqa: E402


def main() -> None:
    seeds = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else list(range(5))
    c = load_cluster("skippipe-20")
    base = load_committed_setting()["published_iteration_s"]["full_pipeline_baseline"]
    for seed in seeds:
        t0, c0 = time.perf_counter(), time.process_time()
        res = plan_routes(c, stage_nodes=None, stage_sizes=[5, 3, 3, 3, 3, 3], seed=seed)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        t = simulate(res.plan, c).iteration_s
        fifo = simulate(res.plan, c, honour_order=False).iteration_s
        print(f"seed {seed}: {t:.2f} s = {t / base:.3f}x (FIFO {fifo:.2f} s), CPU {cpu:.2f} s, wall {wall:.2f} s",
              flush=True)
    print("load average:", " ".join(open("/proc/loadavg").read().split()[:3]))


if __name__ == "__main__":
    main()
