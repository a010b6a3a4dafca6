"""Routed DeepSpeed pipeline on CPU: overhead vs stock DeepSpeed, and compute saved by skipping.

    python benchmarks/ds_routing_bench.py [--iters 25] [--out docs/deepspeed_routing.md]

1. Overhead: full-pipeline plan on the routed engine vs stock ``PipelineEngine`` (linear layout,
   same model, data and seed), 4 stages. Both engines live in the same processes and their
   iterations alternate, so drift on the machine hits both alike. Median iteration time ratio.
2. Compute saved: a 33% skip plan vs the full plan on the routed engine (ring layout), no network
   delay, 4 stages (L=3 of S=4: a third of the body-stage work skipped) and 6 stages (L=4 of S=6,
   k=33% as in SkipPipe's main setting). Alternating iterations again.
Every iteration ends with a loss all-reduce over all ranks, so rank 0's wall time is the iteration time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.runtime.spawn import run_workers  # noqa: E402

MODELS = {
    "tiny (d128, 1 blk/stage, seq 64)": dict(d_model=128, n_heads=4, layers=1, seq=64, mbs=4),
    "small (d256, 2 blk/stage, seq 128)": dict(d_model=256, n_heads=8, layers=2, seq=128, mbs=4),
}


def _setup(model: dict):
    import torch

    from integration.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=1024, d_model=model["d_model"], n_heads=model["n_heads"], seq_len=model["seq"])
    g = torch.Generator().manual_seed(0)

    def batch():
        return (torch.randint(0, 1024, (model["mbs"], model["seq"]), generator=g),
                torch.randint(0, 1024, (model["mbs"], model["seq"]), generator=g))
    return cfg, batch


def _engine(cfg, model: dict, layout: str, S: int, m: int, plan=None, stock: bool = False):
    import deepspeed
    import torch

    from integration.backends.deepspeed.backend import build_pipeline_module
    from integration.backends.deepspeed.engine import RoutingSettings
    from integration.backends.deepspeed.module import initialize_routed

    module = build_pipeline_module(cfg, layout, S, 1, model["layers"], 0)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, foreach=False)
    conf = {"train_micro_batch_size_per_gpu": model["mbs"], "gradient_accumulation_steps": m,
            "steps_per_print": 10 ** 9, "gradient_clipping": 1.0}
    if stock:
        return deepspeed.initialize(model=module, optimizer=opt, config=conf)[0]
    settings = RoutingSettings(plan, act_shape=(model["mbs"], model["seq"], cfg.d_model),
                               label_shape=(model["mbs"], model["seq"]))
    return initialize_routed(model=module, config=conf, optimizer=opt, routing=settings)[0]


def _alternate(engines: dict, batch, m: int, iters: int, warmup: int = 3) -> dict:
    times = {k: [] for k in engines}
    for i in range(warmup + iters):
        for name, eng in engines.items():
            data = iter([batch() for _ in range(m)])
            t0 = time.perf_counter()
            eng.train_batch(data)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def overhead_worker(rank: int, world: int, model: dict, iters: int) -> dict:
    from integration.backends.deepspeed.module import ensure_deepspeed_comm
    from integration.plan import full_pipeline, grid_stage_nodes
    ensure_deepspeed_comm()
    S, m = world, 8
    cfg, batch = _setup(model)
    engines = {"stock": _engine(cfg, model, "linear", S, m, stock=True),
               "routed_full": _engine(cfg, model, "linear", S, m, full_pipeline(grid_stage_nodes(S, 1), m, "linear"))}
    return _alternate(engines, batch, m, iters)


def skip_worker(rank: int, world: int, model: dict, iters: int) -> dict:
    from integration.backends.deepspeed.module import ensure_deepspeed_comm
    from integration.plan import full_pipeline, grid_stage_nodes, oblivious_skip
    ensure_deepspeed_comm()
    S = world
    m = 6 if S == 4 else 10  # CC5: microbatches x (L-1) divisible by S-1
    L = 3 if S == 4 else 4
    cfg, batch = _setup(model)
    sn = grid_stage_nodes(S, 1)
    engines = {"full": _engine(cfg, model, "ring", S, m, full_pipeline(sn, m)),
               "skip": _engine(cfg, model, "ring", S, m, oblivious_skip(sn, m, L, seed=0, swap_prob=0.3))}
    return _alternate(engines, batch, m, iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=25, help="timed iterations per variant (after 3 warm-up)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown tables here")
    args = ap.parse_args()
    rows_over, rows_skip = [], []
    for name, model in MODELS.items():
        t = run_workers(overhead_worker, 4, model, args.iters)[0]
        s, r = statistics.median(t["stock"]), statistics.median(t["routed_full"])
        rows_over.append(f"| {name} | 4 | {s * 1e3:.1f} | {r * 1e3:.1f} | {r / s:.3f} |")
        print(rows_over[-1], flush=True)
    for name, model in MODELS.items():
        for S in (4, 6):
            t = run_workers(skip_worker, S, model, args.iters)[0]
            f, k = statistics.median(t["full"]), statistics.median(t["skip"])
            L = 3 if S == 4 else 4
            rows_skip.append(f"| {name} | {S} | {L} | {1 - L / S:.2f} | {f * 1e3:.1f} | {k * 1e3:.1f} | {k / f:.3f} |")
            print(rows_skip[-1], flush=True)
    text = "\n".join([
        f"Command: `python benchmarks/ds_routing_bench.py --iters {args.iters}` (CPU, gloo, OMP_NUM_THREADS=1 per "
        "rank, 2 cores; median over the timed iterations, variants alternate in the same processes).",
        "",
        "### Overhead: full-pipeline plan on the routed engine vs stock DeepSpeed PipelineEngine (linear layout)",
        "",
        "| model | stages | stock ms/iter | routed ms/iter | ratio (goal <= 1.05) |",
        "|---|---|---|---|---|",
        *rows_over,
        "",
        "### Compute saved by skipping (ring layout, no network delay)",
        "",
        "| model | stages S | path length L | k = 1-L/S | full ms/iter | skip ms/iter | ratio |",
        "|---|---|---|---|---|---|---|",
        *rows_skip,
        "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
