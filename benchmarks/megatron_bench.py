"""Routed schedule (full-pipeline plan) vs megatron-core's stock 1F1B: iteration time on CPU/gloo.

Same model, data and process group; the two schedules alternate iteration by iteration in one
run (so drift in machine load hits both), after warm-up. Prints a table of median times and the
ratio routed/stock per pipeline size (goal <= 1.05).

    OMP_NUM_THREADS=1 python benchmarks/megatron_bench.py --iters 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dist_utils import run_workers  # noqa: E402  (spawned gloo ranks with a TCP rendezvous)

VOCAB, SEQ, HIDDEN, HEADS, MBS, LAYERS, M = 256, 64, 128, 4, 4, 2, 8


def _data(step: int, index: int):
    import torch
    g = torch.Generator().manual_seed(1000 * step + index)
    return {"tokens": torch.randint(0, VOCAB, (MBS, SEQ), generator=g),
            "labels": torch.randint(0, VOCAB, (MBS, SEQ), generator=g)}


def _worker(rank: int, world: int, iters: int, warmup: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from integration.backends.megatron.build import build_model, build_optimizer, gpt_forward_step, initialize_megatron
    from integration.backends.megatron.layout import MegatronGrid
    from integration.backends.megatron.schedule import RoutedForwardBackward
    from integration.backends.megatron.stages import gpt_config
    from integration.plan import full_pipeline

    initialize_megatron(1, world, 0)
    config = gpt_config(num_layers=LAYERS * world, hidden_size=HIDDEN, num_attention_heads=HEADS,
                        pipeline_parallel=world)
    model = build_model("linear", config, vocab_size=VOCAB, seq_len=SEQ, layers_per_stage=LAYERS, seed=0)
    opt = build_optimizer(model, lr=1e-4, clip_grad=1.0)
    grid = MegatronGrid.from_parallel_state()
    schedules = {"stock": get_forward_backward_func(),
                 "routed": RoutedForwardBackward(full_pipeline(grid.stage_nodes, M, "linear"), num_microbatches=M,
                                                 grid=grid)}
    times = {name: [] for name in schedules}
    for it in range(warmup + iters):
        for name, fb in schedules.items():
            dist.barrier()
            t0 = time.perf_counter()
            model.zero_grad_buffer()
            opt.zero_grad()
            fb(forward_step_func=gpt_forward_step, data_iterator=iter([_data(it, i) for i in range(M)]),
               model=[model], num_microbatches=M, seq_length=SEQ, micro_batch_size=MBS)
            opt.step()
            dist.barrier()
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
    ps.destroy_model_parallel()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    rows = []
    for pp in args.pp:
        times = run_workers(_worker, pp, args.iters, args.warmup)[0]
        stock, routed = statistics.median(times["stock"]), statistics.median(times["routed"])
        rows.append((pp, stock, routed, routed / stock))
    print(f"model: hidden {HIDDEN}, {LAYERS} layers/stage, seq {SEQ}, micro-batch {MBS}, {M} microbatches; "
          f"{args.iters} iterations each after {args.warmup} warm-up, alternating")
    print("| PP | stock 1F1B median (s) | routed full plan median (s) | ratio routed/stock |")
    print("|---:|---:|---:|---:|")
    for pp, stock, routed, ratio in rows:
        print(f"| {pp} | {stock:.4f} | {routed:.4f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
