"""A small fault-tolerant training job for the agent: routed DeepSpeed or megatron-core pipeline with recovery.

    python -m launch.agent --nproc 5 --hot-spares 1 -- -m integration.recovery.worker \
        out=/tmp/run recovery.inject="kill:stage=2,step=3,phase=backward"

Overrides are ``key=value`` (Hydra syntax, passed through by the agent unchanged). The job trains
the default LLaMa-style ring model (``backend=megatron``: megatron-core stages) on synthetic tokens (step-addressed, so replays are exact) and
writes per rank under ``out/rank<R>``: ``events.jsonl`` (recovery events), ``audit.jsonl`` (per
applied step: loss and a sha256 of weights + optimizer state), ``recovery_g<G>.pt`` (the stage
state right after each recovery, with the states received for a rebuild) and ``final.pt`` (with
``recovery.home_replica=true`` also the digests and step tags of the home mirrors this rank holds
and the replication's traffic and time).
The tests of :mod:`tests.recovery.test_recovery_integration` check these files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

DEFAULTS = {
    "out": "outputs/recovery-worker",
    "stages": 5, "replicas": 1, "layers_per_stage": 1,
    "model": {"vocab_size": 128, "d_model": 32, "n_heads": 2, "seq_len": 16},
    "train": {"steps": 8, "micro_batch_size": 2, "microbatches": 2, "lr": 3e-3, "min_lr": 3e-4,
              "warmup_steps": 2, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 5},
    "routing": "full",  # full | checkfree_plus
    "backend": "deepspeed",  # deepspeed | megatron (megatron-core stages, TP=1)
    "tensorboard": False,  # rank 0 writes recovery/* scalars under out/tensorboard
    "recovery": {"fallback": "checkpoint", "lr_scale": 1.1, "weight_statistic": "clipped_l2",
                 "heartbeat_s": 0.3, "poll_s": 0.03, "inject": ""},
}


def main(argv: list[str]) -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is a stuck rank?
    torch.set_num_threads(1)
    from integration.recovery.context import RankContext

    ctx = RankContext.from_env()  # a hot spare blocks here until promoted
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_dotlist(argv))

    from integration.data.dataset import TokenDataset
    from integration.models.llama import LlamaConfig
    from integration.plan.builders import build_plan
    from integration.plan.routeplan import grid_stage_nodes
    from integration.recovery.checkpoint import Checkpointer
    from integration.recovery.engine import FaultTolerantBackend
    from integration.recovery.events import EventLog
    from integration.recovery.session import FaultTolerantSession, RecoverySettings
    from integration.recovery.state import digest_of, stage_state, state_digest

    out = Path(cfg.out) / f"rank{ctx.rank}"
    out.mkdir(parents=True, exist_ok=True)
    S, D, tr = int(cfg.stages), int(cfg.replicas), cfg.train
    model_cfg = LlamaConfig(**OmegaConf.to_container(cfg.model)).validate()
    plan = build_plan(str(cfg.routing), grid_stage_nodes(S, D), int(tr.microbatches))
    mbs, seq = int(tr.micro_batch_size), model_cfg.seq_len
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, 200_000, dtype=np.int64)
    data = TokenDataset(tokens, 0.0, seed=1)
    # The main job's config shape, so the worker builds exactly what DeepSpeedBackend builds.
    backend_cfg = OmegaConf.create({"parallel": {"stages": S, "replicas": D, "tensor": 1},
                                    "model": {"layout": "ring", "layers_per_stage": int(cfg.layers_per_stage),
                                              "n_heads": model_cfg.n_heads, "d_model": model_cfg.d_model,
                                              "seq_len": model_cfg.seq_len},
                                    "train": OmegaConf.to_container(tr), "routing": {"gradient_rule": "visited"}})
    if str(cfg.backend) not in ("deepspeed", "megatron"):
        raise ValueError(f"backend: {cfg.backend!r}; use deepspeed or megatron")

    def batch(step: int, replica: int, index: int):
        return data.microbatch(step, replica, index, D, int(tr.microbatches), mbs, seq)

    def make_backend(guard, joining: bool):
        if cfg.backend == "megatron":
            from integration.recovery.megatron_engine import FaultTolerantMegatronBackend
            return FaultTolerantMegatronBackend(backend_cfg, plan, model_cfg, ctx.rank, S * D, guard=guard)
        return FaultTolerantBackend(backend_cfg, plan, model_cfg, ctx.rank, S * D, guard=guard, defer_engine=joining)

    def on_recovered(info: dict) -> None:
        s = info["session"]
        torch.save({"generation": s.guard.generation, "stage": s.stage, "replica": s.replica,
                    "model": stage_state(s.module), "digest": state_digest(s.module, s.optimizer),
                    "grad_norm": s.guard.last_grad_norm, "received": info["received"],
                    "actions": [a.describe() for a in info["actions"]],
                    "optimizer_state_empty": not s.optimizer.state,
                    "lr_scale": s.optimizer.param_groups[0].get("lr_scale", 1.0)},
                   out / f"recovery_g{s.guard.generation}.pt")

    writer = None
    if cfg.tensorboard and ctx.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(Path(cfg.out) / "tensorboard"))
    settings = RecoverySettings.from_mapping(OmegaConf.to_container(cfg.recovery))
    ckpt = None
    if settings.checkpoint_every > 0:
        ckpt = Checkpointer(Path(settings.checkpoint_dir or Path(cfg.out) / "checkpoints"), settings.checkpoint_every,
                            ctx.connect(), S * D, ctx.rank)
    run = FaultTolerantSession(ctx, plan, make_backend, settings, EventLog(out / "events.jsonl", ctx.rank, writer),
                               on_recovered, checkpoints=ckpt)
    audit = (out / "audit.jsonl").open("a")
    while run.global_steps < int(tr.steps):
        step = run.global_steps
        loss = run.train_step(batch)
        if loss is None:
            continue
        audit.write(json.dumps({"pid": os.getpid(), "time": time.time(), "generation": run.guard.generation,
                                "step": step, "loss": loss,
                                "lr": run.optimizer.param_groups[0]["lr"],
                                "digest": state_digest(run.module, run.optimizer)}) + "\n")
        audit.flush()
    opt_steps = sorted({int(st["step"]) for st in run.optimizer.state.values()})
    home = None
    if run.home is not None:
        home = {"tags": run.home.tags(), "stats": dataclasses.asdict(run.home.stats),
                "digests": {r: digest_of(p["model"], p["optimizer"])
                            for r, p in ((r, run.home.payload(r)) for r in run.home.mirrors)}}
    torch.save({"model": stage_state(run.module), "opt_steps": opt_steps, "applied": run.guard.applied_steps,
                "recoveries": run.recoveries, "home_mirror": home}, out / "final.pt")
    from integration.recovery.detect import all_reduce
    all_reduce(torch.zeros(1), run.monitor, "final barrier")  # nobody leaves while a peer may still need it
    run.monitor.stop()
    audit.close()
    if writer is not None:
        writer.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # A waiter thread abandoned after a failure may still sit in a gloo wait of a dead group; normal
    # interpreter shutdown would then abort in C++ (std::terminate), so leave without it.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
