"""RoutedPipelineEngine with failure-aware communication and a commit point before the optimizer step.

Differences from :class:`integration.backends.deepspeed.engine.RoutedPipelineEngine` (everything else is
inherited, including the gradient rule and the unvisited-stage rule):

* p2p waits go through :meth:`FailureMonitor.wait` (``RoutedP2P``'s ``wait`` hook);
* the gradient all-reduce over replicas, the global gradient-norm all-reduce for clipping and the
  loss all-reduce are ours, async + failure-aware, and all run *before* the commit;
* a ``CommitStep`` instruction between ReduceGrads and OptimizerStep runs the store-based vote of
  :class:`integration.recovery.commit.StepCommit`; an aborted step raises :class:`PeerFailure`
  before anything moved, a committed one is applied by upstream's OptimizerStep with clipping
  already done (so that step holds no collective at all);
* the stage's gradient norm of the last committed step is kept for CheckFree's weights;
* compute ops call the failure injector (``forward``/``backward`` points);
* with CheckFree+ home replication (``guard.home``) the home's gradients reach its mirror holders
  before the vote and the holders step their mirror after a commit (:mod:`integration.recovery.home`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule as ds_schedule

from ..backends.deepspeed import schedule as rsched
from ..backends.deepspeed.backend import DeepSpeedBackend
from ..backends.deepspeed.engine import RoutedPipelineEngine
from ..backends.deepspeed.prebuilt_op import load_prebuilt_shm_op
from ..runtime.program import BWD, FWD
from .detect import all_reduce
from .guard import StepGuard, commit_step


class CommitStep(ds_schedule.PipeInstruction):
    """Pre-step collectives, then the commit vote for this iteration."""


class FaultTolerantSchedule(rsched.RoutedTrainSchedule):
    def steps(self):
        for op in self.ops:
            yield [rsched.INSTRUCTION_FOR_KIND[op.kind](op=op)]
        yield [rsched.RoutedEndIteration()]
        yield [ds_schedule.ReduceTiedGrads(), ds_schedule.ReduceGrads(), CommitStep(), ds_schedule.OptimizerStep()]


def regroup_module(module) -> None:
    """Recreate a PipelineModule's process groups on the current world, in PipelineModule's order."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    module.world_group = dist.new_group(ranks=range(dist.get_world_size()))
    module.global_rank = dist.get_rank(group=module.world_group)
    module._grid = PipelineParallelGrid(process_group=module.world_group, topology=module._topo)
    module.num_stages = module._topo.get_dim("pipe")  # a re-planned group may run fewer stages
    module.stage_id = module._topo.get_coord(module.global_rank).pipe
    module.tied_comms = module._index_tied_modules()


class FaultTolerantEngine(RoutedPipelineEngine):
    """See the module docstring. ``guard`` must be set right after construction (:func:`attach_guard`)."""

    guard: StepGuard
    supports_tensor_parallel = False  # its failure-aware collectives and re-planning know no model axis

    @property
    def step_trace(self) -> list[tuple]:
        """The last step's per-op trace (``ProgramExecutor.trace``; measured drift reads it)."""
        return self.executor.trace

    def gradient_clipping(self):
        # Our commit step clips before the vote; upstream's step must not clip (its norm is a collective).
        return 0.0 if getattr(self, "_clipped_already", False) else super().gradient_clipping()

    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        """One iteration; raises :class:`PeerFailure` (nothing applied) if the step was aborted."""
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self.guard.monitor.check("start of step")
        if self.guard.home is not None:
            self.guard.home.begin_step(self.guard.generation, self.global_steps)
        self.executor.begin(self.global_steps)
        sched = FaultTolerantSchedule(self.my_ops, self.micro_batches, self.num_stages, self.stage_id)
        self._exec_schedule(sched)
        return self.agg_train_loss

    def _aggregate_routed_loss(self, result) -> torch.Tensor:
        # Validation's loss all-reduce (upstream's is a plain blocking collective): failure-aware.
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in sorted(result.losses):
            total += result.losses[mb].float()
        stats = torch.stack([total, torch.tensor(float(len(result.losses)), device=self.device)])
        all_reduce(stats, self.guard.monitor, "validation loss all-reduce")
        return stats[0] / stats[1]

    def _exec_routed_op(self, op) -> None:
        if self.guard.injector is not None and op.kind in (FWD, BWD):
            self.guard.injector.at(self.global_steps, "forward" if op.kind == FWD else "backward")
        self.executor.run_op(op)

    def _exec_reduce_grads(self):
        if not self._my_stage_visited:
            return
        dp = self.grid.get_data_parallel_world_size()
        if dp > 1:
            # Every replica of a visited stage joins, also one that no route visited this step (a
            # re-planned route may leave a replica idle: a straggler, a slow link): it contributes
            # zeros and takes the mean like its peers, so the replicas stay identical. One flag per
            # parameter (did this replica produce its gradient?) travels in the same message, so a
            # parameter without a gradient on any replica keeps none, exactly as before.
            params = [p for p in self.module.parameters() if p.requires_grad]
            flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in params])
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                             + [flags])
            all_reduce(flat, self.guard.monitor, "gradient all-reduce over replicas",
                       group=self.grid.get_data_parallel_group())
            grads, used = flat[:flat.numel() - len(params)], flat[flat.numel() - len(params):]
            grads.div_(dp)
            offset = 0
            for p, u in zip(params, used.tolist()):
                n = p.numel()
                if u > 0:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(grads[offset:offset + n].view_as(p.grad))
                offset += n
        params = [p for p in self.module.parameters() if p.grad is not None]
        self._apply_gradient_rule(params)

    def _exec_commit(self):
        params = [p for p in self.module.parameters() if p.grad is not None] if self._my_stage_visited else []
        losses = self.last_result.losses if self.last_result is not None else {}
        total = torch.zeros((), dtype=torch.float32)
        for mb in sorted(losses):
            total += losses[mb].float()
        loss = commit_step(self.guard, self.global_steps, [p.grad for p in params], self._my_stage_visited,
                           super().gradient_clipping(), self.grid.get_model_parallel_group(), float(total),
                           len(losses), f"rank {self.global_rank}")
        self.agg_train_loss = torch.tensor(loss)

    def _exec_optimizer_step(self, lr_kwargs=None):
        self._clipped_already = True
        try:
            return super()._exec_optimizer_step(lr_kwargs)
        finally:
            self._clipped_already = False

    _INSTRUCTION_MAP = {
        **RoutedPipelineEngine._INSTRUCTION_MAP,
        CommitStep: _exec_commit,
        ds_schedule.ReduceGrads: _exec_reduce_grads,
        ds_schedule.OptimizerStep: _exec_optimizer_step,
        **dict.fromkeys(rsched.INSTRUCTION_FOR_KIND.values(), _exec_routed_op),
    }


def attach_guard(engine: FaultTolerantEngine, guard: StepGuard) -> None:
    """Give the engine its guard and make its p2p waits failure-aware."""
    engine.guard = guard
    engine.p2p_channel._wait = guard.monitor.wait
    if guard.straggler is not None:  # recovery.straggler: this rank's compute made slower (emulation)
        engine.executor.compute_delay = lambda op, seconds: guard.straggler.delay(engine.global_steps, seconds)


def _init_deepspeed_comm_alone() -> None:
    """A replacement wraps its new group in DeepSpeed's comm layer without any collective.

    The module builder's first-time comm set-up ends with a barrier over the world (for the CPU
    all-reduce's shared-memory segments); survivors did theirs at start and are already in the
    next collective of the regroup, so a replacement entering that barrier would deadlock.
    """
    import deepspeed
    from deepspeed import comm as ds_dist

    if not ds_dist.is_initialized():
        load_prebuilt_shm_op()
        deepspeed.init_distributed(dist_backend="gloo")


class FaultTolerantBackend(DeepSpeedBackend):
    """The main job's DeepSpeed backend with a :class:`FaultTolerantEngine` guarded by ``guard``.

    ``defer_engine``: a replacement builds module, optimizer and scheduler now but its engine only
    on the next :meth:`rebuild_engine`, together with the survivors and after its stage state was
    rebuilt (the engine's construction is collective and broadcasts replica weights).
    """

    engine_class = FaultTolerantEngine

    def __init__(self, *args: Any, guard: StepGuard, defer_engine: bool = False, **kwargs: Any):
        self.guard = guard
        self._defer_engine = defer_engine
        self._constructing = True  # the first rebuild_engine is the construction's engine build
        t0 = time.time()
        if defer_engine:
            _init_deepspeed_comm_alone()
        t1 = time.time()
        super().__init__(*args, **kwargs)
        # A replacement's construction, in parts (its recovery event's ``joiner_phases``).
        self.build_phases = {"comm_s": t1 - t0, "module_s": time.time() - t1}

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def release_groups(self) -> None:
        """Drop the engine (it holds the old generation's groups); module, optimizer and scheduler stay."""
        self.engine = None

    def regroup(self) -> None:
        """Recreate the PipelineModule's groups on the new generation (same order as a fresh module)."""
        regroup_module(self.module)

    def use_layout(self, program, num_stages: int, rules) -> None:
        """Before :meth:`regroup`: run ``program`` (``num_stages`` stages, checked with ``rules``) from
        the next engine on: the survivors' compact plan while ranks are missing, the job's own plan
        again once they joined (:mod:`integration.recovery.replan`). The module keeps its layers;
        only its topology (which group rank is which pipeline stage) follows the plan."""
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        replicas = self.module._topo.get_dim("data")
        if self.module._topo.get_dim("pipe") != num_stages:
            self.module._topo = PipeDataParallelTopology(num_pp=num_stages, num_dp=replicas)
        self.program, self.plan = program, program.plan
        self.routing.rules = rules
        self._full_programs = {}  # validation runs the full pipeline of the stages this group has

    def rebuild_engine(self) -> None:
        if self._constructing:  # the module's groups exist, the engine's collectives are next
            self._constructing = False
            if self.guard.injector is not None:
                self.guard.injector.at(0, "construction")
        if self._defer_engine:
            self._defer_engine = False
            return
        super().rebuild_engine()
        attach_guard(self.engine, self.guard)
