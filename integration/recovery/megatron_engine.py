"""Fault-tolerant routed training on megatron-core: the megatron counterpart of :mod:`.engine`.

:class:`FaultTolerantMegatronBackend` is the main job's megatron backend
(:class:`integration.backends.megatron.backend.MegatronBackend`) with what recovery needs:

* every p2p wait of the routed schedule goes through :meth:`FailureMonitor.wait`, and the failure
  injector runs ahead of each forward/backward op;
* the collectives of a step are ours, async and failure-aware: the data-parallel all-reduce of
  megatron DDP's contiguous gradient buffers (in place of ``finalize_model_grads``), the global
  gradient-norm all-reduce for clipping and the loss all-reduce; all run *before* the commit vote,
  then megatron's optimizer steps with its own clipping off (that step holds no collective);
* regroup = rebuild: megatron keeps process groups in module attributes, DDP buckets and
  ``parallel_state`` globals, so after a new generation's group exists the backend snapshots its
  stage state in memory (weights, optimizer state, LR schedule), builds groups, grid, model, DDP,
  optimizer and schedule again (the same collective sequence a replacement's construction runs)
  and loads the snapshot: survivors keep their exact state, nothing is read from disk;
* CheckFree+ home replication (:mod:`.home`) hooks in exactly as in the DeepSpeed engine.

The checkpoint fallback saves and restores in Megatron-LM's per-rank ``torch`` checkpoint layout
(:meth:`MegatronSteps.save_checkpoint`). Limits (refused up front with the reason): tensor
parallelism (the TP all-reduces inside megatron's layers are not failure-aware) and the linear
layout (the ladder's stage numbering is the ring's).
"""

from __future__ import annotations

import copy
import gc
from typing import Any

import torch

from ..backends.megatron.backend import MegatronBackend
from ..backends.megatron.build import gpt_forward_step
from ..backends.megatron.schedule import RoutedForwardBackward
from ..runtime.program import BWD, FWD
from . import rebuild as rb
from .detect import all_reduce
from .guard import StepGuard, commit_step


def check_megatron_recovery(cfg: Any) -> None:
    """Refuse configurations the megatron fault-tolerant path does not cover, before any group exists."""
    tensor = int(cfg.parallel.get("tensor", 1) or 1)
    if tensor != 1:
        raise ValueError(f"recovery with backend=megatron: parallel.tensor={tensor} is not supported (the tensor-"
                         f"parallel all-reduces inside megatron's layers are not failure-aware); use "
                         f"parallel.tensor=1 or backend=deepspeed")
    if str(cfg.model.layout) != "ring":
        raise ValueError(f"recovery with backend=megatron: model.layout={cfg.model.layout} is not supported; the "
                         f"rebuild ladder numbers stages as the ring layout does (model.layout=ring)")


class MegatronSteps:
    """The step loop's view of the megatron backend (what a DeepSpeed engine is to the session):
    counters, the batch source and one guarded, committed step per :meth:`train_batch`."""

    def __init__(self, backend: "FaultTolerantMegatronBackend"):
        self.backend = backend
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.batch_source = None

    def set_batch_source(self, source) -> None:
        self.batch_source = source

    @property
    def step_trace(self) -> list[tuple]:
        """The last training step's per-op trace (``ProgramExecutor.trace``; measured drift reads it)."""
        return self.backend.fb.last_trace

    # ------------------------------------------------------------------ checkpoint fallback
    def save_checkpoint(self, directory: str, tag: str) -> None:
        """Megatron-LM's per-rank layout (:meth:`MegatronBackend.save_checkpoint`) with the counters."""
        self.backend.save_checkpoint(directory, tag, self.global_steps, extra={
            "counters": {k: getattr(self, k) for k in ("global_samples", "micro_steps", "skipped_steps")}})

    def load_checkpoint(self, directory: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[str | None, dict]:
        """Restore weights, optimizer state, LR schedule and counters from :meth:`save_checkpoint`'s file."""
        state = self.backend.load_checkpoint(directory, tag, optimizer=load_optimizer_states,
                                             scheduler=load_lr_scheduler_states)
        if state is None:
            return None, {}
        self.global_steps = int(state["iteration"])
        for k, v in state["counters"].items():
            setattr(self, k, v)
        return str(self.backend.checkpoint_file(directory, tag)), {}

    def train_batch(self) -> torch.Tensor:
        """One iteration; raises :class:`PeerFailure` (nothing applied) if the step was aborted."""
        loss = self.backend.guarded_step(self.global_steps, self.batch_source)
        self.global_steps += 1
        self.micro_steps += self.backend.microbatches
        self.global_samples += self.backend.microbatches * self.backend.micro_batch_size * len(
            self.backend.plan.stage_nodes[0])
        return torch.tensor(loss)


class FaultTolerantMegatronBackend(MegatronBackend):
    """See the module docstring. ``guard`` carries the monitor, commit vote and injector."""

    def __init__(self, cfg: Any, plan, model_cfg: Any, rank: int, world_size: int, *, guard: StepGuard):
        # Unlike DeepSpeed's engine, megatron's construction broadcasts no weights, so a replacement
        # has nothing to defer.
        check_megatron_recovery(cfg)
        self.guard = guard
        super().__init__(cfg, plan, model_cfg, rank, world_size)
        self.engine: MegatronSteps | None = MegatronSteps(self)
        self._snapshot: dict | None = None

    # ------------------------------------------------------------------ construction hooks
    def _optimizer_clip(self) -> float:
        return 0.0  # clipped by us before the commit vote (megatron's norm would be a blind collective)

    def _build(self, plan) -> None:
        if not hasattr(self, "engine") and self.guard.injector is not None:  # the construction, not a regroup
            self.guard.injector.at(0, "construction")
        super()._build(plan)
        self.config.finalize_model_grads_func = self._reduce_replica_grads
        self.fb.p2p_wait = self.guard.monitor.wait
        self.fb.before_op = self._inject
        if self.guard.straggler is not None:  # recovery.straggler: this rank's compute made slower (emulation)
            self.fb.compute_delay = lambda op, seconds: self.guard.straggler.delay(self.engine.global_steps, seconds)

    def _configure_fb(self, fb: RoutedForwardBackward) -> None:
        fb.p2p_wait = self.guard.monitor.wait

    def _all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        all_reduce(tensor, self.guard.monitor, what)

    def _inject(self, op) -> None:
        if self.guard.injector is not None and op.kind in (FWD, BWD) and self.engine is not None:
            self.guard.injector.at(self.engine.global_steps, "forward" if op.kind == FWD else "backward")

    # ------------------------------------------------------------------ the session's view
    @property
    def module(self) -> torch.nn.Module:
        """The stage model without its DDP wrapper (its state dict keys are the stage's own)."""
        return self.model.module

    # ------------------------------------------------------------------ one step
    def _reduce_replica_grads(self, models, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
        """``finalize_model_grads`` for TP=1 + ring: the mean over replicas of DDP's grad buffers."""
        dp_group = pg_collection.dp_cp if pg_collection is not None else None
        dp = dp_group.size() if dp_group is not None else 1
        if dp == 1:
            return
        for model in models:
            for buf in list(model.buffers) + list(getattr(model, "expert_parallel_buffers", [])):
                all_reduce(buf.grad_data, self.guard.monitor, "gradient all-reduce over replicas", group=dp_group)
                buf.grad_data.div_(dp)

    def _main_grads(self) -> list[torch.Tensor]:
        return [p.main_grad for p in self.model.module.parameters() if getattr(p, "main_grad", None) is not None]

    def guarded_step(self, step: int, batch_source) -> float:
        """Routed forward/backward, failure-aware reductions, commit vote, then the optimizer step."""
        g = self.guard
        g.monitor.check("start of step")
        if g.home is not None:
            g.home.begin_step(g.generation, step)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.fb(forward_step_func=gpt_forward_step,
                          data_iterator=self._batches(batch_source, step, self.microbatches), model=[self.model],
                          num_microbatches=self.microbatches, seq_length=self.seq_len,
                          micro_batch_size=self.micro_batch_size)
        visited = self.fb.last_stage_visited
        grads = self._main_grads() if visited else []
        loss = commit_step(g, step, grads, visited, float(self.cfg.train.grad_clip or 0.0), self.grid_pp_group(),
                           sum(float(o["lm loss"]) for o in outputs), len(outputs), f"rank {self.rank}",
                           before_mirror=self._grads_for_mirror)
        self.optimizer.step()
        self.scheduler.step(increment=1)
        return loss

    def _grads_for_mirror(self) -> None:
        for p in self.module.parameters():
            if getattr(p, "main_grad", None) is not None:
                p.grad = p.main_grad  # what megatron's FP32Optimizer.prepare_grads does; the mirror reads .grad

    def grid_pp_group(self):
        """The pipeline group of this rank (megatron's model-parallel group at TP=1): where the
        global gradient norm lives."""
        from megatron.core import parallel_state as ps
        return ps.get_pipeline_model_parallel_group()

    def use_layout(self, program, num_stages: int, rules) -> None:
        """A generation's plan (routing.replan): megatron keeps the job's grid, so only a plan of every
        stage (a drift re-plan, or the job's own) can run; the next build or the live schedule takes it."""
        if num_stages != self.stages:
            raise RuntimeError(f"rank {self.rank}: backend=megatron runs the job's {self.stages} stages only, not a "
                               f"survivors' plan of {num_stages} (the re-planner must not route around a lost rank "
                               f"on megatron)")
        if getattr(self, "fb", None) is not None:
            self.set_plan(program)
        else:
            self.plan, self.program = program.plan, program

    # ------------------------------------------------------------------ regroup
    def release_groups(self) -> None:
        """Before the old process group is destroyed: snapshot the state, drop every object that
        holds an old group (so peers' pending receives fail at once)."""
        from megatron.core import parallel_state as ps
        if self._snapshot is None:  # else a regroup did not complete (a member lost): its snapshot is the state
            self._snapshot = copy.deepcopy(self.state_bundle())  # the live tensors go with the old objects
        self.model = self.optimizer = self.scheduler = self.fb = None
        self._eval_fb = {}
        self.config = None
        ps.destroy_model_parallel()
        gc.collect()

    def regroup(self) -> None:
        """On the new generation's group: build everything again and load the snapshot."""
        self._build(self.program)  # compiled once: a regroup keeps the rank grid, so the same Program
        self.load_state_bundle(self._snapshot)
        self._snapshot = None  # only now: a failure inside the build leaves the snapshot for the next try

    def load_state_bundle(self, bundle: dict, optimizer: bool = True, scheduler: bool = True) -> None:
        """:meth:`MegatronBackend.load_state_bundle`, then the ``lr_scale`` hooks: they live on the
        optimizer object, which is new after a regroup."""
        super().load_state_bundle(bundle, optimizer=optimizer, scheduler=scheduler)
        if optimizer:
            rb.reattach_lr_scale(self.torch_optimizer)

    def rebuild_engine(self) -> None:
        """A new step driver; the session restores the counters."""
        self.engine = MegatronSteps(self)
