"""The main job's fault-tolerant trainer (``integration/train.py recovery=checkfree|checkfree_plus|degraded``).

Runs under :mod:`launch.agent` (which owns the store, detects deaths and hangs, respawns or promotes
a hot spare). :class:`FaultTolerantTrainer` is :class:`integration.trainer.Trainer` with what recovery
changes overridden: the process group, engine and recovery belong to
:class:`integration.recovery.session.FaultTolerantSession` (``backend=deepspeed`` or ``backend=megatron``,
the latter at TP=1 in the ring layout), a step may be replayed, a validation may be interrupted by a
recovery, and the process ends without interpreter shutdown:

    python -m launch.agent --nproc 4 --spares 1 -- integration/train.py recovery=checkfree \
        recovery.inject='kill:stage=2,step=5,phase=backward'

Every recovery event (method, detect/regroup/transfer/first-good-step seconds, loss before/after)
goes to the rank's log (``train.log``), ``events.jsonl`` and, on rank 0, TensorBoard
(``recovery/*``). ``summary.json`` carries the list of recoveries.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

from ..backend import StepResult
from ..config import ConfigError
from ..trainer import Trainer, plan_digest

log = logging.getLogger("skipfree.train")


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


def warm_up_spare(backend: str) -> None:
    """A hot spare (or a waiting spare host's worker) pays, before it waits, what its backend's
    construction would otherwise pay after its promotion, while the survivors wait for it: the
    backend's modules (DeepSpeed's pipeline engine; megatron-core: seconds of imports), DeepSpeed's
    CPU comm op and op probe, and torch's lazy imports on first use (profiled in a promoted spare:
    the first ``torch.optim.AdamW`` imports ``torch._dynamo``, 70% of its DeepSpeed backend's
    construction; the first ``skip_init`` imports torch's prims). Needs no rank, no process group."""
    import torch

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], foreach=False)
    torch.nn.utils.skip_init(torch.nn.Linear, 1, 1, bias=False)
    if backend == "megatron":
        from . import megatron_engine  # noqa: F401
        return
    import deepspeed.ops

    from ..backends.deepspeed.prebuilt_op import load_prebuilt_shm_op
    from . import engine  # noqa: F401

    load_prebuilt_shm_op()
    _ = deepspeed.ops.__compatible_ops__  # probed on first access (compiler runs); its comm set-up reads it


class FaultTolerantTrainer(Trainer):
    """:class:`Trainer` surviving stage failures (config checked by the preflight, incl. recovery's limits)."""

    def run(self) -> dict:
        """A planned job-wide stop (an unrecoverable loss, agreed by every rank) ends this rank with the
        session's one paragraph on stderr and exit code 1, no traceback; ``SKIPFREE_DEBUG=1`` re-raises it."""
        from .rendezvous import JobCompleted
        from .session import JobStopped

        try:
            return super().run()
        except JobCompleted as done:  # a rank died after (or inside) the final barrier: nothing to recover
            log.info("%s; nothing is left to do here", done)
            self._exit(0)
        except JobStopped:
            if os.environ.get("SKIPFREE_DEBUG", "") not in ("", "0"):
                raise
            self._exit(1)  # the session already printed the reason (FaultTolerantSession._abort_job)

    def setup(self) -> None:
        import faulthandler
        import signal

        from .checkpoint import Checkpointer
        from .context import RankContext
        from .detect import PeerFailure, all_gather_object
        from .events import EventLog
        from .session import FaultTolerantSession, RecoverySettings

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is a stuck rank?
        if "RANK" not in os.environ and "SKIPFREE_SPARE" not in os.environ:
            raise ConfigError("recovery", "run the job under the fault-tolerant agent (it owns the store)",
                              "python -m launch.agent --nproc N [--spares 1] -- integration/train.py recovery=...")
        settings = RecoverySettings.from_mapping(self.job.recovery.settings())
        if "SKIPFREE_SPARE" in os.environ:
            warm_up_spare(self.job.backend.name)
        # Freeze the ~450k import-time objects out of the GC's reach: the survivors' gc.collect in a
        # regroup took 0.3-0.9 s over them, 0.01 s after the freeze.
        gc.collect()
        gc.freeze()
        ctx = RankContext.from_env()  # a hot spare waits here (imports, data and plan already done)
        self.out_dir = _retarget_outputs(self.out_dir, ctx.rank)
        self.world_size, self.rank = ctx.world_size, ctx.rank
        if self.resume_ckpts is not None:
            # Built in __init__ from the preflight's rank, which a hot spare does not have yet (every
            # promoted spare would write as rank 0: several writers on one file).
            self.resume_ckpts.rank = ctx.rank
        cfg, plan, model_cfg, megatron = self.cfg, self.plan, self.model_cfg, self.job.backend.name == "megatron"
        program = self.checked.program  # the preflight's: every generation's backend runs it, compiled once

        def make_backend(guard, joining: bool):
            if megatron:
                from .megatron_engine import FaultTolerantMegatronBackend
                return FaultTolerantMegatronBackend(cfg, program, model_cfg, ctx.rank, ctx.world_size, guard=guard)
            from .engine import FaultTolerantBackend
            return FaultTolerantBackend(cfg, program, model_cfg, ctx.rank, ctx.world_size, guard=guard,
                                        defer_engine=joining)

        self.writer = self.tensorboard()
        ckpt = None
        if settings.checkpoint_every > 0:
            ckpt = Checkpointer(Path(settings.checkpoint_dir or self.out_dir.parent / "checkpoints").resolve(),
                                settings.checkpoint_every, ctx.connect(), ctx.world_size, ctx.rank)
        started_joining = ctx.joining
        self.audit = None
        if self.job.recovery.audit:
            from .audit import AuditTrail
            self.audit = AuditTrail(self.out_dir)
        events = EventLog(self.out_dir / "events.jsonl", ctx.rank, self.writer)
        replan = None
        if self.job.routing.replan.enabled:  # survivors continue on a smaller group (integration/recovery/replan.py)
            from ..config import rules_of
            from .replan import Replanner, ReplanSettings
            replan = Replanner(program, rules_of(cfg), ReplanSettings(**vars(self.job.routing.replan)),
                               ctx.world_size, ctx.rank, cfg.routing.get("max_inflight"), events, reroute=not megatron)
        drift = None
        if replan is not None and self.job.routing.replan.drift:  # re-plan on measured costs (recovery/drift.py)
            from .drift import DriftReplanner
            drift = DriftReplanner(replan, replan.settings, self.job.train.microbatches, int(self.job.routing.seed))
        self.session = FaultTolerantSession(ctx, plan, make_backend, settings, events,
                                            self.audit.on_recovered if self.audit is not None else None,
                                            checkpoints=ckpt, replan=replan, drift=drift)
        gc.collect()
        gc.freeze()  # again: the first backend's construction imported the engine modules (DeepSpeed, megatron-core)
        self.seen_recoveries = 0
        if not started_joining and not self.session.restarted:  # the first group: its ranks agree on the plan
            try:
                digests = all_gather_object(plan_digest(plan), self.session.monitor, "plan agreement",
                                            ctx.world_size)
            except PeerFailure as failure:  # a rank died before the first step: recovered like one in a step
                self.session.recover(failure)
                digests = [plan_digest(plan)]
            if len(set(digests)) != 1:
                raise RuntimeError(f"rank {ctx.rank}: the ranks built different routing plans; give every rank the "
                                   f"same config, or use routing=file")
        self.restore()

    # ------------------------------------------------------------------ resume (integration/resume.py)
    def restore(self) -> None:
        """``train.resume`` on every process that has applied no step yet (the first ranks, and those
        that joined before the first step); a replacement joining later got its state from the recovery."""
        from . import rebuild as rb

        if self.checked.resume_from is not None and self.session.global_steps > 0:
            log.info("resume: this process joined at step %d, its state came from the recovery",
                     self.session.global_steps)
            return
        super().restore()
        rb.reattach_lr_scale(self.session.optimizer)  # a saved multiplier needs this optimizer's hooks

    def load_checkpoint(self, path: Path) -> int:
        loaded, _ = self.session.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"rank {self.rank}: no checkpoint {path.name} under {path.parent} for this rank")
        return int(self.session.global_steps)

    def write_checkpoint(self, root: str, tag: str, step: int) -> None:
        """The engine's save (DeepSpeed's barriers are plain collectives: a dead peer raises there), then a
        failure-aware barrier: a failure during the save is a :class:`PeerFailure`."""
        import torch

        from .detect import PeerFailure, all_reduce

        try:
            if self.job.backend.name == "megatron":
                self.session.engine.save_checkpoint(root, tag)
            else:
                self.session.engine.save_checkpoint(root, tag=tag, save_latest=False)
        except RuntimeError as exc:
            raise PeerFailure(f"rank {self.rank}: checkpoint save {tag} failed: {str(exc).splitlines()[0][:200]}")
        all_reduce(torch.zeros(1), self.session.monitor, "checkpoint barrier")

    def save_resume_checkpoint(self, step: int) -> None:
        """A failure during the save is recovered like one in a step; that checkpoint stays half-written
        (ignored by ``train.resume=auto``) and the next one is saved as planned."""
        from .detect import PeerFailure

        try:
            super().save_resume_checkpoint(step)
        except PeerFailure as failure:
            log.warning("checkpoint after step %d abandoned, a rank failed during the save: %s", step - 1,
                        str(failure)[:200])
            self.session.recover(failure)

    # ------------------------------------------------------------------ the loop's overrides
    def current_step(self, done: int) -> int:
        return self.session.global_steps  # a rollback rewinds it

    def maybe_resample(self, step: int) -> None:
        """Never: every generation runs one fixed plan (the preflight refuses routing.resample_every)."""

    def train_step(self, step: int) -> StepResult | None:
        lr = self.session.optimizer.param_groups[0]["lr"]
        loss = self.session.train_step(self.train_batch)
        if loss is None:
            return None
        if self.audit is not None:
            self.audit.step(self.session, step, loss)
        return StepResult(loss=loss, lr=lr)

    def record(self, step: int, result: StepResult, dt: float) -> dict:
        return {**super().record(step, result, dt), "generation": self.session.guard.generation}

    def log_step(self, rec: dict) -> None:
        log.info("step %d loss %.4f lr %.2e %.0f tok/s generation %d", rec["step"], rec["loss"], rec["lr"],
                 rec["tokens_per_s"], rec["generation"])
        run = self.session
        for r in run.recoveries[self.seen_recoveries:]:
            if r["superseded"]:
                log.warning("recovery on generation %d superseded by a newer failure before its first good step: %s",
                            r["generation"], r["superseded_by"])
                continue
            log.warning("recovered: %s detect %.3f s regroup %.3f s transfer %.3f s first good step %.3f s "
                        "loss %s -> %.4f", r["methods"], r["detect_s"] or 0.0, r["regroup_s"], r["transfer_s"],
                        r["first_good_step_s"], r["loss_before"], r["loss_after"])
        self.seen_recoveries = len(run.recoveries)
        w = self.writer
        if w is not None:
            w.add_scalar("train/loss", rec["loss"], rec["step"])
            w.add_scalar("train/lr", rec["lr"], rec["step"])
            w.add_scalar("train/tokens_per_s", rec["tokens_per_s"], rec["step"])
            w.add_scalar("recovery/generation", rec["generation"], rec["step"])

    def validation(self) -> float | None:
        """A failure during validation is recovered like one in a step (then no value; it reruns); a
        completed validation is the first good pass of a recovery still pending (the final one has no
        step after it)."""
        from .detect import PeerFailure

        run = self.session
        if run.guard.injector is not None:
            run.guard.injector.at(run.global_steps, "validation")
        try:
            val = float(run.backend.validation_loss(self.val_batch, self.job.train.val_microbatches))
        except PeerFailure as failure:
            run.recover(failure)
            return None
        if run.pending is not None:
            run._finish_event(val, after="validation")
        return val

    def summary(self, history: list[dict], val: float) -> dict:
        from .state import state_digest

        losses = [h["loss"] for h in history]
        # A replacement that joined after the last step (e.g. during the final validation) trained no step.
        first = sum(losses[:3]) / min(3, len(losses)) if losses else None
        last = sum(losses[-3:]) / min(3, len(losses)) if losses else None
        return {"backend": self.job.backend.name, "routing": self.job.routing.kind, "layout": self.job.model.layout,
                "recovery": self.job.recovery.name, "steps": self.steps, "world_size": self.world_size,
                "rank": self.rank, "generation": self.session.guard.generation, "loss_first3": first,
                "loss_last3": last, "val_loss_full_model": val, "loss_history": losses,
                "recoveries": self.session.recoveries, "stage_visits": self.plan.stage_visits(),
                "replans": self.session.replan.switches if self.session.replan is not None else [],
                "drift_decisions": self.session.drift.decisions if self.session.drift is not None else [],
                "start_step": self.start_step,
                # sha256 of this rank's final weights + Adam state: "replay = no-failure run" audits
                "state_digest": state_digest(self.session.module, self.session.optimizer)}

    def done_line(self, summary: dict) -> str:
        trained = (f"loss {summary['loss_first3']:.4f} -> {summary['loss_last3']:.4f} (mean of first/last 3 steps)"
                   if summary["loss_history"] else "no training step on this process (it joined after the last step)")
        return (f"done: {trained}, validation loss of the full model {summary['val_loss_full_model']:.4f}, "
                f"{len(self.session.recoveries)} recoveries; outputs in {self.out_dir}")

    def finish(self) -> None:
        """The final barrier, then leave without interpreter shutdown (an abandoned waiter thread may
        still sit in a gloo wait of a dead group, and shutdown would then abort in C++).

        A rank lost before everybody reached the barrier is recovered like one in a step: its
        replacement joins with nothing left to train, the final validation runs again in the new
        group and every summary is rewritten. The first rank through the barrier marks the job
        complete in the store; a death after that is no failure (the agent counts the rank as done)."""
        import torch

        from .detect import COMPLETE_KEY, PeerFailure, all_reduce

        run = self.session
        while True:
            if self.audit is not None:
                self.audit.final(run)
            if run.replan is not None:
                run.replan.flush()  # a switch still waiting for its measured steps
            if run.guard.injector is not None:
                run.guard.injector.at(run.global_steps, "final")
            try:
                all_reduce(torch.zeros(1), run.monitor, "final barrier")  # nobody leaves while a peer may need it
                break
            except PeerFailure as failure:
                if run.store.check([COMPLETE_KEY]):  # the lost rank had reached it: every rank is done
                    break
                log.warning("a rank failed at the final barrier: %s", str(failure)[:200])
                run.recover(failure)
                self.conclude(self.train())  # a rollback trains again; then validation and the summary
        run.store.set(COMPLETE_KEY, str(run.guard.generation))
        if run.guard.injector is not None:
            run.guard.injector.at(run.global_steps, "exit")
        self._exit(0)

    def _exit(self, code: int) -> None:
        """Leave now, with ``os._exit``: a waiter thread in a dead group's gloo wait would abort shutdown."""
        session = getattr(self, "session", None)  # none yet: a joiner that found the job complete
        if session is not None:
            session.monitor.stop()
        if self.writer is not None:
            self.writer.close()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
