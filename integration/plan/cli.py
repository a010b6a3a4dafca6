"""Command line: ``python -m integration.plan {plan,simulate,validate,compare,probe}``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .cluster import ClusterConfigError, builtin_names, load_cluster
from .placement import LayoutError
from .probe import ProbeError
from .routeplan import PlanFormatError, RoutePlan, grid_stage_nodes
from .rules import PlanValidationError, Rules, Violation, validate
from .simulator import SimulationError

EPILOG = """examples:
  python -m integration.plan plan --cluster geo-12 --out out/geo12
  python -m integration.plan compare --cluster 5-clusters
  python -m integration.plan plan --cluster skippipe-20 --placement given --out out/sp20
  python -m integration.plan plan --cluster synthetic-100 --stages 8 --path-length 6 --out out/s100
  python -m integration.plan simulate out/geo12/plan.json --cluster geo-12 --gantt out/geo12/full.png --mode full
  python -m integration.plan validate out/geo12/plan.json
  python -m integration.plan probe --ranks 8 --out out/probed.json      # or on every rank of a job (RANK, WORLD_SIZE)
clusters: built-in """ + ", ".join(builtin_names()) + """, or a YAML/JSON file (schema: docs/planner.md)"""


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 5,3,3,3,3,3, got {text!r}")


def _add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default="geo-12", help="built-in profile or YAML/JSON file (default geo-12)")
    p.add_argument("--nodes", type=int, default=None, help="node count for built-in profiles (default 20)")
    p.add_argument("--stages", "-S", type=int, default=6, help="pipeline stages S incl. the home stage (default 6)")
    p.add_argument("--path-length", "-L", type=int, default=4, help="stages per route L incl. home (default 4)")
    p.add_argument("--memory", type=int, default=3, help="live microbatch activations per node (default 3)")
    p.add_argument("--microbatches", "-m", type=int, default=6, help="microbatches per home node (default 6)")
    p.add_argument("--stage-sizes", type=_ints, default=None,
                   help="nodes per stage, e.g. 5,3,3,3,3,3 (default: from |P0|*(L-1) = |Ps|*(S-1))")
    p.add_argument("--grid", action="store_true",
                   help="fixed placement: consecutive ranks per stage (the training job's grid)")
    p.add_argument("--placement", choices=["search", "grid", "given"], default="search",
                   help="search (default), grid (= --grid) or given: the cluster's own partition "
                        "(e.g. skippipe-20's published one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim-evals", type=int, default=2000, help="simulated-search budget (default 2000)")
    p.add_argument("--time-budget", type=float, default=None, help="wall-time cap in seconds (not deterministic)")


def _common(args: argparse.Namespace):
    from .placement import derive_stage_sizes
    from .planner import Effort
    cluster = load_cluster(args.cluster, num_nodes=args.nodes)
    stage_nodes = None
    if args.placement == "given":
        if cluster.partition is None:
            raise ClusterConfigError(f"--placement given: cluster {cluster.name!r} has no 'partition'; add one to the "
                                     f"cluster file or use --placement search")
        return cluster, [list(g) for g in cluster.partition], Effort(sim_evals=args.sim_evals)
    if args.grid or args.placement == "grid":
        sizes = args.stage_sizes or derive_stage_sizes(cluster.num_nodes, args.stages, args.path_length, args.memory,
                                                       args.microbatches)
        stage_nodes = grid_stage_nodes(len(sizes), sizes)
    return cluster, stage_nodes, Effort(sim_evals=args.sim_evals)


def _report(res, cluster) -> dict:
    return {"cluster": cluster.name, "stage_nodes": res.stage_nodes, "placement_score": res.placement_score,
            "predicted_paper_s": res.predicted_paper_s, "predicted_full_s": res.predicted_full_s,
            "planner_runtime_s": res.runtime_s, "policy": res.policy, "evaluations": res.evaluations}


def cmd_plan(args: argparse.Namespace) -> int:
    from .gantt import gantt_chart
    from .planner import plan_routes
    from .simulator import simulate
    cluster, stage_nodes, effort = _common(args)
    res = plan_routes(cluster, stage_nodes=stage_nodes, stage_sizes=args.stage_sizes, num_stages=args.stages,
                      path_length=args.path_length, memory=args.memory, microbatches_per_home=args.microbatches,
                      seed=args.seed, time_budget_s=args.time_budget, effort=effort)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res.plan.save(out / "plan.json")
    report = _report(res, cluster)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    sim = simulate(res.plan, cluster, mode="paper", memory=args.memory)
    gantt_chart(sim, res.plan, out / "gantt.png")
    print(f"plan:     {out / 'plan.json'} ({res.plan.num_microbatches} microbatches, valid)")
    print(f"predicted iteration: {res.predicted_paper_s:.2f} s (paper mode), {res.predicted_full_s:.2f} s (full mode)")
    print(f"placement score: {res.placement_score:.3f}   planner: {res.runtime_s:.2f} s")
    print(f"report:   {out / 'report.json'}\ngantt:    {out / 'gantt.png'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .gantt import gantt_chart
    from .simulator import simulate
    plan = RoutePlan.load(args.plan)
    broken = [v for v in validate(plan, Rules(memory=None, equal_visits=False)) if v.rule in ("LAYOUT", "CC1", "CC2")]
    if broken or not plan.routes:
        raise PlanValidationError(broken or [Violation("LAYOUT", None, "the plan has no microbatches")],
                                  context=f"plan {args.plan} cannot be simulated: it")
    cluster = load_cluster(args.cluster, num_nodes=max(plan.nodes) + 1)
    modes = ["paper", "full"] if args.mode == "both" else [args.mode]
    for mode in modes:
        r = simulate(plan, cluster, mode=mode, memory=args.memory, honour_order=not args.fifo)
        extra = f" (all-reduce per stage: {', '.join(f'{v:.1f}' for v in r.allreduce_s.values())} s)" \
            if mode == "full" else ""
        print(f"{mode:5s}: {r.iteration_s:.2f} s{extra}")
        if args.gantt:
            g = Path(args.gantt)
            path = g if len(modes) == 1 else g.with_name(f"{g.stem}-{mode}{g.suffix}")
            gantt_chart(r, plan, path)
            print(f"gantt: {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    plan = RoutePlan.load(args.plan)
    violations = validate(plan, Rules(memory=args.memory, path_length=args.path_length))
    for v in violations:
        print(v)
    print(f"{len(violations)} violation(s) in {args.plan}" if violations else f"{args.plan}: valid")
    return 1 if violations else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .planner import compare_variants
    cluster, stage_nodes, effort = _common(args)
    rows, ours = compare_variants(cluster, stage_nodes=stage_nodes, stage_sizes=args.stage_sizes,
                                  num_stages=args.stages, path_length=args.path_length, memory=args.memory,
                                  microbatches_per_home=args.microbatches, seed=args.seed,
                                  time_budget_s=args.time_budget, effort=effort)
    base = rows[0]
    print(f"cluster {cluster.name}, {cluster.num_nodes} nodes, stage sizes {[len(g) for g in ours.stage_nodes]}, "
          f"placement score {ours.placement_score:.3f}")
    print(f"{'variant':30s} {'paper s':>9s} {'ratio':>6s} {'full s':>9s} {'ratio':>6s} {'planner s':>9s}")
    for r in rows:
        print(f"{r.name:30s} {r.paper_s:9.2f} {r.paper_s / base.paper_s:6.3f} {r.full_s:9.2f} "
              f"{r.full_s / base.full_s:6.3f} {r.planner_s:9.2f}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import os

    from .probe import ProbeError, ProbeSettings, join_or_explain, probe_local, probe_rank, write_cluster
    s = ProbeSettings(nbytes=args.bytes, pings=args.pings, reps=args.reps, d_model=args.d_model,
                      n_heads=args.n_heads, layers_per_stage=args.layers_per_stage, seq_len=args.seq_len,
                      micro_batch_size=args.micro_batch_size, timeout_s=args.timeout)
    if args.ranks is not None:
        res = probe_local(args.ranks, s, emulate=args.emulate)
    else:
        if args.emulate:
            raise ProbeError("probe --emulate: needs --ranks N (the probe then builds the emulated hosts itself)")
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise ProbeError("probe: no RANK/WORLD_SIZE in the environment; run it on every rank of the job (as the "
                             "training launcher does) or give --ranks N to spawn N ranks here")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        s.check(world)
        join_or_explain(rank, world, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                        int(os.environ.get("MASTER_PORT", "29500")), args.timeout)
        res = probe_rank(rank, world, s)
        if rank != 0:
            return 0
    path = write_cluster(res, args.out)
    n = len(res.forward_s)
    lat = [res.latency_s[a][b] * 1e3 for a in range(n) for b in range(n) if a != b]
    bw = [res.bandwidth_Bps[a][b] / 1e6 for a in range(n) for b in range(n) if a != b]
    print(f"probed {n} ranks in {res.wall_s:.1f} s: latency {min(lat):.1f}-{max(lat):.1f} ms, bandwidth "
          f"{min(bw):.2f}-{max(bw):.2f} MB/s, forward {min(res.forward_s) * 1e3:.1f}-{max(res.forward_s) * 1e3:.1f} ms")
    print(f"cluster file: {path} (plan from it: routing=planned cluster.path={path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m integration.plan",
        description="SkipPipe route planner: place nodes on stages, plan a route for every microbatch "
                    "(CC1-CC5, TC1, collision-aware TC2), predict the iteration time.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="plan routes -> plan.json, report.json, gantt.png",
                       description="Plan one iteration and write plan.json, report.json and gantt.png to --out.")
    _add_layout(p)
    p.add_argument("--out", default="plan_out", help="output folder (default plan_out)")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("simulate", help="predict the iteration time of a plan file",
                       description="Simulate a RoutePlan JSON on a cluster (paper and/or full mode).")
    p.add_argument("plan", help="RoutePlan JSON file")
    p.add_argument("--cluster", default="geo-12", help="built-in profile or YAML/JSON file (default geo-12)")
    p.add_argument("--mode", choices=["paper", "full", "both"], default="both")
    p.add_argument("--memory", type=int, default=None, help="override the plan's memory")
    p.add_argument("--fifo", action="store_true", help="ignore the plan's node_order (serve FIFO)")
    p.add_argument("--gantt", default=None, help="write a Gantt chart (.png or .svg)")
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("validate", help="list rule violations of a plan file (exit 1 if any)",
                       description="Check CC1-CC5, TC1 and the node order of a RoutePlan JSON file.")
    p.add_argument("plan", help="RoutePlan JSON file")
    p.add_argument("--memory", type=int, default=None, help="memory for TC1 (default: the plan's)")
    p.add_argument("--path-length", type=int, default=None, help="required L (default: the plan's)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("compare", help="table of the four variants (full, oblivious, no TC2, ours)",
                       description="Plan and simulate the four variants on one placement.")
    _add_layout(p)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("probe", help="measure links and stage compute with the job's processes -> cluster file",
                       description="Measure each rank pair's latency and bandwidth and each rank's stage forward/"
                                   "backward time with torch.distributed; write a cluster file the planner reads. "
                                   "Run it on every rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or give --ranks.")
    p.add_argument("--out", default="probed_cluster.json", help="cluster file to write (JSON)")
    p.add_argument("--ranks", type=int, default=None, help="spawn this many local ranks instead of joining a job")
    p.add_argument("--emulate", default=None, help="with --ranks: run them on emulated hosts shaped like this "
                                                   "cluster file (root; integration/runtime/wanhosts.py)")
    p.add_argument("--bytes", type=int, default=1_000_000, help="bandwidth message size (default 1000000)")
    p.add_argument("--pings", type=int, default=5, help="latency round trips per pair (default 5)")
    p.add_argument("--reps", type=int, default=3, help="bandwidth repetitions per direction, median kept (default 3)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--layers-per-stage", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for every rank (default 30)")
    p.set_defaults(func=cmd_probe)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ClusterConfigError, LayoutError, PlanFormatError, ValueError, SimulationError, OSError,
            ProbeError) as exc:
        # Every bad input (ValueError covers the rule and config errors) is one line, exit 2.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: input nested too deeply", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
