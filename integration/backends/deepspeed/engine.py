"""RoutedPipelineEngine: DeepSpeed's PipelineEngine running a RoutePlan.

Plugs in through DeepSpeed's own extension points, without forking it:

* the engine class (like upstream's DualPipeVEngine) - construction mirrors the pipeline branch of
  ``deepspeed.initialize`` in :func:`initialize_routed`;
* schedule instructions - :class:`RoutedTrainSchedule` yields one instruction per op of the
  rank's compiled program; ``_INSTRUCTION_MAP`` is extended in this class (the parent's map holds
  base-class functions, so overriding methods alone would not take effect);
* upstream ReduceGrads / OptimizerStep, wrapped for the gradient rule and for stages that no
  microbatch visited (they must not move: Adam's momentum and weight decay would change them).

Gradient rule (``gradient_rule``):

* ``visited`` (default, SkipPipe's distributed trainer): each stage's gradient is the mean over
  the microbatches that visited that stage in this iteration (all replicas together);
* ``all`` (stock DeepSpeed): the mean over all microbatches of the iteration, visited or not.

Both equal stock DeepSpeed for the full pipeline. A stage with no visits skips the reduction and
the optimizer update; the step counter and the LR schedule still advance with the other stages.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from deepspeed import comm as ds_dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.module import PipelineModule

from ...plan.routeplan import RoutePlan
from ...plan.rules import Rules, check_fits_grid
from ...runtime.executor import IterationResult, ProgramExecutor
from ...runtime.p2p import RoutedP2P, TensorSpec
from ...runtime.program import PART_EMBED, PART_HEAD, Program, as_program, plan_of
from ...runtime.gradient import check_gradient_rule, gradient_factor, stage_moves
from . import schedule as rsched

BatchSource = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RoutingSettings:
    """What the routed engine needs beyond DeepSpeed's own config."""

    plan: RoutePlan | Program  # a Program: compiled already (the main job's preflight), else compiled here
    act_shape: tuple[int, ...]  # (micro_batch_size, seq_len, d_model)
    label_shape: tuple[int, ...]  # (micro_batch_size, seq_len)
    gradient_rule: str = "visited"
    rules: Rules = field(default_factory=Rules)
    max_inflight: int | None = None


def check_plan_fits(plan: RoutePlan, model: PipelineModule, micro_batches: int, settings: RoutingSettings) -> None:
    """Refuse a plan that does not fit the engine's topology, before anything is computed."""
    check_gradient_rule(settings.gradient_rule)
    topo = model._topo
    S, D = topo.get_dim("pipe"), topo.get_dim("data")
    grid = [[topo.get_rank(pipe=s, data=r) for r in range(D)] for s in range(S)]
    check_fits_grid(plan, grid, micro_batches, settings.rules, "DeepSpeed", f"stage s, replica r -> rank s*{D}+r",
                    "the DeepSpeed config has gradient_accumulation_steps")


class RoutedPipelineEngine(PipelineEngine):
    """A PipelineEngine whose microbatches follow the routes of a RoutePlan."""

    def __init__(self, *args, routing: RoutingSettings, **kwargs):
        model = kwargs["model"]
        config_class = kwargs["config_class"]
        # Refuse an invalid plan before DeepSpeed builds anything or any rank computes.
        check_plan_fits(plan_of(routing.plan), model, config_class.gradient_accumulation_steps, routing)
        super().__init__(*args, **kwargs)
        if routing.gradient_rule == "visited" and (self.using_bf16_optimizer or self.zero_optimization()):
            raise ValueError("routing.gradient_rule=visited rescales .grad after the reduction, which the bf16/ZeRO "
                             "optimizers do not keep; use routing.gradient_rule=all with them")
        self.routing = routing
        self.batch_source: BatchSource | None = None
        self.p2p_channel = RoutedP2P(self.global_rank, device=self.device)
        act_dtype = torch.bfloat16 if self.bfloat16_enabled() else (torch.float16 if self.fp16_enabled()
                                                                     else torch.float32)
        self.executor = ProgramExecutor(self.global_rank, _DeepSpeedStageHandler(self), self.p2p_channel,
                                        TensorSpec(tuple(routing.act_shape), act_dtype),
                                        TensorSpec(tuple(routing.label_shape), torch.int64))
        self.last_result: IterationResult | None = None
        self.set_plan(routing.plan)

    # ----------------------------------------------------------------- plan
    def set_plan(self, plan: RoutePlan | Program) -> None:
        """Switch to another plan (same stage layout), validated here; a plan is compiled here, a
        :class:`Program` (already compiled) is run as given."""
        check_plan_fits(plan_of(plan), self.module, self.micro_batches, self.routing)
        program = as_program(plan, self.routing.max_inflight)
        self.plan = plan = program.plan
        self.program: Program = program
        self.my_ops = self.program.for_rank(self.global_rank)
        self.stage_visits = self.program.stage_visits
        self.total_microbatches = plan.num_microbatches
        self.mb_address = _microbatch_addresses(plan)

    @property
    def layout(self) -> str:
        return self.plan.layout

    def set_batch_source(self, fn: BatchSource | None) -> None:
        """Data addressed by (step, home replica, index): replayable, no iterator state."""
        self.batch_source = fn

    # ----------------------------------------------------------------- training
    def train_batch(self, data_iter: Iterator | None = None) -> torch.Tensor:
        """Run one iteration of the plan; returns the mean loss over all microbatches (every rank)."""
        if not torch._C.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self.executor.begin(self.global_steps)
        sched = RoutedTrainSchedule(self.my_ops, self.micro_batches, self.num_stages, self.stage_id)
        self._exec_schedule(sched)
        self.agg_train_loss = self._aggregate_routed_loss(self.last_result)
        return self.agg_train_loss

    @torch.no_grad()
    def evaluate(self, plan: RoutePlan | Program, batch_source: BatchSource, step: int = 0) -> torch.Tensor:
        """Forward-only pass of ``plan`` (e.g. the full pipeline for validation); mean loss on every rank."""
        program = as_program(plan, self.routing.max_inflight)
        plan = program.plan
        saved = self.batch_source, self.mb_address
        self.batch_source = batch_source
        self.mb_address = _microbatch_addresses(plan)
        was_training = self.module.training
        self.module.eval()
        try:
            result = self.executor.run(program.for_rank(self.global_rank), step, forward_only=True)
        finally:
            self.batch_source, self.mb_address = saved
            self.module.train(was_training)
        return self._aggregate_routed_loss(result)

    def _aggregate_routed_loss(self, result: IterationResult) -> torch.Tensor:
        # Sum in microbatch order in fp32 (as stock DeepSpeed does), then one all-reduce over the world.
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in sorted(result.losses):
            total += result.losses[mb].float()
        stats = torch.stack([total, torch.tensor(float(len(result.losses)), device=self.device)])
        ds_dist.all_reduce(stats)
        return stats[0] / stats[1]

    # ----------------------------------------------------------------- instructions
    def _exec_routed_op(self, op) -> None:
        self.executor.run_op(op)

    def _exec_routed_end(self) -> None:
        self.last_result = self.executor.end()

    @property
    def _my_stage_visited(self) -> bool:
        return stage_moves(self.stage_visits[self.stage_id])

    def _exec_reduce_grads(self):
        if not self._my_stage_visited:
            return  # every replica of this stage knows it: no collective is skipped on one side only
        super()._exec_reduce_grads()
        self._apply_gradient_rule([p for p in self.module.parameters() if p.grad is not None])

    def _apply_gradient_rule(self, params) -> None:
        factor = gradient_factor(self.routing.gradient_rule, self.total_microbatches, self.stage_visits[self.stage_id])
        if factor != 1.0:
            for p in params:
                p.grad.mul_(factor)

    def _exec_optimizer_step(self, lr_kwargs=None):
        if self._my_stage_visited:
            return super()._exec_optimizer_step(lr_kwargs)
        # Unvisited stage: keep weights and optimizer state, advance counters and LR schedule.
        with _optimizer_step_suppressed(self.optimizer):
            super()._exec_optimizer_step(lr_kwargs)

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        rsched.RoutedEndIteration: _exec_routed_end,
        ds_schedule.ReduceGrads: _exec_reduce_grads,
        ds_schedule.OptimizerStep: _exec_optimizer_step,
        **dict.fromkeys(rsched.INSTRUCTION_FOR_KIND.values(), _exec_routed_op),
    }


RoutedTrainSchedule = rsched.RoutedTrainSchedule


def _microbatch_addresses(plan: RoutePlan) -> dict[int, tuple[int, int]]:
    """(home replica, index within that home's microbatches) of every microbatch: the data address."""
    out = {}
    for home in plan.stage_nodes[0]:
        for i, r in enumerate(sorted(plan.routes_from(home), key=lambda r: r.mb)):
            out[r.mb] = (r.home_replica, i)
    return out


@contextlib.contextmanager
def _optimizer_step_suppressed(optimizer):
    original = optimizer.step
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        optimizer.step = original


class _DeepSpeedStageHandler:
    """The executor's model callbacks, implemented with the engine's module and backward."""

    def __init__(self, engine: RoutedPipelineEngine):
        self.engine = engine

    def load(self, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        eng = self.engine
        if eng.batch_source is not None:
            replica, index = eng.mb_address[mb]
            tokens, labels = eng.batch_source(eng.executor.step, replica, index)
        else:
            batch = eng._next_batch()
            tokens, labels = batch[0], batch[1]
        return tokens.to(eng.device), labels.to(eng.device)

    def forward(self, part: str, mb: int, inputs: torch.Tensor) -> torch.Tensor:
        eng = self.engine
        if eng.layout == "ring" and part in (PART_EMBED, PART_HEAD):
            home = eng.module.forward_funcs[0]
            return home.embed_forward(inputs) if part == PART_EMBED else home.head_forward(inputs)
        return eng.module(inputs)

    def loss(self, part: str, mb: int, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.engine.module.loss_fn(output, labels)

    def backward_loss(self, part: str, mb: int, loss: torch.Tensor) -> None:
        # Upstream's backward: GAS scaling, loss scaling and its gradient hooks, as on a last stage.
        DeepSpeedEngine.backward(self.engine, loss)

    def backward(self, part: str, mb: int, output: torch.Tensor, grad: torch.Tensor) -> None:
        eng = self.engine
        if eng.using_bf16_optimizer:
            eng.optimizer.clear_lp_grads()
        eng._running_engine_backward = True
        try:
            output.backward(gradient=grad)
        finally:
            eng._running_engine_backward = False
        if eng.using_bf16_optimizer and not eng._config.bfloat16_config.immediate_grad_update:
            eng.optimizer.update_hp_grads(clear_lp_grads=False)
