"""Skipping on an emulated geo-distributed network: measured wall-clock vs the simulator's prediction.

    python benchmarks/wan_bench.py [--iters 20] [--quick] [--grid s6|s4x2] [--out docs/wan_results.md]  # root

Network: SkipPipe's geo-distributed region table (the ``geo-12`` profile: its first n regions in
SkipPipe's order, one host per region, n = ranks), time-scaled by ``--scale``: every link cost
C = latency + bytes/bandwidth + overhead of the paper setting is multiplied by the scale and
emulated with latency' = scale x (latency + overhead) (in-process delay layer on p2p sends and on
every ``all_reduce``, ``integration/runtime/netem.py``) and bandwidth' = our activation bytes /
(scale x paper bytes / bandwidth) (``tc`` htb per destination between namespace hosts,
``integration/runtime/wanhosts.py``). So one transfer costs about as many of our forward passes as
one paper transfer costs paper forward passes when our contended forward is ~scale x 0.44 s (the
probe reports the actual ratio).

Grids (``--grid``): ``s6`` (default) 6 stages in one column (no data-parallel all-reduce), L=4 of 6
(33% of the stages skipped), 10 microbatches; ``s4x2`` 4 stages x 2 replicas, L=3 of 4, 6 per home.

Steps, in ONE run: (1) ``probe`` the emulated hosts with the job's ranks -> a cluster file;
(2) placement, the same for every variant: the map of grid positions to hosts that is best for the
full pipeline, by the simulator's full mode on the probed profile (every map up to 7 hosts), so the
baseline is the fastest full pipeline these hosts allow; (3) plan: full pipeline, network-oblivious
skip and planned skip (``plan_for_training`` on the probed profile, same placement); (4) each backend
(routed DeepSpeed engine, megatron-core backend) runs the three plans alternately in the same
processes (warm-up, then ``--iters`` timed iterations each, a barrier before every iteration; rank
0's wall time); (5) the simulator (full mode: link contention + all-reduce) predicts each from the
probed profile, before and after calibration (``integration/plan/calibration.py``, fitted per
backend on its full pipeline's trace); a Gantt chart compares measured and predicted ops; each
iteration is split into its compute phase and the tail (all-reduce + optimizer step), and the
report states the bound the tail puts on planned/full.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Grids: stages x replicas, path length L (33% of the stages skipped), microbatches M per home,
# route memory (CC5: homes x memory x (L-1) divisible by the body stages; M a multiple of memory).
GRIDS = {"s6": dict(S=6, REPLICAS=1, L=4, M=10, MEMORY=5),   # one column: no data-parallel all-reduce
         "s4x2": dict(S=4, REPLICAS=2, L=3, M=6, MEMORY=3)}  # the earlier grid (all-reduce tail)
GRID = dict(GRIDS["s6"])  # set from --grid before any rank starts (workers get it as an argument)
S, REPLICAS, L, M, MEMORY = (GRID[k] for k in ("S", "REPLICAS", "L", "M", "MEMORY"))
BACKENDS = ("deepspeed", "megatron")
MODELS = {"small": dict(d_model=256, n_heads=4, layers=1, seq=128, mbs=4),  # activation 512 KiB
          "tiny": dict(d_model=128, n_heads=4, layers=1, seq=64, mbs=4)}    # activation 128 KiB
MODEL = dict(MODELS["small"])  # set from --model before any rank starts (workers get it as an argument)
VARIANTS = ("full", "oblivious", "planned")
PAPER_W = 0.44  # SkipPipe's forward time of one stage (0.055 s/sample/layer x 2 samples x 4 layers)


def set_grid(name: str) -> None:
    """Select a grid of :data:`GRIDS` (module globals; workers call it with the parent's choice)."""
    global S, REPLICAS, L, M, MEMORY
    GRID.clear()
    GRID.update(GRIDS[name], name=name)
    S, REPLICAS, L, M, MEMORY = (GRID[k] for k in ("S", "REPLICAS", "L", "M", "MEMORY"))


def geo_network(scale: float, placement: list[int] | None = None) -> dict:
    """The emulated network: the first S x replicas regions of geo-12 (SkipPipe's region order),
    costs scaled by ``scale`` (see the docstring); rank g sits in region ``placement[g]``."""
    from integration.plan.cluster import GIB, load_cluster
    n = S * REPLICAS
    placement = list(range(n)) if placement is None else placement
    paper = load_cluster("geo-12", num_nodes=n)
    ours = 4 * MODEL["d_model"] * MODEL["seq"] * MODEL["mbs"]
    lat, bw = paper.latency_matrix(), paper.bandwidth_matrix()
    over, nbytes = paper.workload.overhead_s, paper.workload.activation_bytes
    links = []
    for a in range(n):
        for b in range(a + 1, n):
            links.append({"a": f"g{a}", "b": f"g{b}", "latency_ms": scale * (lat[a, b] + over) * 1e3,
                          "bandwidth_GiB_per_s": ours / (scale * nbytes / bw[a, b]) / GIB})
    return {"name": f"geo{n}-x{scale}", "nodes": [{"region": f"g{placement[g]}"} for g in range(n)],
            "links": links,
            "workload": {"samples_per_microbatch": MODEL["mbs"], "seq_len": MODEL["seq"], "d_model": MODEL["d_model"],
                         "layers_per_stage": MODEL["layers"], "vocab_size": 1024, "overhead_s": 0.0}}


def region_names(placement: list[int]) -> list[str]:
    """SkipPipe's name of the region of each rank."""
    from integration.plan.cluster import load_cluster
    paper = load_cluster("geo-12", num_nodes=len(placement))
    return [paper.nodes[h].region for h in placement]


def placed(profile: dict, placement: list[int]) -> dict:
    """A cluster file with rank g on host ``placement[g]`` (links are keyed by region, so reordering the
    nodes moves them; a measured cost matrix is permuted the same way)."""
    out = dict(profile, nodes=[profile["nodes"][h] for h in placement])
    if profile.get("cost_s") is not None:
        out["cost_s"] = [[profile["cost_s"][a][b] for b in placement] for a in placement]
    return out


def full_placement(profile: dict, seed: int = 0) -> tuple[list[int], dict]:
    """The full pipeline's best rank -> host map on the probed profile, by the simulator's full mode
    (link contention + all-reduce): every map for up to 7 hosts, else pairwise-swap descent from the
    identity and 3 seeded random starts. Returns the map and the search's numbers for the report."""
    import itertools
    import random

    from integration.plan import full_pipeline, grid_stage_nodes
    from integration.plan.cluster import cluster_from_dict
    from integration.plan.simulator import simulate
    n = S * REPLICAS
    plan = full_pipeline(grid_stage_nodes(S, REPLICAS), M)
    seen: dict[tuple[int, ...], float] = {}

    def cost(p) -> float:
        if tuple(p) not in seen:
            seen[tuple(p)] = simulate(plan, cluster_from_dict(placed(profile, list(p))), mode="full", gap_s=0.0,
                                      honour_order=True).iteration_s
        return seen[tuple(p)]
    if n <= 7:
        best = min(itertools.permutations(range(n)), key=cost)
    else:
        rng, starts = random.Random(seed), [list(range(n))]
        for _ in range(3):
            starts.append(rng.sample(range(n), n))
        results = []
        for p in starts:
            better = True
            while better:
                better = False
                for i, j in itertools.combinations(range(n), 2):
                    q = list(p)
                    q[i], q[j] = q[j], q[i]
                    if cost(q) < cost(p) - 1e-9:
                        p, better = q, True
            results.append(p)
        best = min(results, key=cost)
    vals = sorted(seen.values())
    return list(best), {"searched": len(seen), "best_s": cost(best), "identity_s": cost(range(n)),
                        "median_s": vals[len(vals) // 2], "worst_s": vals[-1]}


def _engine(plan):
    import torch

    from integration.backends.deepspeed.backend import build_pipeline_module
    from integration.backends.deepspeed.engine import RoutingSettings
    from integration.backends.deepspeed.module import initialize_routed
    from integration.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=1024, d_model=MODEL["d_model"], n_heads=MODEL["n_heads"], seq_len=MODEL["seq"])
    module = build_pipeline_module(cfg, "ring", S, REPLICAS, MODEL["layers"], 0)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, foreach=False)
    conf = {"train_micro_batch_size_per_gpu": MODEL["mbs"], "gradient_accumulation_steps": M,
            "train_batch_size": MODEL["mbs"] * M * REPLICAS, "steps_per_print": 10 ** 9, "gradient_clipping": 1.0}
    settings = RoutingSettings(plan, act_shape=(MODEL["mbs"], MODEL["seq"], cfg.d_model),
                               label_shape=(MODEL["mbs"], MODEL["seq"]))
    return initialize_routed(model=module, config=conf, optimizer=opt, routing=settings)[0]


def _deepspeed_steps(rank: int, world: int, plans: dict) -> dict:
    """One iteration callable per variant: a routed DeepSpeed engine each (same rank, same stage)."""
    import torch

    from integration.backends.deepspeed.module import ensure_deepspeed_comm
    ensure_deepspeed_comm()
    g = torch.Generator().manual_seed(rank)
    steps = {}
    for name, plan in plans.items():
        eng = _engine(plan)

        def step(i, eng=eng):
            data = iter([(torch.randint(0, 1024, (MODEL["mbs"], MODEL["seq"]), generator=g),
                          torch.randint(0, 1024, (MODEL["mbs"], MODEL["seq"]), generator=g)) for _ in range(M)])
            return lambda: eng.train_batch(data)
        steps[name] = step
    return steps


def _megatron_steps(rank: int, world: int, plans: dict) -> dict:
    """One iteration callable per variant on ONE megatron backend (model, DDP, optimizer): the main
    job's backend, with a routed schedule per variant swapped in (``RoutedForwardBackward``)."""
    import torch
    from omegaconf import OmegaConf

    from integration.backends.megatron.backend import build_megatron_backend
    from integration.backends.megatron.schedule import RoutedForwardBackward
    from integration.models.llama import LlamaConfig
    cfg = OmegaConf.create({
        "parallel": {"stages": S, "replicas": REPLICAS, "tensor": 1},
        "model": {"layout": "ring", "d_model": MODEL["d_model"], "n_heads": MODEL["n_heads"],
                  "layers_per_stage": MODEL["layers"], "seq_len": MODEL["seq"], "vocab_size": 1024},
        "train": {"micro_batch_size": MODEL["mbs"], "microbatches": M, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0,
                  "weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "steps": 10 ** 6},
        "routing": {"gradient_rule": "visited", "max_inflight": None}})
    model_cfg = LlamaConfig(vocab_size=1024, d_model=MODEL["d_model"], n_heads=MODEL["n_heads"], seq_len=MODEL["seq"])
    backend = build_megatron_backend(cfg, plans["full"], model_cfg, rank, world)
    fbs = {name: backend.fb if name == "full" else
           RoutedForwardBackward(plan, num_microbatches=M, gradient_rule="visited", grid=backend.grid)
           for name, plan in plans.items()}

    def batch(step: int, replica: int, index: int):
        g = torch.Generator().manual_seed(10 ** 6 * step + 1000 * replica + index)
        return (torch.randint(0, 1024, (MODEL["mbs"], MODEL["seq"]), generator=g),
                torch.randint(0, 1024, (MODEL["mbs"], MODEL["seq"]), generator=g))

    def make(name):
        def step(i):
            def run():
                backend.fb = fbs[name]  # every plan visits every stage (CC5): the optimizer guard never skips
                backend.train_step(i, batch)
            return run
        return step
    return {name: make(name) for name in plans}


_LOG: list = []  # per-op timestamps of the running iteration (benchmark instrumentation only)
_MSG_BYTES: dict[str, int] = {}  # message kind -> bytes of its largest message (header included)
PROGRAM_OPS = lambda log: [e for e in log if e[0] not in ("allreduce", "end")]  # noqa: E731


def _record_ops() -> None:
    """Per-op timestamps: wrap the program executor's op dispatch (both backends run it), every
    ``torch.distributed.all_reduce`` (logged as ``("allreduce", -1, bytes, group ranks, start, end)``:
    the calibrated replay prices the backend's collectives) and the message sizes per kind."""
    import torch.distributed as dist

    from integration.runtime.executor import ProgramExecutor
    from integration.runtime.p2p import HEADER_BYTES, RoutedP2P
    run_op = ProgramExecutor.run_op

    def timed(self, op):
        t0 = time.perf_counter()
        run_op(self, op)
        _LOG.append((op.kind, op.mb, op.part, op.peer, t0, time.perf_counter()))
    ProgramExecutor.run_op = timed
    send = RoutedP2P.send

    def sized(self, tensor, peer, kind, mb, step):
        _MSG_BYTES[kind] = max(_MSG_BYTES.get(kind, 0), HEADER_BYTES + tensor.numel() * tensor.element_size())
        return send(self, tensor, peer, kind, mb, step)
    RoutedP2P.send = sized
    all_reduce = dist.all_reduce  # the emulation's delayed one (installed first)

    def logged_all_reduce(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        ranks = list(range(dist.get_world_size())) if group is None or group is dist.GroupMember.WORLD \
            else dist.get_process_group_ranks(group)
        t0 = time.perf_counter()
        out = all_reduce(tensor, *args, **kwargs)
        _LOG.append(("allreduce", -1, tensor.numel() * tensor.element_size(), ranks, t0, time.perf_counter()))
        return out
    dist.all_reduce = logged_all_reduce


def bench_worker(rank: int, world: int, net_file: str, plans: dict, iters: int, warmup: int, model: dict,
                 grid: str, backend: str) -> dict:
    MODEL.update(model)
    set_grid(grid)
    import torch.distributed as dist

    from integration.runtime import netem
    # tc shapes the bandwidth; the layer adds latency to p2p sends and to every all_reduce
    netem.install_from_cluster(rank, net_file, world, bandwidth=False, collectives=True)
    _record_ops()
    steps = (_deepspeed_steps if backend == "deepspeed" else _megatron_steps)(rank, world, plans)
    times = {k: [] for k in steps}
    spans = {k: [] for k in steps}  # per timed iteration: (start, end of this rank's last op, end); one clock
    traces, fit_traces = {}, []  # the last timed iteration's ops per variant; the full pipeline's, every one
    for i in range(warmup + iters):
        for name, make in steps.items():
            run = make(i)
            dist.barrier()
            _LOG.clear()
            t0 = time.perf_counter()
            run()
            t1 = time.perf_counter()
            if i >= warmup:
                prog = PROGRAM_OPS(_LOG)
                times[name].append(t1 - t0)
                spans[name].append((t0, prog[-1][5] if prog else t0, t1))
                trace = [(k, mb, part, peer, round(a - t0, 6), round(b - t0, 6))
                         for k, mb, part, peer, a, b in _LOG + [("end", -1, None, None, t1, t1)]]
                if name == "full":
                    fit_traces.append(trace)
                if i == warmup + iters - 1:
                    traces[name] = trace
    netem.uninstall()
    return {"times": times, "traces": traces, "spans": spans, "fit_traces": fit_traces, "msg_bytes": dict(_MSG_BYTES)}


def allreduce_tail(spans: dict[int, list[tuple[float, float, float]]]) -> tuple[float, float]:
    """Median (compute phase, tail) over timed iterations: the compute phase ends with the last
    program op of any rank, the tail (gradient all-reduce + optimizer step) is rank 0's iteration
    end after it. ``time.perf_counter`` is CLOCK_MONOTONIC, one clock for all processes of the machine."""
    compute, tail = [], []
    for i, (t0, _, t1) in enumerate(spans[0]):
        last = max(spans[r][i][1] for r in spans)
        compute.append(last - t0)
        tail.append(t1 - last)
    return statistics.median(compute), statistics.median(tail)


def predict(plans: dict, cluster, calibrated) -> dict:
    from integration.plan.simulator import simulate
    out = {}
    for name, plan in plans.items():
        if calibrated is None:
            out[name] = simulate(plan, cluster, mode="full", gap_s=0.0, honour_order=True)
        else:
            out[name] = calibrated.simulate(plan, cluster)
    return out


def gantt(measured: dict, predicted, plan, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(2, 1, figsize=(14, 8), sharex=True)
    ranks = list(range(S * REPLICAS))
    for ax, label in zip(axes, ("measured", "predicted")):
        if label == "measured":
            bars = [(r, mb, "loss" if part == "head" else k, a, b) for r, ops in measured.items()
                    for k, mb, part, peer, a, b in ops if k in ("fwd", "bwd")]
        else:
            bars = [(o.node, o.mb, {"F": "fwd", "B": "bwd", "L": "loss"}[o.phase], o.start, o.end)
                    for o in predicted.ops]
        for r, mb, k, a, b in bars:
            ax.barh(r, b - a, left=a, height=0.8, color="black" if k == "loss" else cmap((mb % 20) / 20),
                    hatch="///" if k == "bwd" else None, edgecolor="black", linewidth=0.3)
        ax.set_yticks(ranks)
        ax.set_yticklabels([f"rank {r} (s{r // REPLICAS} r{r % REPLICAS})" for r in ranks], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{title}: {label}", fontsize=9)
        ax.grid(axis="x", linewidth=0.3)
    axes[-1].set_xlabel("time since iteration start (s); colour = microbatch, hatched = backward, "
                        "black = head + loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per variant (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.05, help="time scale of the paper's link costs (default 0.05)")
    ap.add_argument("--model", choices=sorted(MODELS), default="small",
                    help="small: d256 seq 128 (default); tiny: d128 seq 64")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="s6",
                    help="s6: 6 stages, one column, L=4 (default); s4x2: 4 stages x 2 replicas, L=3")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: both)")
    ap.add_argument("--quick", action="store_true",
                    help="one backend (the first of --backends: DeepSpeed unless --backend megatron), 10 iterations; "
                         "ends with the one-line summary")
    ap.add_argument("--identity-baseline", action="store_true",
                    help="also measure the full pipeline on the identity rank -> host map (no placement search: "
                         "what a user gets without it, like SkipPipe's baseline), in the same run, after the variants")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here (and the Gantt PNG)")
    args = ap.parse_args()
    MODEL.update(MODELS[args.model])
    set_grid(args.grid)
    backends = [b for b in args.backends.split(",") if b]
    if any(b not in BACKENDS for b in backends):
        ap.error(f"--backends: {args.backends!r}; use a comma-separated subset of {','.join(BACKENDS)}")
    if args.quick:
        args.iters = min(args.iters, 10)
        args.warmup = 2
        backends = backends[:1]

    from integration.plan import full_pipeline, grid_stage_nodes, oblivious_skip
    from integration.plan.calibration import CalibratedModel
    from integration.plan.cluster import cluster_from_dict, load_cluster
    from integration.plan.planner import plan_for_training
    from integration.plan.probe import ProbeSettings, probe_local, write_cluster
    from integration.runtime.spawn import run_workers
    from integration.runtime.wanhosts import WanHosts

    from integration.trainer import setup_environment
    setup_environment()  # the ranks inherit it: gloo on CPU, and the venv's own op-build cache (the shared
    # ~/.cache/torch_extensions can hold a build lock another job's killed process left, which hangs every load)

    t_start = time.time()
    work = (args.out.parent if args.out else Path("outputs")) / "wan_bench"
    work.mkdir(parents=True, exist_ok=True)
    world = S * REPLICAS
    sn = grid_stage_nodes(S, REPLICAS)

    # (1) probe the hosts (host h in region h), (2) the full pipeline's best map of ranks to hosts.
    hosts_file = work / "emulated_hosts.json"
    hosts_file.write_text(json.dumps(geo_network(args.scale), indent=1))
    settings = ProbeSettings(nbytes=500_000, d_model=MODEL["d_model"], n_heads=MODEL["n_heads"],
                             layers_per_stage=MODEL["layers"], seq_len=MODEL["seq"], micro_batch_size=MODEL["mbs"])
    t = time.time()
    res = probe_local(world, settings, emulate=str(hosts_file))
    probed_hosts = json.loads(write_cluster(res, work / "probed_hosts.json").read_text())
    probe_s = time.time() - t
    print(f"probe: {res.wall_s:.1f} s inside the job ({probe_s:.0f} s with start-up)", flush=True)
    t = time.time()
    placement, search = full_placement(probed_hosts)
    net = geo_network(args.scale, placement)
    net_file = work / "emulated.json"
    net_file.write_text(json.dumps(net, indent=1))
    probed_file = work / "probed.json"
    probed_file.write_text(json.dumps(placed(probed_hosts, placement), indent=1))
    emulated, probed = cluster_from_dict(net), load_cluster(str(probed_file))
    regions = region_names(placement)
    print(f"placement: rank -> region {regions} ({search['searched']} maps, {time.time() - t:.0f} s)",
          flush=True)

    plans = {"full": full_pipeline(sn, M),
             "oblivious": oblivious_skip(sn, M, L, seed=0, swap_prob=0.3),
             "planned": plan_for_training(str(probed_file), sn, L, MEMORY, M, 0)}
    runs = {}
    with WanHosts(world, emulated.bandwidth_matrix()):
        for b in backends:
            out = run_workers(bench_worker, world, str(net_file), plans, args.iters, args.warmup, MODEL,
                              GRID["name"], b, wan=True)
            runs[b] = {"times": out[0]["times"],
                       "traces": {name: {r: out[r]["traces"][name] for r in range(world)} for name in plans},
                       "fit_traces": [{r: out[r]["fit_traces"][i] for r in range(world)}
                                      for i in range(len(out[0]["fit_traces"]))],
                       "msg_bytes": {k: max(o["msg_bytes"].get(k, 0) for o in out)
                                     for o in out for k in o["msg_bytes"]},
                       "spans": {name: {r: out[r]["spans"][name] for r in range(world)} for name in plans}}
            print(f"{b}: done ({time.time() - t_start:.0f} s)", flush=True)
    identity: dict[str, list[float]] = {}  # backend -> iteration times of the full pipeline, identity map
    if args.identity_baseline:
        ident_net = geo_network(args.scale)
        ident_file = work / "emulated_identity.json"
        ident_file.write_text(json.dumps(ident_net, indent=1))
        with WanHosts(world, cluster_from_dict(ident_net).bandwidth_matrix()):
            for b in backends:
                out = run_workers(bench_worker, world, str(ident_file), {"full": plans["full"]}, args.iters,
                                  args.warmup, MODEL, GRID["name"], b, wan=True)
                identity[b] = out[0]["times"]["full"]
                print(f"{b}: identity-map full pipeline done ({time.time() - t_start:.0f} s)", flush=True)
    # The raw record: iteration times and every rank's per-op timestamps of the last timed iteration.
    (work / "raw.json").write_text(json.dumps({"runs": runs, "placement": placement, "search": search,
                                               "identity_full_times": identity,
                                               "plans": {k: p.to_dict() for k, p in plans.items()}}))

    raw = predict(plans, probed, None)
    w = float(statistics.median(res.forward_s))
    cost = probed.cost_matrix()
    off = [cost[a][b] for a in range(world) for b in range(world) if a != b]
    paper = load_cluster("geo-12", num_nodes=world)
    pc = paper.cost_matrix()
    poff = [pc[a][b] for a in range(world) for b in range(world) if a != b]
    ratio_here, ratio_paper = statistics.median(off) / w, statistics.median(poff) / PAPER_W
    rows, tail_rows, bounds, summaries, cal_notes, gantts = [], [], [], {}, [], []
    for b, run in runs.items():
        times = run["times"]
        med = {k: statistics.median(v) for k, v in times.items()}
        fast = {k: min(v) for k, v in times.items()}
        phases = {k: allreduce_tail(run["spans"][k]) for k in plans}
        # Fitted on every timed iteration of the full pipeline (one iteration alone is noisy under load), on
        # the backend's own program (megatron hands every stage the batch) and message sizes.
        model = CalibratedModel.fit({"full": run["fit_traces"]}, carry_batch=b == "megatron",
                                    message_bytes={k: v for k, v in run["msg_bytes"].items()
                                                   if k not in ("act", "grad")})
        cal = predict(plans, probed, model)
        err_cal = {}
        for name in VARIANTS:
            p_raw, p_cal = raw[name].iteration_s, cal[name].iteration_s
            err_raw = abs(p_raw - med[name]) / med[name]
            err_cal[name] = abs(p_cal - med[name]) / med[name]
            rows.append(f"| {b} | {name} | {len(times[name])} | {med[name]:.3f} | {med[name] / med['full']:.3f} | "
                        f"{fast[name]:.3f} | {fast[name] / fast['full']:.3f} | {p_raw:.3f} | {100 * err_raw:.0f}% | "
                        f"{p_cal:.3f} | {100 * err_cal[name]:.0f}% |")
            tail_rows.append(f"| {b} | {name} | {phases[name][0]:.3f} | {phases[name][1]:.3f} | "
                             f"{phases[name][1] / med[name]:.2f} |")
        need = 0.55 * med["full"] - phases["planned"][1]
        bounds.append(f"{b}: planned/full <= 0.55 needs planned's compute phase <= 0.55 x {med['full']:.3f} - "
                      f"{phases['planned'][1]:.3f} (its tail) = {need:.3f} s, {need / phases['full'][0]:.2f} of the "
                      f"full pipeline's compute phase ({phases['full'][0]:.3f} s); measured {phases['planned'][0]:.3f} "
                      f"s ({phases['planned'][0] / phases['full'][0]:.2f}).")
        summaries[b] = (f"planned/full {med['planned'] / med['full']:.2f} oblivious/full "
                        f"{med['oblivious'] / med['full']:.2f} worst prediction error {100 * max(err_cal.values()):.0f}%")
        if b in identity:
            ident = statistics.median(identity[b])
            p_ident = model.simulate(plans["full"], cluster_from_dict(probed_hosts)).iteration_s
            rows.append(f"| {b} | full, identity map | {len(identity[b])} | {ident:.3f} | {ident / med['full']:.3f} | "
                        f"{min(identity[b]):.3f} | {min(identity[b]) / fast['full']:.3f} | {search['identity_s']:.3f} | "
                        f"{100 * abs(search['identity_s'] - ident) / ident:.0f}% | {p_ident:.3f} | "
                        f"{100 * abs(p_ident - ident) / ident:.0f}% |")
            summaries[b] += (f" (against the identity-map full pipeline: planned {med['planned'] / ident:.2f} "
                             f"oblivious {med['oblivious'] / ident:.2f})")
        cal_notes.append(f"{b}: {model.describe()}")
        gantt_path = (args.out.parent if args.out else work) / ("wan_gantt.png" if b == "deepspeed"
                                                               else f"wan_gantt_{b}.png")
        gantt(run["traces"]["planned"], cal["planned"], plans["planned"], gantt_path,
              f"{b}, planned skip, last timed iteration")
        gantts.append(gantt_path.name)
    cmd = "python benchmarks/wan_bench.py" + (" --quick" if args.quick else f" --iters {args.iters}") + \
        (f" --grid {args.grid}" if args.grid != "s6" else "") + \
        (f" --backends {args.backends}" if args.backends != ",".join(BACKENDS) else "") + \
        (f" --scale {args.scale}" if args.scale != 0.05 else "") + \
        (f" --model {args.model}" if args.model != "small" else "") + \
        (" --identity-baseline" if args.identity_baseline else "") + (f" --out {args.out}" if args.out else "")
    load = Path("/proc/loadavg").read_text().split()[:3]
    text = "\n".join([
        f"Command: `{cmd}` (root; routed engines: {', '.join(backends)}; CPU gloo, {world} ranks = S {S} x "
        f"{REPLICAS} replicas, L={L}, {M} microbatches per home, route memory {MEMORY}, in {world} network "
        f"namespaces, OMP_NUM_THREADS=1, 2 shared cores; {time.time() - t_start:.0f} s in all; load average at "
        f"the end {' '.join(load)}).",
        "",
        f"Network: geo-12's first {world} regions (SkipPipe's region order), link costs x {args.scale}. One transfer "
        f"costs a median {ratio_here:.1f} forward passes here (probed: median link cost "
        f"{1e3 * statistics.median(off):.0f} ms, stage forward {1e3 * w:.1f} ms, probed alone) vs {ratio_paper:.1f} "
        f"in SkipPipe's setting (median {statistics.median(poff):.2f} s vs w = {PAPER_W} s).",
        f"Placement (all variants): rank g (stage g // {REPLICAS}, replica g % {REPLICAS}) in region "
        f"{', '.join(f'{g}: {r}' for g, r in enumerate(regions))}: the full pipeline's best of "
        f"{search['searched']} rank -> host maps by the simulator's full mode on the probed profile "
        f"(predicted {search['best_s']:.3f} s; identity map {search['identity_s']:.3f}, median map "
        f"{search['median_s']:.3f}, worst {search['worst_s']:.3f}).",
        f"Probe: {res.wall_s:.1f} s for {world} ranks; max error vs the emulated table: latency "
        f"{100 * _max_rel(probed.latency_matrix(), emulated.latency_matrix()):.1f}%, bandwidth "
        f"{100 * _max_rel(np.asarray(res.bandwidth_Bps)[np.ix_(placement, placement)], emulated.bandwidth_matrix()):.1f}%.",
        "",
        "| backend | variant | timed iters | median s/iter | ratio to full | fastest s/iter | fastest ratio | "
        "predicted (uncalibrated) | error | predicted (calibrated) | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Medians over the timed iterations: compute phase (start to the last program op of any rank) and "
        "tail (gradient all-reduce + optimizer step, to rank 0's iteration end):",
        "",
        "| backend | variant | compute phase s | tail s | tail / iteration |",
        "|---|---|---|---|---|",
        *tail_rows,
        "",
        *bounds,
        "",
        "Calibration (integration/plan/calibration.py), fitted per backend on its full pipeline's trace:",
        *cal_notes,
        f"Gantt (planned, measured vs calibrated prediction): {', '.join(gantts)}",
        "",
        *[f"{b}: {summaries[b]}" for b in backends[1:]],
        summaries[backends[0]],
    ])
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    print(summaries[backends[0]])


def _max_rel(got, want) -> float:
    import numpy as np
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    off = ~np.eye(len(want), dtype=bool)
    return float(np.max(np.abs(got[off] - want[off]) / want[off]))


if __name__ == "__main__":
    main()
