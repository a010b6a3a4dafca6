"""Skipping on an emulated geo-distributed network: measured wall-clock vs the simulator's prediction.

    python benchmarks/wan_bench.py [--iters 20] [--quick] [--out docs/wan.md]      # root: namespaces, tc

Network: SkipPipe's geo-distributed region table (the ``geo-12`` profile, first 8 regions: node i =
rank i, ranks on a grid of S=4 stages x 2 replicas), time-scaled by ``--scale``: every link cost
C = latency + bytes/bandwidth + overhead of the paper setting is multiplied by the scale and
emulated with latency' = scale x (latency + overhead) (in-process delay layer,
``integration/runtime/netem.py``) and bandwidth' = our activation bytes / (scale x paper bytes /
bandwidth) (``tc`` htb per destination between namespace hosts, ``integration/runtime/wanhosts.py``).
So one transfer costs about as many of our forward passes as one paper transfer costs paper forward
passes when our contended forward is ~scale x 0.44 s (the probe reports the actual ratio).

Steps, in ONE run: (1) ``probe`` the emulated network with the job's ranks -> a cluster file;
(2) plan: full pipeline, network-oblivious skip (L=3 of S=4: 33% of the body stages skipped) and
planned skip (``plan_for_training`` on the probed file); (3) the routed DeepSpeed engine runs the
three plans alternately in the same 8 processes (warm-up, then ``--iters`` timed iterations each,
a barrier before every iteration; rank 0's wall time); (4) the simulator (full mode: link
contention + all-reduce) predicts each from the probed profile, before and after calibration
(``integration/plan/calibration.py``); a Gantt chart compares measured and predicted ops; each
iteration is split into its compute phase and the all-reduce tail, and the report states the bound
the tail puts on planned/full.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

S, REPLICAS, L, M = 4, 2, 3, 6  # 8 ranks; CC5: M x (L-1) divisible by S-1
MODELS = {"small": dict(d_model=256, n_heads=4, layers=1, seq=128, mbs=4),  # activation 512 KiB
          "tiny": dict(d_model=128, n_heads=4, layers=1, seq=64, mbs=4)}    # activation 128 KiB
MODEL = dict(MODELS["small"])  # set from --model before any rank starts (workers get it as an argument)
VARIANTS = ("full", "oblivious", "planned")
PAPER_W = 0.44  # SkipPipe's forward time of one stage (0.055 s/sample/layer x 2 samples x 4 layers)


def geo_network(scale: float) -> dict:
    """The emulated network: geo-12's first 8 regions, costs scaled by ``scale`` (see the docstring)."""
    from integration.plan.cluster import GIB, load_cluster
    paper = load_cluster("geo-12", num_nodes=S * REPLICAS)
    ours = 4 * MODEL["d_model"] * MODEL["seq"] * MODEL["mbs"]
    lat, bw = paper.latency_matrix(), paper.bandwidth_matrix()
    over, nbytes = paper.workload.overhead_s, paper.workload.activation_bytes
    n = paper.num_nodes
    links = []
    for a in range(n):
        for b in range(a + 1, n):
            links.append({"a": f"g{a}", "b": f"g{b}", "latency_ms": scale * (lat[a, b] + over) * 1e3,
                          "bandwidth_GiB_per_s": ours / (scale * nbytes / bw[a, b]) / GIB})
    return {"name": f"geo8-x{scale}", "nodes": [{"region": f"g{i}"} for i in range(n)], "links": links,
            "workload": {"samples_per_microbatch": MODEL["mbs"], "seq_len": MODEL["seq"], "d_model": MODEL["d_model"],
                         "layers_per_stage": MODEL["layers"], "vocab_size": 1024, "overhead_s": 0.0}}


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


def _record_ops(engine, log: list) -> None:
    """Per-op timestamps: wrap this engine's executor (benchmark instrumentation only)."""
    run_op = engine.executor.run_op

    def timed(op):
        t0 = time.perf_counter()
        run_op(op)
        log.append((op.kind, op.mb, op.part, op.peer, t0, time.perf_counter()))
    engine.executor.run_op = timed


def bench_worker(rank: int, world: int, net_file: str, plans: dict, iters: int, warmup: int, model: dict) -> dict:
    import torch
    MODEL.update(model)
    import torch.distributed as dist

    from integration.backends.deepspeed.module import ensure_deepspeed_comm
    from integration.runtime import netem
    netem.install_from_cluster(rank, net_file, world, bandwidth=False)  # tc shapes the bandwidth
    ensure_deepspeed_comm()
    g = torch.Generator().manual_seed(rank)
    engines, logs = {}, {}
    for name, plan in plans.items():
        engines[name] = _engine(plan)
        logs[name] = []
        _record_ops(engines[name], logs[name])
    times = {k: [] for k in engines}
    spans = {k: [] for k in engines}  # per timed iteration: (start, end of this rank's last op, end); one clock
    traces = {}
    for i in range(warmup + iters):
        for name, eng in engines.items():
            data = iter([(torch.randint(0, 1024, (MODEL["mbs"], MODEL["seq"]), generator=g),
                          torch.randint(0, 1024, (MODEL["mbs"], MODEL["seq"]), generator=g)) for _ in range(M)])
            dist.barrier()
            logs[name].clear()
            t0 = time.perf_counter()
            eng.train_batch(data)
            t1 = time.perf_counter()
            dt = t1 - t0
            if i >= warmup:
                times[name].append(dt)
                spans[name].append((t0, logs[name][-1][5] if logs[name] else t0, t1))
            if i == warmup + iters - 1:
                traces[name] = [(k, mb, part, peer, a - t0, b - t0) for k, mb, part, peer, a, b in logs[name]]
    netem.uninstall()
    return {"times": times, "traces": traces, "spans": spans}


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
    ap.add_argument("--quick", action="store_true", help="fewer iterations (10); ends with the one-line summary")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here (and the Gantt PNG)")
    args = ap.parse_args()
    MODEL.update(MODELS[args.model])
    if args.quick:
        args.iters = min(args.iters, 10)
        args.warmup = 2

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
    net = geo_network(args.scale)
    net_file = work / "emulated_geo8.json"
    net_file.write_text(json.dumps(net, indent=1))
    world = S * REPLICAS
    emulated = cluster_from_dict(net)
    sn = grid_stage_nodes(S, REPLICAS)

    settings = ProbeSettings(nbytes=500_000, d_model=MODEL["d_model"], n_heads=MODEL["n_heads"],
                             layers_per_stage=MODEL["layers"], seq_len=MODEL["seq"], micro_batch_size=MODEL["mbs"])
    t = time.time()
    res = probe_local(world, settings, emulate=str(net_file))
    probed_file = write_cluster(res, work / "probed_geo8.json")
    probe_s = time.time() - t
    probed = load_cluster(str(probed_file))
    print(f"probe: {res.wall_s:.1f} s inside the job ({probe_s:.0f} s with start-up) -> {probed_file}", flush=True)

    plans = {"full": full_pipeline(sn, M),
             "oblivious": oblivious_skip(sn, M, L, seed=0, swap_prob=0.3),
             "planned": plan_for_training(str(probed_file), sn, L, 3, M, 0)}
    with WanHosts(world, emulated.bandwidth_matrix()):
        out = run_workers(bench_worker, world, str(net_file), plans, args.iters, args.warmup, MODEL, wan=True)
    times = out[0]["times"]
    traces = {name: {r: out[r]["traces"][name] for r in range(world)} for name in plans}
    # The raw record: iteration times and every rank's per-op timestamps of the last timed iteration.
    spans = {name: {r: out[r]["spans"][name] for r in range(world)} for name in plans}
    (work / "raw.json").write_text(json.dumps({"times": times, "traces": traces, "spans": spans,
                                               "plans": {k: p.to_dict() for k, p in plans.items()}}))
    med = {k: statistics.median(v) for k, v in times.items()}
    phases = {k: allreduce_tail(spans[k]) for k in plans}

    raw = predict(plans, probed, None)
    model = CalibratedModel.fit(traces)
    cal = predict(plans, probed, model)

    w = float(statistics.median(res.forward_s))
    cost = probed.cost_matrix()
    off = [cost[a][b] for a in range(world) for b in range(world) if a != b]
    paper = load_cluster("geo-12", num_nodes=world)
    pc = paper.cost_matrix()
    poff = [pc[a][b] for a in range(world) for b in range(world) if a != b]
    ratio_here, ratio_paper = statistics.median(off) / w, statistics.median(poff) / PAPER_W
    rows = []
    err_raw, err_cal = {}, {}
    for name in VARIANTS:
        p_raw, p_cal = raw[name].iteration_s, cal[name].iteration_s
        err_raw[name] = abs(p_raw - med[name]) / med[name]
        err_cal[name] = abs(p_cal - med[name]) / med[name]
        rows.append(f"| {name} | {len(times[name])} | {med[name]:.3f} | {med[name] / med['full']:.3f} | "
                    f"{p_raw:.3f} | {100 * err_raw[name]:.0f}% | {p_cal:.3f} | {100 * err_cal[name]:.0f}% |")
    gantt_path = (args.out.parent if args.out else work) / "wan_gantt.png"
    gantt(traces["planned"], cal["planned"], plans["planned"], gantt_path, "planned skip, last timed iteration")
    tail_rows = [f"| {name} | {phases[name][0]:.3f} | {phases[name][1]:.3f} | {phases[name][1] / med[name]:.2f} |"
                 for name in VARIANTS]
    # With its measured tail, planned skip reaches 0.55 x full only if its compute phase fits the rest.
    need = 0.55 * med["full"] - phases["planned"][1]
    bound = (f"Bound from the all-reduce: planned/full <= 0.55 needs planned's compute phase <= 0.55 x "
             f"{med['full']:.3f} - {phases['planned'][1]:.3f} (its tail) = {need:.3f} s, "
             f"{need / phases['full'][0]:.2f} of the full pipeline's compute phase ({phases['full'][0]:.3f} s); "
             f"measured {phases['planned'][0]:.3f} s ({phases['planned'][0] / phases['full'][0]:.2f}). "
             f"With a compute phase of 0 the ratio would still be {phases['planned'][1] / med['full']:.2f}.")
    summary = (f"planned/full {med['planned'] / med['full']:.2f} oblivious/full {med['oblivious'] / med['full']:.2f} "
               f"worst prediction error {100 * max(err_cal.values()):.0f}%")
    cmd = "python benchmarks/wan_bench.py" + (" --quick" if args.quick else f" --iters {args.iters}") + \
        (f" --scale {args.scale}" if args.scale != 0.05 else "") + \
        (f" --model {args.model}" if args.model != "small" else "") + (f" --out {args.out}" if args.out else "")
    text = "\n".join([
        f"Command: `{cmd}` (root; DeepSpeed routed engine, CPU gloo, 8 ranks = S {S} x {REPLICAS} replicas in 8 "
        f"network namespaces, OMP_NUM_THREADS=1, 2 shared cores; {time.time() - t_start:.0f} s in all).",
        "",
        f"Scale: SkipPipe geo-distributed link costs x {args.scale}. One transfer costs a median "
        f"{ratio_here:.1f} forward passes here (probed: median link cost {1e3 * statistics.median(off):.0f} ms, "
        f"stage forward {1e3 * w:.1f} ms, probed alone) vs {ratio_paper:.1f} in SkipPipe's setting "
        f"(median {statistics.median(poff):.2f} s vs w = {PAPER_W} s).",
        f"Probe: {res.wall_s:.1f} s for {world} ranks; max error vs the emulated table: latency "
        f"{100 * _max_rel(probed.latency_matrix(), emulated.latency_matrix()):.1f}%, bandwidth "
        f"{100 * _max_rel(res.bandwidth_Bps, emulated.bandwidth_matrix()):.1f}%.",
        "",
        "| variant | timed iters | median s/iter | ratio to full | predicted (uncalibrated) | error | "
        "predicted (calibrated) | error |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Medians over the timed iterations: compute phase (start to the last program op of any rank) and "
        "tail (gradient all-reduce + optimizer step, to rank 0's iteration end):",
        "",
        "| variant | compute phase s | tail s | tail / iteration |",
        "|---|---|---|---|",
        *tail_rows,
        "",
        bound,
        "",
        f"Calibration (integration/plan/calibration.py): {model.describe()}",
        f"Gantt (planned, measured vs calibrated prediction): {gantt_path.name}",
        "",
        summary,
    ])
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    print(summary)


def _max_rel(got, want) -> float:
    import numpy as np
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    off = ~np.eye(len(want), dtype=bool)
    return float(np.max(np.abs(got[off] - want[off]) / want[off]))


if __name__ == "__main__":
    main()
