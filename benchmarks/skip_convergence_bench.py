"""Convergence at 33% skip vs the full pipeline at equal steps, and layer-omission loss (spec 7.7).

    python benchmarks/skip_convergence_bench.py [--steps 200] [--seeds 1] [--out docs/skip_convergence.md]

Both arms train the default LLaMa-style model (ring layout, S=6 stages: home + 5 body stages of
one block each) on the stdlib corpus with the same data, seed and LR schedule, on 6 CPU ranks. The
skip arm uses network-oblivious routes of L=4 (k = 1 - L/S = 33%; every microbatch skips 2 of the 5
body stages, some swap adjacent stages). After training, each model is evaluated on held-out data
(a) as the full model, all stages in order, and (b) with body stages omitted at inference
(routes of L=4 and L=3, i.e. 2 or 3 of 5 body stages removed): the perplexity ratio
exp(loss_omitted - loss_full) is SkipPipe's layer-omission robustness measure.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.runtime.spawn import run_workers  # noqa: E402

S, M, MBS, SEQ = 6, 10, 4, 64


def worker(rank: int, world: int, arm: str, steps: int, seed: int) -> dict:
    import torch

    from integration.data.dataset import build_dataset
    from integration.backends.deepspeed.backend import build_pipeline_module, warmup_cosine
    from integration.backends.deepspeed.engine import RoutingSettings
    from integration.backends.deepspeed.module import initialize_routed
    from integration.models.llama import LlamaConfig
    from integration.plan import full_pipeline, grid_stage_nodes, oblivious_skip

    dataset, vocab = build_dataset({"cache_dir": os.path.expanduser("~/.cache/skipfree/data")})
    cfg = LlamaConfig(vocab_size=vocab, d_model=128, n_heads=4, seq_len=SEQ)
    sn = grid_stage_nodes(S, 1)
    plan = full_pipeline(sn, M) if arm == "full" else oblivious_skip(sn, M, 4, seed=seed, swap_prob=0.3)
    module = build_pipeline_module(cfg, "ring", S, 1, 1, seed)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(10, steps, 0.1))
    conf = {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": M, "steps_per_print": 10 ** 9,
            "gradient_clipping": 1.0}
    engine, *_ = initialize_routed(model=module, config=conf, optimizer=opt, lr_scheduler=sched,
                                   routing=RoutingSettings(plan, act_shape=(MBS, SEQ, cfg.d_model),
                                                           label_shape=(MBS, SEQ)))
    engine.set_batch_source(lambda step, r, i: dataset.microbatch(step, r, i, 1, M, MBS, SEQ))
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        losses.append(float(engine.train_batch()))
    train_s = time.perf_counter() - t0

    def val(step, r, i):
        return dataset.microbatch(0, r, i, 1, 20, MBS, SEQ, split="validation")

    out = {"losses": losses, "train_s": train_s,
           "val_full": float(engine.evaluate(full_pipeline(sn, 20), val))}
    for L in (4, 3):
        out[f"val_omit_L{L}"] = float(engine.evaluate(oblivious_skip(sn, 20, L, seed=123), val))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = {arm: [run_workers(worker, S, arm, args.steps, seed)[0] for seed in range(args.seeds)]
               for arm in ("full", "skip")}

    def mean(xs):
        return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")

    rows = []
    for arm, runs in results.items():
        last = [statistics.mean(r["losses"][-10:]) for r in runs]
        full = [r["val_full"] for r in runs]
        ppl4 = [math.exp(r["val_omit_L4"] - r["val_full"]) for r in runs]
        ppl3 = [math.exp(r["val_omit_L3"] - r["val_full"]) for r in runs]
        rows.append(f"| {arm} | {mean(last)} | {mean(full)} | {mean([r['val_omit_L4'] for r in runs])} "
                    f"(ppl x{mean(ppl4)}) | {mean([r['val_omit_L3'] for r in runs])} (ppl x{mean(ppl3)}) | "
                    f"{mean([r['train_s'] for r in runs])} |")
    text = "\n".join([
        f"Command: `python benchmarks/skip_convergence_bench.py --steps {args.steps} --seeds {args.seeds}` "
        f"(CPU, 6 ranks, gloo; S=6 ring, L=4 for the skip arm; {M} microbatches of {MBS}x{SEQ} tokens per step).",
        "",
        "| arm | train loss (last 10 steps) | val loss, full model | val loss, 2 of 5 body stages omitted | "
        "val loss, 3 of 5 omitted | train wall s |",
        "|---|---|---|---|---|---|",
        *rows, ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
