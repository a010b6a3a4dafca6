"""A megatron-core ``forward_backward_func`` that runs a RoutePlan (SkipPipe routing).

:class:`RoutedForwardBackward` is called with exactly the keywords of megatron's
``forward_backward_pipelining_without_interleaving`` (what ``get_forward_backward_func()``
returns), so a training loop swaps it in without other changes. Inside it runs this rank's op
program (``compile_plan`` + :class:`ProgramExecutor`) and reuses megatron's own pieces:
``forward_step`` (the user's ``forward_step_func``, its ``loss_func`` and megatron's loss
scaling by ``num_microbatches``), ``backward_step`` (``grad_scale_func``), ``config.no_sync_func``
and ``config.finalize_model_grads_func`` (DDP all-reduce, tied-embedding all-reduce).

Why not megatron's 1F1B: it sends only to the next/previous pipeline rank in a fixed order, and
routed microbatches skip, swap and cross replicas. Transfers therefore go through
:class:`RoutedP2P` on the WORLD group (a route may leave this rank's pipeline group), in the
program's single global order (no tags needed, no deadlock).

Data contract (as stock): every rank passes its ``data_iterator`` (or None where it holds no
data); only home ranks read it, one item per microbatch, exactly as stock megatron's first stage
does. The item (a dict of tensors, as megatron's GPT datasets yield, or any nest of tensors)
travels with the microbatch's route to every other stage it visits, so each stage's
``forward_step_func`` gets an iterator over the real batch (tokens, labels, loss_mask,
attention_mask, position_ids), as it would under stock 1F1B with identical per-stage iterators.
The user's ``forward_step_func`` needs no None handling.

Before the first transfer of a plan every rank runs one boundary handshake
(:func:`integration.runtime.boundary.handshake`): the model's layout against the plan's, every
pair's activation shapes and which batch tensors travel, so a mismatch is one clear error on
every rank before any compute.

Gradient rule (``gradient_rule``), applied after ``finalize_model_grads_func``:
``visited`` (default) - each stage's gradient is the mean over the microbatches that visited it,
all replicas together (megatron's 1/num_microbatches loss scaling and DDP's 1/DP averaging give
the mean over all microbatches; the stage's grads are then multiplied by total/visits);
``all`` - megatron's own mean over all microbatches. A stage that no microbatch visited still
joins every collective but must not move: :meth:`RoutedForwardBackward.guard_optimizer` makes
the optimizer skip its parameter update there (step counters and LR schedules stay aligned).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import Any, Callable, Iterator, Optional

import torch

from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import schedules as mcore_schedules
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_attr_wrapped_model, get_model_config, get_model_type

from ...plan.builders import build_plan
from ...plan.routeplan import RoutePlan
from ...plan.rules import Rules
from ...runtime import boundary
from ...runtime.executor import ProgramExecutor
from ...runtime.p2p import RoutedP2P, TensorSpec
from ...runtime.program import (LOAD, LOSS_PARTS, PART_EMBED, PART_FIRST, RECV_ACT, RECV_BATCH, RECV_GRAD,
                                SEND_ACT, SEND_BATCH, SEND_GRAD, Program, as_program, plan_of)
from ...runtime.gradient import check_gradient_rule, gradient_factor, stage_moves
from .cpu_compat import apply_cpu_patches, check_megatron_version
from .layout import MegatronGrid, check_plan_fits


ACTIVATION = "activation"  # handshake kind of act/grad transfers (same spec both ways)
BATCH = "batch"


class RoutedForwardBackward:
    """Drop-in for megatron's ``forward_backward_func`` that follows ``plan``'s routes.

    Construct it on every rank (it all-gathers the rank grid) after
    ``parallel_state.initialize_model_parallel``; the plan is validated against the grid here,
    before any rank computes. :meth:`for_model` builds the plan too (layout read from the model).
    A plan that leaves a stage unvisited (never trained) is refused unless ``allow_unvisited``.
    """

    def __init__(self, plan: RoutePlan | Program, *, num_microbatches: int | None = None,
                 gradient_rule: str = "visited",
                 max_inflight: int | None = None, rules: Rules | None = None, grid: MegatronGrid | None = None,
                 p2p_wait: Callable[[object, str], None] | None = None,
                 before_op: Callable[[Any], None] | None = None, allow_unvisited: bool = False):
        check_megatron_version()
        apply_cpu_patches()
        check_gradient_rule(gradient_rule)
        self.grid = grid or MegatronGrid.from_parallel_state()
        self.rank = torch.distributed.get_rank()
        self.gradient_rule = gradient_rule
        self.max_inflight = max_inflight
        self.rules = rules
        self.allow_unvisited = allow_unvisited
        self.stage = self.grid.coords(self.rank)[0]
        self.node = self.grid.node_of(self.rank)
        self._calls = 0
        # Fault tolerance plugs in here: a failure-aware wait for every p2p transfer (and the
        # handshake's collectives) and a hook ahead of every op (failure injection).
        self.p2p_wait = p2p_wait
        self.before_op = before_op
        # Ring: the tie is local to the home stage; megatron reads embd=None as "use the default
        # first+last-stage group", so a one-rank group switches the cross-stage all-reduce off.
        self._own_group, _ = torch.distributed.new_subgroups(group_size=1)
        self.last_losses: dict[int, torch.Tensor] = {}
        self.last_stage_visited = True
        # The executor's per-op trace of the last training call (measured drift reads it) and an
        # optional compute delay (recovery.straggler emulation); see ProgramExecutor.
        self.last_trace: list[tuple] = []
        self.compute_delay = None
        self.set_plan(plan, num_microbatches)

    @classmethod
    def for_model(cls, model: Any, kind: str = "skip", *, num_microbatches: int, skip_ratio: float | None = None,
                  path_length: int | None = None, seed: int = 0, **kwargs: Any) -> "RoutedForwardBackward":
        """Build the plan on megatron's rank grid with the layout of ``model`` and return the drop-in.

        ``kind`` is ``build_plan``'s (full | skip | checkfree_plus); ``num_microbatches`` is per
        data-parallel replica, as megatron's. A skip plan that skips nothing is warned about.
        """
        layout = model_layout(model)
        if layout is None:
            raise ValueError(f"RoutedForwardBackward.for_model: cannot tell the layout of a "
                             f"{type(_unwrap(model)).__name__}; build the plan with build_plan(..., layout='linear' "
                             f"or 'ring') and pass it to RoutedForwardBackward")
        grid = kwargs.pop("grid", None) or MegatronGrid.from_parallel_state()
        plan = build_plan(kind, grid.stage_nodes, num_microbatches, layout=layout, skip_ratio=skip_ratio,
                          path_length=path_length, seed=seed)
        if kind == "skip":
            warn_if_skips_nothing(plan)
        return cls(plan, num_microbatches=num_microbatches, grid=grid, **kwargs)

    # ------------------------------------------------------------------ plan
    def set_plan(self, plan: RoutePlan | Program, num_microbatches: int | None = None) -> None:
        """Validate ``plan`` against the megatron grid and compile this rank's program (a :class:`Program`,
        compiled already, e.g. by the main job's preflight, is run as given)."""
        given, plan = plan, plan_of(plan)
        m = num_microbatches if num_microbatches is not None else len(plan.routes_from(plan.stage_nodes[0][0]))
        check_plan_fits(plan, self.grid, m, self.rules)
        check_every_stage_visited(plan, self.allow_unvisited)
        program = as_program(given, self.max_inflight, carry_batch=True)
        self.plan = plan
        self.num_microbatches = m
        self.program: Program = program
        self.ops = self.grid.ops_for_rank(self.program.for_rank(self.node), self.rank)
        self.stage_visits = self.program.stage_visits
        self._agreed: tuple | None = None  # (activation spec key, batch key) of the last handshake
        self._recv_layouts: dict = {}

    @property
    def stage_visited(self) -> bool:
        """Whether any microbatch of the plan visits this rank's stage."""
        return stage_moves(self.stage_visits[self.stage])

    def guard_optimizer(self, optimizer) -> None:
        """Make ``optimizer`` skip its update on stages no microbatch visited.

        ``optimizer``: a megatron optimizer (``get_megatron_optimizer``, chained or not) or a plain
        ``torch.optim.Optimizer``. The megatron step still runs (grad-norm collectives, counters);
        only the torch optimizer's parameter/state update is skipped, so Adam moments and weight
        decay do not move an unvisited stage. A plain torch optimizer over megatron DDP parameters
        reads ``param.main_grad`` (where DDP accumulates; it leaves ``param.grad`` None), as
        megatron's own optimizer does.
        """
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(opt, torch.optim.Optimizer):
                inner, plain = opt, True
            elif isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
                inner, plain = opt.optimizer, False
            else:
                raise TypeError(f"guard_optimizer: {type(opt).__name__} is neither a megatron optimizer "
                                f"(megatron.core.optimizer.get_megatron_optimizer) nor a torch.optim.Optimizer; pass "
                                f"one of those (the guard skips the torch optimizer's step on unvisited stages)")
            if getattr(inner, "_routed_guard", False):
                continue
            original = inner.step

            def step(*args, _original=original, _inner=inner, _plain=plain, **kwargs):
                if not self.last_stage_visited:
                    return None
                if _plain:
                    _use_main_grads(_inner)
                return _original(*args, **kwargs)

            inner.step = step
            inner._routed_guard = True

    # ------------------------------------------------------------------ megatron's signature
    def __call__(self, *, forward_step_func: Callable, data_iterator: Any, model: Any, num_microbatches: int,
                 seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
                 forward_only: bool = False, collect_non_loss_data: bool = False,
                 first_val_step: Optional[bool] = None, adjust_tensor_shapes_fn: Optional[Callable] = None,
                 p2p_communicator: Any = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 force_all_reduce: Optional[bool] = False) -> list:
        """Run one iteration of the plan; returns the loss_func outputs of the microbatches whose
        loss this rank computed, in microbatch order (megatron returns them on its last stage)."""
        if isinstance(model, list):
            if len(model) != 1:
                raise ValueError("routed schedule: virtual pipeline stages (model chunks) are not supported")
            model = model[0]
        if isinstance(data_iterator, list):
            data_iterator = data_iterator[0]
        if num_microbatches != self.num_microbatches:
            raise ValueError(f"routed schedule: called with num_microbatches={num_microbatches}, but the plan gives "
                             f"every home replica {self.num_microbatches}")
        config = get_model_config(model)
        _refuse_unsupported(config, model)
        pgc = pg_collection or self._pg_collection()
        act_spec = TensorSpec(tuple(_activation_shape(config, seq_length, micro_batch_size, decoder_seq_length, pgc)),
                              config.pipeline_dtype)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        data_iterator, first_batch = self._peek_first_batch(data_iterator)
        self._agree(model, act_spec, first_batch, device)
        handler = _MegatronStageHandler(forward_step_func, data_iterator, model, config, num_microbatches,
                                        pgc.cp.size(), collect_non_loss_data, first_val_step, forward_only)
        executor = ProgramExecutor(self.rank, handler, RoutedP2P(self.rank, device=device, wait=self.p2p_wait),
                                   act_spec, TensorSpec((micro_batch_size, seq_length), torch.int64))
        executor.recv_layouts = self._recv_layouts
        executor.compute_delay = self.compute_delay
        self._calls += 1
        self.last_stage_visited = self.stage_visited

        no_sync = config.no_sync_func if config.no_sync_func is not None else contextlib.nullcontext
        with (contextlib.nullcontext() if forward_only else no_sync()):
            result = executor.run(self.ops, self._calls, forward_only=forward_only, before_op=self.before_op)
        if not forward_only:
            self.last_trace = executor.trace
        if not forward_only and config.finalize_model_grads_func is not None:
            # DP all-reduce and tied-embedding all-reduce on every rank, visited or not (collectives).
            config.finalize_model_grads_func([model], None, pg_collection=pgc, force_all_reduce=force_all_reduce)
        if not forward_only:
            self._apply_gradient_rule(model)
        self.last_losses = {mb: loss for mb, loss in sorted(result.losses.items())}
        return [handler.loss_data[mb] for mb in sorted(handler.loss_data)]

    # ------------------------------------------------------------------ handshake
    def _peek_first_batch(self, data_iterator: Any) -> tuple[Any, Any]:
        """Home ranks: the first item of the iteration (put back in front), for the handshake."""
        if not any(op.kind == LOAD for op in self.ops):
            return data_iterator, None
        if data_iterator is None:
            raise RuntimeError(f"rank {self.rank} ({self._describe(self.rank)}) is a home rank of the plan (it loads "
                               f"the data) but got data_iterator=None; pass the data iterator on the first stage")
        first = next(data_iterator)
        return itertools.chain([first], data_iterator), first

    def _agree(self, model: Any, act_spec: TensorSpec, first_batch: Any, device: torch.device) -> None:
        """The boundary handshake, once per plan (and again if the activation or batch spec changes)."""
        act_key = boundary.single(act_spec).key()
        batch_key = boundary.flatten(first_batch)[1].key() if first_batch is not None else None
        if self._agreed is not None:  # once per plan: every rank must take the same collective decision
            if self._agreed != (act_key, batch_key):
                what = "activation spec (seq_length / micro_batch_size / config)" if self._agreed[0] != act_key \
                    else "data batch structure or shapes"
                raise ValueError(f"routed schedule: {self._describe(self.rank)}: the {what} changed since the plan's "
                                 f"boundary handshake; keep it fixed per plan, or call set_plan() on every rank to "
                                 f"agree again")
            return
        problem = None
        layout = model_layout(model)
        if layout is not None and layout != self.plan.layout:
            problem = (f"the model is {_layout_name(layout)} but the plan has layout={self.plan.layout!r}; build the "
                       f"plan with layout={layout!r} (RoutedForwardBackward.for_model reads it from the model)")
        sends: boundary.Declarations = {}
        expects: boundary.Declarations = {}
        for op in self.ops:
            if op.kind in (SEND_ACT, SEND_GRAD):
                sends[(op.peer, ACTIVATION)] = act_key
            elif op.kind in (RECV_ACT, RECV_GRAD):
                expects[(op.peer, ACTIVATION)] = act_key
            elif op.kind == SEND_BATCH:
                sends[(op.peer, BATCH)] = batch_key
            elif op.kind == RECV_BATCH:
                expects[(op.peer, BATCH)] = None  # the home's batch, as it is
        hints = {ACTIVATION: "an activation is [seq_length, micro_batch_size, hidden_size] in config.pipeline_dtype: "
                             "every stage's TransformerConfig and the schedule's seq_length / micro_batch_size must "
                             "agree"}
        self._recv_layouts = boundary.handshake(sends, expects, describe_rank=self._describe, hints=hints,
                                                problem=problem, wait=self.p2p_wait, device=device)
        self._agreed = (act_key, batch_key)

    def _describe(self, rank: int) -> str:
        s, r, t = self.grid.coords(rank)
        return f"stage {s} (rank {rank}, replica {r}, tensor rank {t})"

    # ------------------------------------------------------------------ helpers
    def _pg_collection(self) -> ProcessGroupCollection:
        pgc = ProcessGroupCollection()
        pgc.tp = ps.get_tensor_model_parallel_group()
        pgc.pp = ps.get_pipeline_model_parallel_group()
        # Ring: embedding and head are tied on the home stage itself, no cross-stage embedding group.
        pgc.embd = ps.get_embedding_group(check_initialized=False) if self.plan.layout == "linear" else self._own_group
        pgc.pos_embd = ps.get_position_embedding_group(check_initialized=False)
        pgc.cp = ps.get_context_parallel_group()
        pgc.dp_cp = ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=False)
        return pgc

    def _apply_gradient_rule(self, model) -> None:
        factor = gradient_factor(self.gradient_rule, self.plan.num_microbatches, self.stage_visits[self.stage])
        if factor == 1.0:
            return
        if hasattr(model, "scale_gradients"):  # megatron DDP: grads live in its main_grad buffers
            model.scale_gradients(factor)
        else:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)


# ---------------------------------------------------------------------- plan checks
def check_every_stage_visited(plan: RoutePlan, allow_unvisited: bool = False) -> None:
    """Refuse a plan that leaves a stage unvisited every iteration (it would never be trained)."""
    visits = plan.stage_visits()
    never = [s for s, v in enumerate(visits) if v == 0]
    if not never:
        return
    msg = (f"the plan leaves stage(s) {never} unvisited by every microbatch (visits per stage: {visits}), so they are "
           f"never trained; with layout={plan.layout!r} and {len(visits)} stages use a longer path (a smaller "
           f"skip_ratio or a larger path_length)")
    if not allow_unvisited:
        raise ValueError(f"routed schedule: {msg}, or pass allow_unvisited=True if that is intended")
    warnings.warn(f"routed schedule: {msg}", stacklevel=3)


def warn_if_skips_nothing(plan: RoutePlan) -> bool:
    """Warn (and return True) when a skip plan visits every stage on every route: it is the full plan."""
    stages = len(plan.stage_nodes)
    if all(len(r.hops) + 1 == stages for r in plan.routes):
        fixed = "the home stage and the last stage" if plan.layout == "linear" else "the home stage"
        warnings.warn(f"routing=skip: every route visits all {stages} stages, so this skip plan equals the full plan "
                      f"(layout={plan.layout!r} always keeps {fixed}; a skip needs more stages or a larger "
                      f"skip_ratio)", stacklevel=3)
        return True
    return False


def model_layout(model: Any) -> str | None:
    """``linear`` for megatron's GPTModel, ``ring`` for :class:`RingGPTStage`, None if unknown."""
    from megatron.core.models.gpt import GPTModel

    from .stages import RingGPTStage

    module = _unwrap(model)
    if isinstance(module, RingGPTStage):
        return "ring"
    if isinstance(module, GPTModel):
        return "linear"
    return None


def _unwrap(model: Any) -> Any:
    if isinstance(model, list):
        model = model[0]
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _layout_name(layout: str) -> str:
    return ("megatron's GPTModel (linear layout: embedding on the first stage, output layer and loss on the last)"
            if layout == "linear" else "a RingGPTStage (ring layout: embedding and head on the home stage)")


def _use_main_grads(optimizer: torch.optim.Optimizer) -> None:
    """A torch optimizer over megatron DDP parameters: point ``.grad`` at DDP's ``main_grad``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            main = getattr(p, "main_grad", None)
            if p.grad is None and main is not None:
                if main.dtype != p.dtype:
                    raise TypeError(f"guard_optimizer: DDP's main_grad is {main.dtype} but the parameter is "
                                    f"{p.dtype}; a plain torch optimizer cannot step it, use megatron's optimizer "
                                    f"(get_megatron_optimizer) or DistributedDataParallelConfig(grad_reduce_in_fp32="
                                    f"False)")
                p.grad = main


def _activation_shape(config, seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int],
                      pgc: ProcessGroupCollection) -> tuple[int, ...]:
    if getattr(config, "hidden_size", None) is None:
        raise ValueError(f"routed schedule: the model's config ({type(config).__name__}) has no hidden_size; a "
                         f"pipeline activation is [seq_length, micro_batch_size, hidden_size] (megatron's "
                         f"get_tensor_shapes): give the model a TransformerConfig or set config.hidden_size")
    return mcore_schedules.get_tensor_shapes(seq_length=seq_length, micro_batch_size=micro_batch_size,
                                             decoder_seq_length=decoder_seq_length, config=config,
                                             tp_group=pgc.tp, cp_group=pgc.cp)[0]


def _refuse_unsupported(config, model) -> None:
    # A ModelParallelConfig (not a TransformerConfig) lacks the transformer fields: read them as stock's defaults.
    if getattr(config, "calculate_per_token_loss", False):
        raise ValueError("routed schedule: calculate_per_token_loss is not supported (megatron broadcasts the token "
                         "count from its last pipeline stage, which is not where a routed loss is computed)")
    ddp_config = getattr(model, "ddp_config", None)
    if ddp_config is not None and (ddp_config.overlap_grad_reduce or ddp_config.use_distributed_optimizer):
        raise ValueError("routed schedule: DDP overlap_grad_reduce / use_distributed_optimizer are not supported "
                         "(a routed rank's last backward does not touch every parameter); set them to False")


_NOT_A_TOKEN_TENSOR = torch.empty(0, dtype=torch.int64)  # the executor's marker input of a first part


class _MegatronStageHandler:
    """The executor's model callbacks, implemented with megatron's forward_step / backward_step."""

    def __init__(self, forward_step_func: Callable, data_iterator: Optional[Iterator], model, config,
                 num_microbatches: int, cp_size: int, collect_non_loss_data: bool, first_val_step: Optional[bool],
                 forward_only: bool):
        self.forward_step_func = forward_step_func
        self.data_iterator = data_iterator
        self.model = model
        self.module = get_attr_wrapped_model(model, "set_input_tensor", return_model_obj=True)
        self.config = config
        self.model_type = get_model_type(model)
        self.num_microbatches = num_microbatches
        self.cp_size = cp_size
        self.collect_non_loss_data = collect_non_loss_data
        self.first_val_step = first_val_step
        self.forward_only = forward_only
        self.batches: dict[int, Any] = {}  # mb -> the data batch (loaded here or received from its home)
        self.loss_data: dict[int, Any] = {}
        self.total_num_tokens = torch.zeros([], dtype=torch.int)
        self._first_forward = True

    # -------------------------------------------------------------- data
    def load(self, mb: int) -> tuple[torch.Tensor, None]:
        self.batches[mb] = next(self.data_iterator)
        return _NOT_A_TOKEN_TENSOR, None  # forward_step_func reads the tokens from the batch itself

    def batch_tensors(self, mb: int) -> list[torch.Tensor]:
        tensors, _ = boundary.flatten(self.batches[mb])
        return tensors

    def receive_batch(self, mb: int, tensors: list[torch.Tensor], layout: boundary.BoundaryLayout) -> None:
        self.batches[mb] = boundary.unflatten(tensors, layout)

    # -------------------------------------------------------------- compute
    def forward(self, part: str, mb: int, inputs: torch.Tensor) -> torch.Tensor:
        if hasattr(self.module, "set_routed_part"):
            self.module.set_routed_part(part)
        input_tensor = None if part in (PART_EMBED, PART_FIRST) else inputs
        is_loss = part in LOSS_PARTS
        store: list = []
        first = mcore_schedules.check_first_val_step(self.first_val_step, self.forward_only, self._first_forward)
        self._first_forward = False
        output, num_tokens = mcore_schedules.forward_step(
            self.forward_step_func, iter([self.batches[mb]]), self.model, self.num_microbatches, input_tensor,
            store, self.config, self.cp_size, collect_non_loss_data=self.collect_non_loss_data,
            is_first_microbatch=first, current_microbatch=mb, is_last_stage=is_loss)
        if is_loss:
            self.total_num_tokens += num_tokens
            if store:
                self.loss_data[mb] = store[0]
        return output

    def loss(self, part: str, mb: int, output: torch.Tensor, labels: Any) -> torch.Tensor:
        # forward_step already applied the user's loss_func and megatron's 1/num_microbatches scaling.
        return output

    def backward_loss(self, part: str, mb: int, loss: torch.Tensor) -> None:
        mcore_schedules.backward_step(None, loss, None, self.model_type, self.config)

    def backward(self, part: str, mb: int, output: torch.Tensor, grad: torch.Tensor) -> None:
        if getattr(self.config, "deallocate_pipeline_outputs", False):  # its data was sent; custom_backward expects it
            mcore_schedules.deallocate_output_tensor(output, True)
        mcore_schedules.backward_step(None, output, grad, self.model_type, self.config)
