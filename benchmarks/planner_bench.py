"""Planner benchmark: the four variants per setting, paper and full mode, planner wall time.

Run:  OMP_NUM_THREADS=1 python benchmarks/planner_bench.py
Prints one table, rewrites the results block of docs/planner.md and writes one Gantt chart per
setting to docs/img/. ``--quick`` skips the 100-node setting and does not touch the docs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from integration.plan.cluster import load_cluster  # noqa: E402
from integration.plan.gantt import gantt_chart  # noqa: E402
from integration.plan.placement import anneal_placement, genetic_placement  # noqa: E402
from integration.plan.planner import Effort, compare_variants  # noqa: E402
from integration.plan.rules import Rules, validate  # noqa: E402
from integration.plan.simulator import simulate  # noqa: E402

COMMAND = "OMP_NUM_THREADS=1 python benchmarks/planner_bench.py"
SETTINGS = [
    # name, cluster, stage sizes, S, L, effort
    ("geo-12", "geo-12", [5, 3, 3, 3, 3, 3], 6, 4, Effort()),
    ("5-clusters", "5-clusters", [5, 3, 3, 3, 3, 3], 6, 4, Effort()),
    ("single-cluster", "single-cluster", [5, 3, 3, 3, 3, 3], 6, 4, Effort()),
    ("synthetic-100 (S=8, L=6)", "synthetic-100", None, 8, 6, Effort(placement_evals=1500, sim_evals=1000)),
]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def run(quick: bool) -> str:
    lines = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    out(f"Command: `{COMMAND}` (seed 0; {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, one process; planner s = wall clock).")
    out()
    out("| setting | variant | paper s | x full | full-mode s | x full | planner s | valid |")
    out("|---|---|---:|---:|---:|---:|---:|---|")
    place_rows = []
    for label, cname, sizes, S, L, effort in SETTINGS:
        if quick and cname.startswith("synthetic"):
            continue
        cluster = load_cluster(cname)
        rows, ours = compare_variants(cluster, stage_sizes=sizes, num_stages=S, path_length=L, memory=3,
                                      microbatches_per_home=6, seed=0, effort=effort)
        base = rows[0]
        for r in rows:
            ok = not validate(r.plan, Rules(memory=None if r.name.startswith("full") else 3))
            out(f"| {label} | {r.name} | {r.paper_s:.2f} | {r.paper_s / base.paper_s:.3f} | {r.full_s:.2f} | "
                f"{r.full_s / base.full_s:.3f} | {r.planner_s:.2f} | {'yes' if ok else 'NO'} |")
        sizes_used = [len(g) for g in ours.stage_nodes]
        C = cluster.cost_matrix()
        a = anneal_placement(C, sizes_used, seed=0, max_evals=effort.placement_evals)
        g = genetic_placement(C, sizes_used, seed=0, population=40, trials=2000)
        place_rows.append((label, sizes_used, a, g, ours))
        if not quick:
            slug = cname.replace("-", "_")
            for name, plan in (("ours", ours.plan), ("full", rows[0].plan)):
                if name == "full" and cname != "geo-12":
                    continue
                sim = simulate(plan, cluster, mode="paper", memory=None if name == "full" else 3)
                gantt_chart(sim, plan, ROOT / "docs" / "img" / f"planner_{slug}_{name}.png",
                            title=f"{label}, {rows[0 if name == 'full' else 3].name}: {sim.iteration_s:.2f} s "
                                  f"(paper mode)")
    out()
    out("Placement (spec score = worst intra-stage link + 2 x tour of bottleneck matchings; lower is better):")
    out()
    out("| setting | stage sizes | ours: anneal score | evals | s | GA baseline score | evals | s |")
    out("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, sizes_used, a, g, ours in place_rows:
        out(f"| {label} | {sizes_used} | {a.score.total:.3f} | {a.evaluations} | {a.runtime_s:.2f} | "
            f"{g.score.total:.3f} | {g.evaluations} | {g.runtime_s:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20-node settings only; leave docs/ untouched")
    args = ap.parse_args()
    t = time.perf_counter()
    block = run(args.quick)
    print(f"\nbenchmark wall time {time.perf_counter() - t:.1f} s")
    if args.quick:
        return
    doc = ROOT / "docs" / "planner.md"
    text = doc.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        doc.write_text(f"{head}{START}\n{block}\n{END}{tail}")
        print(f"updated {doc}")
    else:
        print(f"{doc} has no {START} ... {END} block; results not written", file=sys.stderr)


if __name__ == "__main__":
    main()
