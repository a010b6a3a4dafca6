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
SEEDS = range(5)


def skippipe20(out) -> None:
    """SkipPipe's own setting: their partition, cost matrix and published times beside ours."""
    import statistics

    from integration.plan.cluster import load_committed_setting
    from integration.plan.linked import home_bound, lower_bound, tight_lower_bound
    from integration.plan.planner import plan_routes
    from integration.plan.published import PUBLISHED, full_pipeline_27, full_pipeline_30, published_plan
    c = load_cluster("skippipe-20")
    pub = load_committed_setting()["published_iteration_s"]
    base = pub["full_pipeline_baseline"]
    C, w = c.cost_matrix(), c.stage_times()
    sn = [list(g) for g in c.partition]
    lb_simple = lower_bound(sn, C, w, 3, 6, 4, Rules(), 0.1)
    lb = tight_lower_bound(sn, C, w, 3, 6, 4, Rules(), 0.1)
    out("SkipPipe's setting (`skippipe-20`: their partition, memory 3, cost matrix, 6 microbatches per home, "
        f"5 homes), paper mode. Ratios are to their published full-pipeline baseline ({base:.2f} s: 27 "
        "microbatches, 3 columns x 9, two homes idle). Lower bound = no plan on that placement can end "
        "earlier (linked.tight_lower_bound; FIFO = served first-come first-served, node_order ignored).")
    out()
    out("| plan | published s | our simulator s | FIFO s | x their baseline | lower bound s | planner s | CPU s |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|")
    fp27 = simulate(full_pipeline_27(), c).iteration_s
    out(f"| their full pipeline (27 mb, 3 columns x 9) | {base:.2f} | {fp27:.2f} | - | {fp27 / base:.3f} | - | - | - |")
    fp30 = simulate(full_pipeline_30(), c).iteration_s
    out(f"| our full pipeline (30 mb, 5 homes x 6, columns shared) | - | {fp30:.2f} | - | {fp30 / base:.3f} | - | - | - |")
    for name in PUBLISHED:
        t = simulate(published_plan(name), c).iteration_s
        out(f"| SkipPipe {name} | {pub[name]:.2f} | {t:.2f} | {t:.2f} | {t / base:.3f} | {lb:.2f} | - | - |")
    for label, given in (("their partition", True), ("our placement search", False)):
        ratios = []
        for seed in SEEDS:
            t0, c0 = time.perf_counter(), time.process_time()
            res = plan_routes(c, stage_nodes=sn if given else None, stage_sizes=None if given else [5, 3, 3, 3, 3, 3],
                              seed=seed)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            t = simulate(res.plan, c).iteration_s
            fifo = simulate(res.plan, c, honour_order=False).iteration_s
            bound = lb if given else tight_lower_bound(res.stage_nodes, C, w, 3, 6, 4, Rules(), 0.1)
            ok = "" if not validate(res.plan, Rules(memory=3)) else " (INVALID)"
            out(f"| ours, {label}, seed {seed}{ok} | - | {t:.2f} | {fifo:.2f} | {t / base:.3f} | {bound:.2f} | "
                f"{secs:.2f} | {cpu:.2f} |")
            ratios.append(t / base)
        out(f"| ours, {label}: median / worst over {len(ratios)} seeds | - | - | - | "
            f"{statistics.median(ratios):.3f} / {max(ratios):.3f} | - | - | - |")
    out()
    # The floor on their partition, in numbers (proof in docs/planner.md, "Lower bound").
    h = max(sn[0], key=lambda h: home_bound(sn, C, w, 3, 6, 4, Rules(), 0.1, h))
    out(f"Floor on their partition: the simple bound (shortest round trips, slot offsets) is {lb_simple:.2f} s "
        f"= {lb_simple / base:.3f}x; home {h} alone, scheduled exactly by CP-SAT over its routes (other homes "
        f"removed, times rounded down), cannot end before {home_bound(sn, C, w, 3, 6, 4, Rules(), 0.1, h):.3f} s "
        f"= {lb / base:.4f}x. Goals 0.38x = {0.38 * base:.2f} s and 0.40x = {0.40 * base:.2f} s lie below it. "
        f"Load average at the end: {open('/proc/loadavg').read().split()[0]}.")
    out()


def run(quick: bool) -> str:
    lines = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    out(f"Command: `{COMMAND}` (seed 0; {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, one process; planner s = wall clock).")
    out()
    skippipe20(out)
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
