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

Boundaries (what crosses between stages) are discovered at run time unless declared: before the
first iteration every stage runs one no-grad forward of the first microbatch along its replica's
pipeline (DeepSpeed learns the same from its meta messages), so shapes, dtypes and tuple structure
may differ per boundary; then one handshake (integration/runtime/boundary.py) checks every pair
of the plan - a skip joining stages whose boundaries differ is refused on every rank, naming them,
before any training compute. Tensors cross as one packed message per payload; float ones carry
gradients back, integer/bool ones do not. Compute follows upstream's instructions: inputs cloned
as stock clones them, forward through ``DeepSpeedEngine.forward`` (its hooks run the bf16/ZeRO
optimizer's backward prologue per microbatch), tuple outputs backward per float tensor.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

import torch
from deepspeed import comm as ds_dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.module import PipelineModule

from ...plan.builders import build_plan
from ...plan.routeplan import RoutePlan
from ...plan.rules import Rules, check_fits_grid
from ...runtime import boundary
from ...runtime.executor import IterationResult, ProgramExecutor
from ...runtime.p2p import RoutedP2P, TensorSpec
from ...runtime.program import (PART_EMBED, PART_HEAD, RECV_ACT, RECV_LABELS, SEND_ACT, SEND_LABELS, Program,
                                as_program, plan_of)
from ...runtime.gradient import check_gradient_rule, gradient_factor, stage_moves
from ...runtime.grid import ParallelGrid
from . import schedule as rsched

BatchSource = Callable[[int, int, int], tuple[Any, Any]]

PLAN_KINDS = ("full", "skip", "checkfree_plus")


@dataclass
class RoutingSettings:
    """What the routed engine needs beyond DeepSpeed's own config (also the config's ``routing`` block).

    ``plan``: a :class:`RoutePlan`, a compiled :class:`Program` (the main job's preflight), or a
    ``build_plan`` kind (full | skip | checkfree_plus) built here on the engine's rank grid with the
    model's layout, ``skip_ratio``/``path_length`` and ``seed``.
    ``act_shape``/``label_shape``: declared single-tensor boundaries (the main job's own models,
    ring layout); None (the default): every boundary's shapes, dtypes and tuple structure are
    discovered at run time, as DeepSpeed's pipe engine does.
    """

    plan: RoutePlan | Program | str = "full"
    gradient_rule: str = "visited"
    rules: Rules = field(default_factory=Rules)
    max_inflight: int | None = None
    skip_ratio: float | None = None
    path_length: int | None = None
    seed: int = 0
    act_shape: tuple[int, ...] | None = None
    label_shape: tuple[int, ...] | None = None

    @staticmethod
    def from_config(block: Mapping[str, Any]) -> "RoutingSettings":
        """The ``routing`` block of a DeepSpeed config (a dict), e.g. ``{"plan": "skip", "skip_ratio": 0.25}``."""
        known = {f.name for f in fields(RoutingSettings)} - {"rules", "act_shape", "label_shape"}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f"DeepSpeed config: routing.{unknown[0]} is not a routing setting; use {sorted(known)}")
        settings = RoutingSettings(**dict(block))
        if isinstance(settings.plan, str) and settings.plan not in PLAN_KINDS:
            raise ValueError(f"DeepSpeed config: routing.plan={settings.plan!r}; use one of {PLAN_KINDS} (or hand a "
                             f"RoutePlan through initialize_routed(routing=RoutingSettings(plan=...)))")
        return settings


def model_layout(model: PipelineModule) -> str:
    """``ring`` for the home-stage modules of :func:`~integration.backends.deepspeed.module.ring_pipeline_module`,
    ``linear`` for every other PipelineModule (a user's flat layer list cut into stages)."""
    return getattr(model, "skipfree_layout", "linear")


def node_grid(model: PipelineModule) -> ParallelGrid:
    """(stage, replica, tensor rank) <-> global rank of the model's topology.

    A plan node is a whole tensor-parallel group, as on megatron (integration/backends/megatron/layout.py):
    plan node id = the global rank of its model-parallel-rank-0 member. Without a ``model`` axis
    (PipeDataParallelTopology) the tensor size is 1 and a node is its rank.
    """
    topo = model._topo
    axes = set(topo.get_axis_names())
    if axes not in ({"pipe", "data"}, {"pipe", "data", "model"}):
        raise ValueError(f"routed DeepSpeed engine: topology axes {topo.get_axis_names()} are not supported; build the "
                         f"PipelineModule with PipeDataParallelTopology or PipeModelDataParallelTopology")
    S, D = topo.get_dim("pipe"), topo.get_dim("data")
    T = topo.get_dim("model") if "model" in axes else 1
    rank_of = {(s, r, t): topo.get_rank(pipe=s, data=r, **({"model": t} if "model" in axes else {}))
               for s in range(S) for r in range(D) for t in range(T)}
    return ParallelGrid(rank_of, S, D, T)


def rank_grid(model: PipelineModule) -> list[list[int]]:
    """stage -> replica -> plan node id (global rank of the model-parallel-rank-0 member) of the model's topology."""
    return node_grid(model).stage_nodes


def resolve_plan(settings: RoutingSettings, model: PipelineModule, micro_batches: int) -> RoutePlan | Program:
    """The settings' plan, built on the model's grid and layout when it is given as a kind."""
    if not isinstance(settings.plan, str):
        return settings.plan
    if settings.plan not in PLAN_KINDS:
        raise ValueError(f"routing.plan={settings.plan!r}; use one of {PLAN_KINDS}, a RoutePlan or a Program")
    return build_plan(settings.plan, rank_grid(model), micro_batches, layout=model_layout(model),
                      skip_ratio=settings.skip_ratio, path_length=settings.path_length, seed=settings.seed)


def check_plan_fits(plan: RoutePlan, model: PipelineModule, micro_batches: int, settings: RoutingSettings) -> None:
    """Refuse a plan that does not fit the engine's topology or the model's layout, before anything is computed."""
    check_gradient_rule(settings.gradient_rule)
    layout = model_layout(model)
    if plan.layout != layout:
        raise ValueError(f"routing plan: the model is a {layout} PipelineModule but the plan has "
                         f"layout={plan.layout!r}; build the plan with layout={layout!r} (or give routing.plan as a kind "
                         f"- full | skip - and the layout is read from the model)")
    grid = node_grid(model)
    check_fits_grid(plan, grid.stage_nodes, micro_batches, settings.rules, "DeepSpeed",
                    f"stage s, replica r -> global rank of model-parallel rank 0 (topology.get_rank(pipe=s, data=r"
                    f"{', model=0' if grid.tensor > 1 else ''})); DP={grid.replicas}, TP={grid.tensor}",
                    "the DeepSpeed config has gradient_accumulation_steps")


class RoutedPipelineEngine(PipelineEngine):
    """A PipelineEngine whose microbatches follow the routes of a RoutePlan.

    Tensor parallelism (a ``PipeModelDataParallelTopology``): every model-parallel rank of a plan node
    runs the node's program with each peer translated to the member of the same model-parallel
    index, as stock DeepSpeed's pipe p2p pairs them; gradients are reduced over the data-parallel
    group only (stock's reduction), the loss is counted once per node (model-parallel rank 0).
    """

    #: False for a subclass that cannot run a model axis (refused before anything is built).
    supports_tensor_parallel: bool = True

    def __init__(self, *args, routing: RoutingSettings, **kwargs):
        model = kwargs["model"]
        config_class = kwargs["config_class"]
        grid = node_grid(model)
        if grid.tensor > 1 and not type(self).supports_tensor_parallel:
            raise ValueError(f"{type(self).__name__}: tensor parallelism inside a stage (model axis of size "
                             f"{grid.tensor}) is not supported by this engine; use RoutedPipelineEngine "
                             f"(initialize_routed's default engine_class) or a PipeDataParallelTopology")
        if grid.tensor > 1 and model_layout(model) == "ring":
            raise ValueError("routed DeepSpeed engine: the ring layout with tensor parallelism inside a stage "
                             "(a model axis) is not supported; use a linear PipelineModule")
        routing.plan = resolve_plan(routing, model, config_class.gradient_accumulation_steps)
        # Refuse an invalid plan before DeepSpeed builds anything or any rank computes.
        check_plan_fits(plan_of(routing.plan), model, config_class.gradient_accumulation_steps, routing)
        super().__init__(*args, **kwargs)
        if routing.gradient_rule == "visited" and (self.using_bf16_optimizer or self.zero_optimization()):
            raise ValueError("routing.gradient_rule=visited rescales .grad after the reduction, which the bf16/ZeRO "
                             "optimizers do not keep; use routing.gradient_rule=all with them")
        declared = routing.act_shape is not None
        if model_layout(self.module) == "ring" and (not declared or self.bfloat16_enabled() or self.fp16_enabled()):
            raise ValueError("routed DeepSpeed engine: the ring layout's home stage runs its embedding and head outside "
                             "DeepSpeedEngine.forward, so it needs declared boundaries (RoutingSettings.act_shape and "
                             "label_shape) and fp32; use a linear PipelineModule for discovered boundaries or bf16")
        if declared != (routing.label_shape is not None):
            raise ValueError("RoutingSettings: give act_shape and label_shape together (declared boundaries) or neither "
                             "(discovered at run time)")
        self.routing = routing
        self.node_grid = grid
        self.plan_node = grid.node_of(self.global_rank)  # this rank's TP group's plan node id
        self.batch_source: BatchSource | None = None
        self.p2p_channel = RoutedP2P(self.global_rank, device=self.device)
        act_dtype = torch.bfloat16 if self.bfloat16_enabled() else (torch.float16 if self.fp16_enabled()
                                                                     else torch.float32)
        self.executor = ProgramExecutor(
            self.global_rank, _DeepSpeedStageHandler(self), self.p2p_channel,
            TensorSpec(tuple(routing.act_shape), act_dtype) if declared else None,
            TensorSpec(tuple(routing.label_shape), torch.int64) if declared else None)
        # Discovered boundaries: this stage's (input, output, labels) layouts, and the program they were agreed for.
        self.stage_layouts: tuple | None = None
        # id(program) -> (program, (send layouts, receive layouts)); the program is kept so its id is not
        # reused by a later program (a resample) while the entry exists.
        self._agreed: dict[int, tuple[Program, tuple[dict, dict]]] = {}
        self.last_result: IterationResult | None = None
        self.set_plan(routing.plan)

    # ----------------------------------------------------------------- plan
    def set_plan(self, plan: RoutePlan | Program) -> None:
        """Switch to another plan (same stage layout), validated here; a plan is compiled here, a
        :class:`Program` (already compiled) is run as given. Discovered boundaries are agreed for it
        (one handshake, every rank) before its first iteration."""
        check_plan_fits(plan_of(plan), self.module, self.micro_batches, self.routing)
        program = as_program(plan, self.routing.max_inflight)
        self.plan = plan = program.plan
        self.program: Program = program
        self.my_ops = self._ops_of(self.program)
        self.stage_visits = self.program.stage_visits
        self.total_microbatches = plan.num_microbatches
        self.mb_address = _microbatch_addresses(plan)
        self._agreed = {}

    def _ops_of(self, program: Program) -> list:
        """This rank's ops: its node's program, peers translated to the same model-parallel index."""
        return self.node_grid.ops_for_rank(program.for_rank(self.plan_node), self.global_rank)

    @property
    def layout(self) -> str:
        return self.plan.layout

    @property
    def discovers_boundaries(self) -> bool:
        return self.routing.act_shape is None

    def set_batch_source(self, fn: BatchSource | None) -> None:
        """Data addressed by (step, home replica, index): replayable, no iterator state."""
        self.batch_source = fn

    def reset_activation_shape(self) -> None:
        """As stock: call on every rank when boundary shapes change; they are discovered again."""
        super().reset_activation_shape()
        self.stage_layouts = None
        self._agreed = {}

    def _backward_prologue_per_tensor(self, grad):
        # Upstream scales a stage output's gradient by 1/GAS on the last stage, where stock computes the
        # loss. Here the loss is wherever a route ends (the ring's home) and is always backpropagated by
        # DeepSpeedEngine.backward, which scales it already; a received gradient is never scaled again.
        return grad

    # ----------------------------------------------------------------- training
    # Upstream's train_batch runs as it is (timers, steps_per_print logging, monitor); these two hooks
    # make it run this rank's routed program and aggregate the routed losses.
    def _train_schedule(self):
        self._use_program(self.program)
        self.executor.begin(self.global_steps)
        return RoutedTrainSchedule(self.my_ops, self.micro_batches, self.num_stages, self.stage_id)

    def _aggregate_total_loss(self):
        self.agg_additional_losses = None
        return self._aggregate_routed_loss(self.last_result)

    @torch.no_grad()
    def evaluate(self, plan: RoutePlan | Program, batch_source: BatchSource | None = None,
                 step: int = 0) -> torch.Tensor:
        """Forward-only pass of ``plan`` (e.g. the full pipeline for validation); mean loss on every rank.
        Data from ``batch_source`` or, without one, the engine's data iterator."""
        program = as_program(plan, self.routing.max_inflight)
        plan = program.plan
        saved = self.batch_source, self.mb_address
        self.batch_source = batch_source if batch_source is not None else self.batch_source
        self.mb_address = _microbatch_addresses(plan)
        was_training = self.module.training
        self.module.eval()
        try:
            self._use_program(program)
            result = self.executor.run(self._ops_of(program), step, forward_only=True)
        finally:
            self.batch_source, self.mb_address = saved
            self.module.train(was_training)
            if program is not self.program:
                self._agreed.pop(id(program), None)  # an evaluation program is agreed afresh each call
            self._use_program(self.program, agree=False)
        return self._aggregate_routed_loss(result)

    def _aggregate_routed_loss(self, result: IterationResult) -> torch.Tensor:
        # Sum in microbatch order in fp32 (as stock DeepSpeed does), then one all-reduce over the world;
        # a node's loss is counted once (its model-parallel peers hold the same loss).
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        counted = self.plan_node == self.global_rank
        losses = result.losses if counted else {}
        for mb in sorted(losses):
            total += losses[mb].float()
        stats = torch.stack([total, torch.tensor(float(len(losses)), device=self.device)])
        ds_dist.all_reduce(stats)
        return stats[0] / stats[1]

    # ----------------------------------------------------------------- boundaries
    def _use_program(self, program: Program, agree: bool = True) -> None:
        """Discovered boundaries: probe the stage layouts (once per shape), agree on ``program``'s pairs
        (once per program, a collective), and hand the executor the agreed layouts."""
        if not self.discovers_boundaries:
            return
        entry = self._agreed.get(id(program))
        agreed = entry[1] if entry is not None and entry[0] is program else None
        if agreed is None:
            if not agree:
                return
            if self.stage_layouts is None:
                self.stage_layouts = self._probe_stage_layouts()
            agreed = self._agree(program)
            self._agreed[id(program)] = (program, agreed)
        self.executor.structured = True
        self.executor.send_layouts, self.executor.recv_layouts = agreed

    def _probe_stage_layouts(self) -> tuple:
        """(input, output, labels) layouts of this stage, from a no-grad eval-mode forward of the first
        microbatch along this replica's pipeline (RNG state restored), as DeepSpeed's meta messages
        learn them. Home ranks peek their first batch; it stays first in their data."""
        labels_layout = inputs = None
        prev = self.grid.stage_to_global(self.stage_id - 1) if self.stage_id > 0 else None
        nxt = self.grid.stage_to_global(self.stage_id + 1) if self.stage_id < self.num_stages - 1 else None
        if self.stage_id == 0:
            batch = self._peek_first_batch()
            # A copy: an in-place first layer must not change the batch the first iteration trains on.
            inputs = _map_tensors(lambda t: t.clone().to(self.device), _stock_inputs(batch[0]))
            labels_layout = boundary.flatten(_to_device(batch[1], self.device))[1]
        else:
            inputs = self._probe_recv(prev)
        in_layout = boundary.flatten(inputs)[1] if self.stage_id > 0 else None
        was_training = self.module.training
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        interval = self.module.activation_checkpoint_interval
        try:
            self.module.eval()
            self.module.activation_checkpoint_interval = 0  # no graph to save: checkpointing would only cost
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                output = self.module(inputs)
        finally:
            self.module.activation_checkpoint_interval = interval
            self.module.train(was_training)
        out_layout = None
        if nxt is not None:
            tensors, out_layout = boundary.flatten(output)
            self._probe_send(tensors, out_layout, nxt)
        self.p2p_channel.flush()
        return in_layout, out_layout, labels_layout

    def _probe_send(self, tensors: list[torch.Tensor], layout: boundary.BoundaryLayout, peer: int) -> None:
        meta = torch.frombuffer(bytearray(pickle.dumps(layout.key())), dtype=torch.uint8).to(self.device)
        self.p2p_channel.send(torch.tensor([meta.numel()], dtype=torch.int64), peer, "act", -1, -1)
        self.p2p_channel.send(meta, peer, "act", -1, -1)
        boundary.send_payload(self.p2p_channel, tensors, peer, "act", -1, -1)

    def _probe_recv(self, peer: int) -> Any:
        n = int(self.p2p_channel.recv(TensorSpec((1,), torch.int64), peer, "act", -1, -1).item())
        meta = self.p2p_channel.recv(TensorSpec((n,), torch.uint8), peer, "act", -1, -1)
        layout = boundary.BoundaryLayout.from_key(pickle.loads(meta.cpu().numpy().tobytes()))
        tensors = boundary.recv_payload(self.p2p_channel, layout, peer, "act", -1, -1)
        return boundary.unflatten([t.clone() for t in tensors], layout)

    def _peek_first_batch(self) -> Any:
        if self.batch_source is not None:
            return self.batch_source(self.global_steps, self.grid.data_parallel_id, 0)
        if self.data_iterator is None:
            raise RuntimeError(f"rank {self.global_rank} (stage 0): no training data; pass training_data= to "
                               f"initialize_routed or a data iterator to train_batch(), as with stock DeepSpeed")
        raw = next(self.data_iterator)
        self.data_iterator = itertools.chain([raw], self.data_iterator)
        return self.batch_fn(raw) if self.batch_fn else raw

    def _agree(self, program: Program) -> tuple[dict, dict]:
        """The boundary handshake for ``program``: every pair's activation and label layouts (a collective)."""
        in_layout, out_layout, labels_layout = self.stage_layouts
        sends: boundary.Declarations = {}
        expects: boundary.Declarations = {}
        for op in self._ops_of(program):
            if op.kind == SEND_ACT:
                sends[(op.peer, "act")] = out_layout.key()
            elif op.kind == RECV_ACT:
                expects[(op.peer, "act")] = in_layout.key()
            elif op.kind == SEND_LABELS:
                sends[(op.peer, "labels")] = labels_layout.key()
            elif op.kind == RECV_LABELS:
                expects[(op.peer, "labels")] = None  # the home's labels, as they are
        hints = {"act": "a route hands a stage's output to the next stage it visits: the stages a skip joins need "
                        "equal boundaries (shapes, dtypes, tuple structure, discovered from the first microbatch); "
                        "skip only between stages with equal boundaries, or use the full plan"}
        recv = boundary.handshake(sends, expects, describe_rank=self._describe_rank, hints=hints,
                                  wait=self.p2p_channel._wait, device=self.device)
        send = {key: boundary.BoundaryLayout.from_key(v) for key, v in sends.items()}
        # Gradients flow back over every activation pair: the float tensors of the agreed layout.
        for (peer, kind), layout in list(send.items()):
            if kind == "act":
                recv[(peer, "grad")] = boundary.grad_layout(layout)
        for (peer, kind), layout in list(recv.items()):
            if kind == "act":
                send[(peer, "grad")] = boundary.grad_layout(layout)
        return send, recv

    def _describe_rank(self, rank: int) -> str:
        stage, replica, tensor = self.node_grid.coords(rank)
        tp = f", model-parallel rank {tensor}" if self.node_grid.tensor > 1 else ""
        return f"stage {stage} (rank {rank}, replica {replica}{tp})"

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


def _stock_inputs(inputs: Any) -> Any:
    """A first stage's inputs as stock DeepSpeed hands them to the module: a list becomes a tuple."""
    return tuple(inputs) if isinstance(inputs, list) else inputs


def _to_device(obj: Any, device: torch.device) -> Any:
    return _map_tensors(lambda t: t.to(device), obj)


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(fn, x) for x in obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    return obj


class _DeepSpeedStageHandler:
    """The executor's model callbacks, implemented as upstream's PipelineEngine instructions do them."""

    def __init__(self, engine: RoutedPipelineEngine):
        self.engine = engine

    def load(self, mb: int) -> tuple[Any, Any]:
        eng = self.engine
        if eng.batch_source is not None:
            replica, index = eng.mb_address[mb]
            batch = eng.batch_source(eng.executor.step, replica, index)
        else:
            batch = eng._next_batch()
        # As stock's _exec_load_micro_batch: a detached copy; float inputs require grad only under
        # reentrant activation checkpointing (its first segment would be cut off from autograd).
        grad_in = eng._reentrant_activation_checkpointing()

        def leaf(t: torch.Tensor) -> torch.Tensor:
            mine = t.clone().detach().to(eng.device)
            mine.requires_grad = grad_in and mine.is_floating_point()
            return mine

        return _map_tensors(leaf, _stock_inputs(batch[0])), _map_tensors(lambda t: t.to(eng.device), batch[1])

    def forward(self, part: str, mb: int, inputs: Any) -> Any:
        eng = self.engine
        if eng.layout == "ring" and part in (PART_EMBED, PART_HEAD):
            home = eng.module.forward_funcs[0]
            return home.embed_forward(inputs) if part == PART_EMBED else home.head_forward(inputs)
        # As stock's _exec_forward_pass: the stage runs on copies (the received leaves keep their
        # gradients; an in-place first layer is fine), through DeepSpeedEngine.forward, whose output
        # hooks run the optimizer's backward prologue (BF16_Optimizer, ZeRO) once per microbatch.
        return DeepSpeedEngine.forward(eng, _map_tensors(torch.clone, inputs))

    def loss(self, part: str, mb: int, output: Any, labels: Any) -> torch.Tensor:
        loss_fn = self.engine.module.loss_fn
        return loss_fn(output, labels) if loss_fn is not None else output  # stock: no loss_fn, forward returns it

    def backward_loss(self, part: str, mb: int, loss: torch.Tensor) -> None:
        # Upstream's backward: GAS scaling, loss scaling and its gradient hooks, as on a last stage.
        DeepSpeedEngine.backward(self.engine, loss)

    def backward(self, part: str, mb: int, output: Any, grad: Any) -> None:
        eng = self.engine
        if eng.using_bf16_optimizer:
            eng.optimizer.clear_lp_grads()
        eng._running_engine_backward = True
        try:
            if isinstance(output, torch.Tensor):
                output.backward(gradient=grad[0] if isinstance(grad, list) else grad)
            else:  # as stock: one backward per float output tensor, in order
                outs = [t for t in boundary.flatten(output)[0] if t.is_floating_point()]
                for i, (out, g) in enumerate(zip(outs, grad)):
                    out.backward(gradient=g, retain_graph=i < len(outs) - 1)
        finally:
            eng._running_engine_backward = False
        if eng.using_bf16_optimizer and not eng._config.bfloat16_config.immediate_grad_update:
            eng.optimizer.update_hp_grads(clear_lp_grads=False)
