"""The main job's fault-tolerant branch (``integration/train.py recovery=checkfree|checkfree_plus|degraded``).

Runs under :mod:`launch.agent` (which owns the store, detects deaths and hangs, respawns or promotes
a hot spare). Same model, data, plan and outputs as the plain main job, but the process group,
engine and recovery belong to :class:`integration.recovery.session.FaultTolerantSession` (``backend=deepspeed``
or ``backend=megatron``, the latter at TP=1 in the ring layout):

    python -m launch.agent --nproc 4 --spares 1 -- integration/train.py recovery=checkfree \
        recovery.inject='kill:stage=2,step=5,phase=backward'

Every recovery event (method, detect/regroup/transfer/first-good-step seconds, loss before/after)
goes to the rank's log (``train.log``), ``events.jsonl`` and, on rank 0, TensorBoard
(``recovery/*``). ``summary.json`` carries the list of recoveries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("skipfree.train")


def recovery_enabled(cfg: Any) -> bool:
    """True when the config selects a recovery method (``recovery`` group other than ``none``)."""
    rec = cfg.get("recovery")
    return rec is not None and str(rec.get("name", "none")) != "none"


def _retarget_outputs(out_dir: Path, rank: int) -> Path:
    """A hot spare started before it had a rank, so Hydra gave it rank 0's directory; move to its own."""
    want = out_dir.parent / f"rank{rank}"
    if want == out_dir:
        return out_dir
    want.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            new = logging.FileHandler(want / Path(h.baseFilename).name)
            new.setFormatter(h.formatter)
            new.setLevel(h.level)
            root.removeHandler(h)
            h.close()
            root.addHandler(new)
    return want


def run_fault_tolerant(cfg: Any, plan: Any, dataset: Any, model_cfg: Any, out_dir: Path) -> dict:
    """Train as configured, surviving stage failures; returns (and writes) the summary. Ends the process.

    A planned job-wide stop (an unrecoverable loss, agreed by every rank) ends this rank with the
    session's one paragraph on stderr and exit code 1, no traceback; ``SKIPFREE_DEBUG=1`` re-raises it.
    """
    from .session import JobStopped

    try:
        return _run_fault_tolerant(cfg, plan, dataset, model_cfg, out_dir)
    except JobStopped as stop:
        if os.environ.get("SKIPFREE_DEBUG", "") not in ("", "0"):
            raise
        logging.shutdown()  # the session already printed the one-paragraph reason (FaultTolerantSession._abort_job)
        sys.stdout.flush()
        sys.stderr.flush()
        # As at the normal end: an abandoned waiter thread in a dead group's gloo wait would abort shutdown.
        os._exit(1)


def _run_fault_tolerant(cfg: Any, plan: Any, dataset: Any, model_cfg: Any, out_dir: Path) -> dict:
    from omegaconf import OmegaConf

    from ..config import ConfigError
    from .checkpoint import Checkpointer
    from .context import RankContext
    from .detect import PeerFailure, all_gather_object, all_reduce
    from .engine import FaultTolerantBackend
    from .events import EventLog
    from .session import FaultTolerantSession, RecoverySettings, state_digest

    import torch

    if int(cfg.routing.get("resample_every", 0) or 0):
        raise ConfigError("recovery: routing.resample_every is not supported with recovery (every generation "
                          "must run one fixed plan); set routing.resample_every=0")
    megatron = cfg.backend.name == "megatron"
    rec = {k: v for k, v in OmegaConf.to_container(cfg.recovery, resolve=True).items() if k != "name"}
    try:
        settings = RecoverySettings.from_mapping(rec)
        if megatron:
            from .megatron_engine import check_megatron_recovery
            check_megatron_recovery(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if "RANK" not in os.environ and "SKIPFREE_SPARE" not in os.environ:
        raise ConfigError("recovery: run the job under the fault-tolerant agent: python -m launch.agent "
                          "--nproc N [--spares 1] -- integration/train.py recovery=... (it owns the store)")

    ctx = RankContext.from_env()  # a hot spare waits here (imports, data and plan already done)
    out_dir = _retarget_outputs(out_dir, ctx.rank)
    world, rank = ctx.world_size, ctx.rank
    mbs, seq, mb_per_home = int(cfg.train.micro_batch_size), int(model_cfg.seq_len), int(cfg.train.microbatches)
    homes = len(plan.stage_nodes[0])
    val_mb = int(cfg.train.val_microbatches)

    def train_batch(step: int, replica: int, index: int):
        return dataset.microbatch(step, replica, index, homes, mb_per_home, mbs, seq)

    def val_batch(step: int, replica: int, index: int):
        return dataset.microbatch(0, replica, index, homes, val_mb, mbs, seq, split="validation")

    def make_backend(guard, joining: bool):
        if megatron:
            from .megatron_engine import FaultTolerantMegatronBackend
            return FaultTolerantMegatronBackend(cfg, plan, model_cfg, rank, world, guard=guard, defer_engine=joining)
        return FaultTolerantBackend(cfg, plan, model_cfg, rank, world, guard=guard, defer_engine=joining)

    writer = None
    if cfg.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
    ckpt = None
    if settings.checkpoint_every > 0:
        ckpt = Checkpointer(Path(settings.checkpoint_dir or out_dir.parent / "checkpoints").resolve(),
                            settings.checkpoint_every, ctx.connect(), world, rank)
    started_joining = ctx.joining
    run = FaultTolerantSession(ctx, plan, make_backend, settings, EventLog(out_dir / "events.jsonl", rank, writer),
                               checkpoints=ckpt)
    if not started_joining and not run.restarted:  # the first group: its ranks agree on the plan
        digest = hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()
        try:
            digests = all_gather_object(digest, run.monitor, "plan agreement", world)
        except PeerFailure as failure:  # a rank died before the first step: recovered like one in a step
            run.recover(failure)
            digests = [digest]
        if len(set(digests)) != 1:
            raise RuntimeError(f"rank {rank}: the ranks built different routing plans; give every rank the same "
                               f"config, or use routing=file")

    history = _train(run, cfg, plan, train_batch, mbs, seq, writer, lambda: _validate(run, val_batch, val_mb))
    val = None
    while val is None:  # a failure during the final validation is recovered, then validation reruns
        val = _validate(run, val_batch, val_mb)
    log.info("validation loss (full model, all stages in order) %.4f at step %d", val, int(cfg.train.steps) - 1)
    if writer is not None:
        writer.add_scalar("val/loss_full_model", val, int(cfg.train.steps) - 1)
    losses = [h["loss"] for h in sorted(history, key=lambda h: h["step"])]
    # A replacement that joined after the last step (e.g. during the final validation) trained no step.
    first = sum(losses[:3]) / min(3, len(losses)) if losses else None
    last = sum(losses[-3:]) / min(3, len(losses)) if losses else None
    summary = {"backend": cfg.backend.name, "routing": cfg.routing.kind, "layout": cfg.model.layout,
               "recovery": str(cfg.recovery.name), "steps": int(cfg.train.steps), "world_size": world, "rank": rank,
               "generation": run.guard.generation, "loss_first3": first, "loss_last3": last,
               "val_loss_full_model": val, "loss_history": losses, "recoveries": run.recoveries,
               "stage_visits": plan.stage_visits(),
               # sha256 of this rank's final weights + Adam state: "replay = no-failure run" audits
               "state_digest": state_digest(run.module, run.optimizer)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out_dir / "history.json").write_text(json.dumps(history, default=str))
    if rank == 0:
        trained = (f"loss {first:.4f} -> {last:.4f} (mean of first/last 3 steps)" if losses else
                   "no training step on this process (it joined after the last step)")
        print(f"done: {trained}, validation loss of the full model {val:.4f}, {len(run.recoveries)} recoveries; "
              f"outputs in {out_dir}", flush=True)
    all_reduce(torch.zeros(1), run.monitor, "final barrier")  # nobody leaves while a peer may still need it
    run.monitor.stop()
    if writer is not None:
        writer.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # An abandoned waiter thread may still sit in a gloo wait of a dead group; interpreter shutdown
    # would then abort in C++ (std::terminate), so leave without it.
    os._exit(0)


def _validate(run: Any, val_batch: Callable, val_mb: int) -> float | None:
    """Periodic and final validation; a failure during it is recovered like one in a step (then no
    value); a completed validation is the first good pass of a recovery still pending."""
    from .detect import PeerFailure

    if run.guard.injector is not None:
        run.guard.injector.at(run.global_steps, "validation")
    try:
        val = float(run.backend.validation_loss(val_batch, val_mb))
    except PeerFailure as failure:
        run.recover(failure)
        return None
    if run.pending is not None:  # recovered during a validation: no step may follow (the final one)
        run._finish_event(val, after="validation")
    return val


def _train(run: Any, cfg: Any, plan: Any, train_batch: Callable, mbs: int, seq: int, writer: Any,
           validate: Callable[[], float | None]) -> list[dict]:
    """The step loop: a ``None`` step result means a recovery happened and the step is replayed."""
    steps = int(cfg.train.steps)
    tokens_per_step = plan.num_microbatches * mbs * seq
    history: dict[int, dict] = {}  # by step: a rollback's replayed steps overwrite their first run
    seen_recoveries = 0
    while run.global_steps < steps:
        step = run.global_steps
        lr = run.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loss = run.train_step(train_batch)
        dt = time.perf_counter() - t0
        if loss is None:
            continue
        history[step] = {"step": step, "loss": loss, "lr": lr, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                         "generation": run.guard.generation}
        log.info("step %d loss %.4f lr %.2e %.0f tok/s generation %d", step, loss, lr, tokens_per_step / dt,
                 run.guard.generation)
        if len(run.recoveries) > seen_recoveries:
            for r in run.recoveries[seen_recoveries:]:
                if r["superseded"]:
                    log.warning("recovery on generation %d superseded by a newer failure before its first good "
                                "step: %s", r["generation"], r["superseded_by"])
                    continue
                log.warning("recovered: %s detect %.3f s regroup %.3f s transfer %.3f s first good step %.3f s "
                            "loss %s -> %.4f", r["methods"], r["detect_s"] or 0.0, r["regroup_s"], r["transfer_s"],
                            r["first_good_step_s"], r["loss_before"], r["loss_after"])
            seen_recoveries = len(run.recoveries)
        if writer is not None:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/tokens_per_s", tokens_per_step / dt, step)
            writer.add_scalar("recovery/generation", run.guard.generation, step)
        every = int(cfg.train.eval_every)
        if every and (step + 1) % every == 0 and step + 1 < steps:
            val = validate()
            if val is not None:
                log.info("validation loss (full model, all stages in order) %.4f at step %d", val, step)
                if writer is not None:
                    writer.add_scalar("val/loss_full_model", val, step)
    return [history[s] for s in sorted(history)]
