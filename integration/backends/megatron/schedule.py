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

Data contract (same keys on every rank, like megatron's ``get_batch``): a home rank pulls one
batch dict per microbatch from ``data_iterator`` (``tokens`` and ``labels`` required, as megatron's
GPT datasets yield them) and hands ``forward_step_func`` a one-item iterator over it for each of
that microbatch's parts. Other ranks never read ``data_iterator``; their ``forward_step_func`` gets
``{"tokens": None, "labels": ..., "loss_mask": ..., "position_ids": None, "attention_mask": None}``
where labels (received from the home) and an all-ones loss_mask are present only on the loss stage
of the linear layout. ``attention_mask`` must be None (causal) on every rank.

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
from typing import Any, Callable, Iterator, Optional

import torch

from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import schedules as mcore_schedules
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_attr_wrapped_model, get_model_config, get_model_type

from ...plan.routeplan import RoutePlan
from ...plan.rules import Rules
from ...runtime.executor import ProgramExecutor
from ...runtime.p2p import RoutedP2P, TensorSpec
from ...runtime.program import LOSS_PARTS, PART_EMBED, PART_FIRST, PART_HEAD, PART_LAST, Program, as_program, plan_of
from ...runtime.gradient import check_gradient_rule, gradient_factor, stage_moves
from .cpu_compat import apply_cpu_patches, check_megatron_version
from .layout import MegatronGrid, check_plan_fits


class RoutedForwardBackward:
    """Drop-in for megatron's ``forward_backward_func`` that follows ``plan``'s routes.

    Construct it on every rank (it all-gathers the rank grid) after
    ``parallel_state.initialize_model_parallel``; the plan is validated against the grid here,
    before any rank computes.
    """

    def __init__(self, plan: RoutePlan | Program, *, num_microbatches: int | None = None,
                 gradient_rule: str = "visited",
                 max_inflight: int | None = None, rules: Rules | None = None, grid: MegatronGrid | None = None,
                 p2p_wait: Callable[[object, str], None] | None = None,
                 before_op: Callable[[Any], None] | None = None):
        check_megatron_version()
        apply_cpu_patches()
        check_gradient_rule(gradient_rule)
        self.grid = grid or MegatronGrid.from_parallel_state()
        self.rank = torch.distributed.get_rank()
        self.gradient_rule = gradient_rule
        self.max_inflight = max_inflight
        self.rules = rules
        self.stage = self.grid.coords(self.rank)[0]
        self.node = self.grid.node_of(self.rank)
        self._calls = 0
        # Fault tolerance plugs in here: a failure-aware wait for every p2p transfer and a hook
        # ahead of every op (failure injection). Both default to plain behaviour.
        self.p2p_wait = p2p_wait
        self.before_op = before_op
        # Ring: the tie is local to the home stage; megatron reads embd=None as "use the default
        # first+last-stage group", so a one-rank group switches the cross-stage all-reduce off.
        self._own_group, _ = torch.distributed.new_subgroups(group_size=1)
        self.last_losses: dict[int, torch.Tensor] = {}
        self.last_stage_visited = True
        self.set_plan(plan, num_microbatches)

    # ------------------------------------------------------------------ plan
    def set_plan(self, plan: RoutePlan | Program, num_microbatches: int | None = None) -> None:
        """Validate ``plan`` against the megatron grid and compile this rank's program (a :class:`Program`,
        compiled already, e.g. by the main job's preflight, is run as given)."""
        given, plan = plan, plan_of(plan)
        m = num_microbatches if num_microbatches is not None else len(plan.routes_from(plan.stage_nodes[0][0]))
        check_plan_fits(plan, self.grid, m, self.rules)
        program = as_program(given, self.max_inflight)
        self.plan = plan
        self.num_microbatches = m
        self.program: Program = program
        self.ops = self.grid.ops_for_rank(self.program.for_rank(self.node), self.rank)
        self.stage_visits = self.program.stage_visits

    @property
    def stage_visited(self) -> bool:
        """Whether any microbatch of the plan visits this rank's stage."""
        return stage_moves(self.stage_visits[self.stage])

    def guard_optimizer(self, optimizer) -> None:
        """Make ``optimizer`` (a megatron optimizer) skip its update on stages no microbatch visited.

        The megatron step still runs (grad-norm collectives, counters); only the inner torch
        optimizer's parameter/state update is skipped, so Adam moments and weight decay do not
        move an unvisited stage.
        """
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner = opt.optimizer
            if getattr(inner, "_routed_guard", False):
                continue
            original = inner.step

            def step(*args, _original=original, **kwargs):
                if not self.last_stage_visited:
                    return None
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
        act_shape = mcore_schedules.get_tensor_shapes(seq_length=seq_length, micro_batch_size=micro_batch_size,
                                                      decoder_seq_length=decoder_seq_length, config=config,
                                                      tp_group=pgc.tp, cp_group=pgc.cp)[0]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        handler = _MegatronStageHandler(forward_step_func, data_iterator, model, config, num_microbatches,
                                        pgc.cp.size(), collect_non_loss_data, first_val_step, forward_only,
                                        (micro_batch_size, seq_length), device)
        executor = ProgramExecutor(self.rank, handler, RoutedP2P(self.rank, device=device, wait=self.p2p_wait),
                                   TensorSpec(tuple(act_shape), config.pipeline_dtype),
                                   TensorSpec((micro_batch_size, seq_length), torch.int64))
        handler.executor = executor
        self._calls += 1
        self.last_stage_visited = self.stage_visited

        no_sync = config.no_sync_func if config.no_sync_func is not None else contextlib.nullcontext
        with (contextlib.nullcontext() if forward_only else no_sync()):
            result = executor.run(self.ops, self._calls, forward_only=forward_only, before_op=self.before_op)
        if not forward_only and config.finalize_model_grads_func is not None:
            # DP all-reduce and tied-embedding all-reduce on every rank, visited or not (collectives).
            config.finalize_model_grads_func([model], None, pg_collection=pgc, force_all_reduce=force_all_reduce)
        if not forward_only:
            self._apply_gradient_rule(model)
        self.last_losses = {mb: loss for mb, loss in sorted(result.losses.items())}
        return [handler.loss_data[mb] for mb in sorted(handler.loss_data)]

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


def _refuse_unsupported(config, model) -> None:
    if config.calculate_per_token_loss:
        raise ValueError("routed schedule: calculate_per_token_loss is not supported (megatron broadcasts the token "
                         "count from its last pipeline stage, which is not where a routed loss is computed)")
    ddp_config = getattr(model, "ddp_config", None)
    if ddp_config is not None and (ddp_config.overlap_grad_reduce or ddp_config.use_distributed_optimizer):
        raise ValueError("routed schedule: DDP overlap_grad_reduce / use_distributed_optimizer are not supported "
                         "(a routed rank's last backward does not touch every parameter); set them to False")


class _MegatronStageHandler:
    """The executor's model callbacks, implemented with megatron's forward_step / backward_step."""

    def __init__(self, forward_step_func: Callable, data_iterator: Optional[Iterator], model, config,
                 num_microbatches: int, cp_size: int, collect_non_loss_data: bool, first_val_step: Optional[bool],
                 forward_only: bool, label_shape: tuple[int, int], device: torch.device):
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
        self.label_shape = label_shape
        self.device = device
        self.executor: ProgramExecutor | None = None
        self.batches: dict[int, dict] = {}
        self.loss_data: dict[int, Any] = {}
        self.total_num_tokens = torch.zeros([], dtype=torch.int)
        self._first_forward = True

    def load(self, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data_iterator is None:
            raise RuntimeError(f"rank {torch.distributed.get_rank()} is a home rank of the plan but got "
                               f"data_iterator=None")
        batch = next(self.data_iterator)
        if not isinstance(batch, dict) or "tokens" not in batch or "labels" not in batch:
            raise TypeError("routed schedule: data_iterator must yield dicts with 'tokens' and 'labels' (as megatron's "
                            "GPT datasets do)")
        self.batches[mb] = batch
        return batch["tokens"], batch["labels"]

    def _batch(self, part: str, mb: int) -> dict:
        if mb in self.batches:  # home rank: the real batch, for the embed and (ring) head parts
            return self.batches.pop(mb) if part in (PART_HEAD, PART_FIRST) else self.batches[mb]
        labels = self.executor.labels.get(mb) if part == PART_LAST else None
        loss_mask = torch.ones(labels.shape, dtype=torch.float32, device=labels.device) if labels is not None else None
        return {"tokens": None, "labels": labels, "loss_mask": loss_mask, "position_ids": None, "attention_mask": None}

    def forward(self, part: str, mb: int, inputs: torch.Tensor) -> torch.Tensor:
        if hasattr(self.module, "set_routed_part"):
            self.module.set_routed_part(part)
        input_tensor = None if part in (PART_EMBED, PART_FIRST) else inputs
        is_loss = part in LOSS_PARTS
        store: list = []
        first = mcore_schedules.check_first_val_step(self.first_val_step, self.forward_only, self._first_forward)
        self._first_forward = False
        output, num_tokens = mcore_schedules.forward_step(
            self.forward_step_func, iter([self._batch(part, mb)]), self.model, self.num_microbatches, input_tensor,
            store, self.config, self.cp_size, collect_non_loss_data=self.collect_non_loss_data,
            is_first_microbatch=first, current_microbatch=mb, is_last_stage=is_loss)
        if is_loss:
            self.total_num_tokens += num_tokens
            if store:
                self.loss_data[mb] = store[0]
        return output

    def loss(self, part: str, mb: int, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # forward_step already applied the user's loss_func and megatron's 1/num_microbatches scaling.
        return output

    def backward_loss(self, part: str, mb: int, loss: torch.Tensor) -> None:
        mcore_schedules.backward_step(None, loss, None, self.model_type, self.config)

    def backward(self, part: str, mb: int, output: torch.Tensor, grad: torch.Tensor) -> None:
        if self.config.deallocate_pipeline_outputs:  # its data was sent; megatron's custom_backward expects this
            mcore_schedules.deallocate_output_tensor(output, True)
        mcore_schedules.backward_step(None, output, grad, self.model_type, self.config)
