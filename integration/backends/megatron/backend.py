"""The main job's megatron-core backend: ``build_megatron_backend(cfg, plan, model_cfg, rank, world_size)``.

Same contract as the DeepSpeed backend (:class:`integration.backend.TrainingBackend`): the main job
builds the plan, the data and the logs; this backend owns megatron's groups, the stage model
(:mod:`.stages`), megatron DDP, megatron's Adam + ``OptimizerParamScheduler`` (linear warmup, cosine
decay to ``train.min_lr`` over ``train.steps``) and runs each iteration through
:class:`RoutedForwardBackward`.

Plan node ids: with ``parallel.tensor = 1`` megatron's default rank order puts (stage s, replica r)
on rank ``s*D + r``, i.e. ``grid_stage_nodes(S, D)``. With TP > 1 a plan node is a TP group whose
id is its tensor-rank-0 rank; a plan built on ``grid_stage_nodes(S, D)`` is relabelled onto that
grid (same routes), any other layout must already use megatron's grid or is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ...backend import BatchSource, StepResult, TrainingBackend
from ...plan.builders import full_pipeline
from ...plan.routeplan import Hop, MicrobatchRoute, RoutePlan, grid_stage_nodes
from ...runtime.program import Program, plan_of
from .build import (build_model, build_optimizer, check_parallel_layout, gpt_forward_step, initialize_megatron)
from .cpu_compat import check_megatron_version
from .layout import MegatronGrid, check_plan_fits
from .schedule import RoutedForwardBackward
from .stages import gpt_config


def relabel_plan(plan: RoutePlan, stage_nodes: list[list[int]]) -> RoutePlan:
    """The same routes on another node layout (replica indices kept, node ids replaced)."""
    routes = [MicrobatchRoute(r.mb, r.home_replica, stage_nodes[0][r.home_replica],
                              tuple(Hop(h.stage, h.replica, stage_nodes[h.stage][h.replica]) for h in r.hops))
              for r in plan.routes]
    old_to_new = {plan.stage_nodes[s][i]: stage_nodes[s][i] for s in range(len(stage_nodes))
                  for i in range(len(stage_nodes[s]))}
    node_order = None if plan.node_order is None else {old_to_new[n]: v for n, v in plan.node_order.items()}
    return dataclasses.replace(plan, stage_nodes=[list(s) for s in stage_nodes], routes=routes, node_order=node_order)


class MegatronBackend(TrainingBackend):
    """:class:`integration.backend.TrainingBackend` on megatron-core."""

    def __init__(self, cfg: Any, plan: RoutePlan | Program, model_cfg: Any, rank: int, world_size: int):
        """``plan``: the main job hands its preflight's compiled :class:`Program` (a plan is compiled here)."""
        self.cfg = cfg
        self.rank = rank
        tensor, stages = int(cfg.parallel.get("tensor", 1) or 1), int(cfg.parallel.stages)
        m = cfg.model
        self.replicas = check_parallel_layout(world_size=world_size, tensor=tensor, stages=stages,
                                              n_heads=int(m.n_heads), replicas=int(cfg.parallel.replicas))
        if int(model_cfg.vocab_size) % tensor:
            raise ValueError(f"parallel.tensor={tensor} does not divide the vocabulary size {model_cfg.vocab_size} "
                             f"(megatron splits the vocabulary across tensor-parallel ranks)")
        self.layout = str(m.layout)
        self.micro_batch_size = int(cfg.train.micro_batch_size)
        self.seq_len = int(m.seq_len)
        self.microbatches = int(cfg.train.microbatches)
        if plan_of(plan).num_stages != stages:
            raise ValueError(f"routing plan: it has {plan_of(plan).num_stages} stages but parallel.stages is {stages}")

        self.tensor, self.stages = tensor, stages
        self.model_cfg = model_cfg
        self._build(plan)

    def _build(self, plan: RoutePlan | Program) -> None:
        """Groups, grid, model (DDP), optimizer, LR schedule and the routed schedule, in an order
        every rank follows (group creation is collective). A fault-tolerant backend calls it again
        on each new process-group generation."""
        cfg, m, train, model_cfg = self.cfg, self.cfg.model, self.cfg.train, self.model_cfg
        tensor, stages = self.tensor, self.stages
        initialize_megatron(tensor, stages, int(train.seed))
        self.grid = MegatronGrid.from_parallel_state()
        if tensor > 1 and plan_of(plan).stage_nodes == grid_stage_nodes(stages, self.replicas):
            plan = relabel_plan(plan_of(plan), self.grid.stage_nodes)
        check_plan_fits(plan_of(plan), self.grid, self.microbatches)  # before any model is built
        layers = int(m.layers_per_stage)
        num_layers = layers * (stages if self.layout == "linear" else stages - 1)
        self.config = gpt_config(num_layers=num_layers, hidden_size=int(m.d_model), num_attention_heads=int(m.n_heads),
                                 ffn_hidden_size=int(model_cfg.ffn_hidden) if getattr(model_cfg, "ffn_hidden", None)
                                 else None, tensor_parallel=tensor, pipeline_parallel=stages,
                                 init_std=float(getattr(model_cfg, "init_std", 0.02)),
                                 layernorm_epsilon=float(getattr(model_cfg, "norm_eps", 1e-5)))
        self.model = build_model(self.layout, self.config, vocab_size=int(model_cfg.vocab_size), seq_len=self.seq_len,
                                 layers_per_stage=layers, seed=int(train.seed),
                                 tie_embeddings=bool(m.get("tie_embeddings", True)))
        betas = tuple(float(b) for b in train.betas)
        self.optimizer = build_optimizer(self.model, lr=float(train.lr), weight_decay=float(train.weight_decay),
                                         betas=betas, clip_grad=self._optimizer_clip(),
                                         min_lr=float(train.min_lr))
        steps = int(train.steps)
        warmup = min(int(train.warmup_steps), max(steps - 1, 0))
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else float(train.lr), max_lr=float(train.lr),
            min_lr=float(train.min_lr), lr_warmup_steps=warmup, lr_decay_steps=max(steps, warmup + 1),
            lr_decay_style="cosine", start_wd=float(train.weight_decay), end_wd=float(train.weight_decay),
            wd_incr_steps=max(steps, 1), wd_incr_style="constant")
        routing = cfg.routing
        max_inflight = routing.get("max_inflight", None)
        self.fb = RoutedForwardBackward(plan, num_microbatches=self.microbatches,
                                        gradient_rule=str(routing.get("gradient_rule", "visited")),
                                        max_inflight=int(max_inflight) if max_inflight else None, grid=self.grid)
        self.fb.guard_optimizer(self.optimizer)
        self.plan, self.program = self.fb.plan, self.fb.program
        self._eval_fb: dict[int, RoutedForwardBackward] = {}
        self.stage, self.replica, self.tensor_rank = self.grid.coords(self.rank)
        self.is_home = self.stage == 0

    def _optimizer_clip(self) -> float:
        """Gradient clipping inside megatron's optimizer (its norm is a collective over the model-parallel group)."""
        return float(self.cfg.train.grad_clip or 0.0)

    # ------------------------------------------------------------------ state and checkpoints
    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch Adam inside megatron's optimizer: state dict, param groups."""
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        if len(opts) != 1:
            raise RuntimeError(f"expected one optimizer inside megatron's, megatron built {len(opts)}")
        return opts[0].optimizer

    def state_bundle(self) -> dict:
        """The stage's whole training state, keyed as Megatron-LM's checkpoints key it: ``model``,
        ``optimizer`` (the torch optimizer's), ``opt_param_scheduler``."""
        from ...recovery.state import stage_state
        return {"model": stage_state(self.model.module), "optimizer": self.torch_optimizer.state_dict(),
                "opt_param_scheduler": self.scheduler.state_dict()}

    def load_state_bundle(self, bundle: dict, optimizer: bool = True, scheduler: bool = True) -> None:
        """Inverse of :meth:`state_bundle` (into this backend's current objects)."""
        from ...recovery.state import load_stage_state
        load_stage_state(self.model.module, bundle["model"])
        if optimizer:
            self.torch_optimizer.load_state_dict(bundle["optimizer"])
        if scheduler:
            # megatron's load_state_dict *adds* the saved step count (it expects a fresh scheduler):
            # a rank rolling back would otherwise jump ahead in the LR schedule.
            self.scheduler.num_steps = 0
            self.scheduler.load_state_dict(bundle["opt_param_scheduler"])

    def checkpoint_file(self, directory: str, tag: str) -> Path:
        """Megatron-LM's per-rank file: ``<directory>/<tag>/mp_rank_TT_PPP/model_optim_rng.pt``."""
        return Path(directory) / tag / f"mp_rank_{self.tensor_rank:02d}_{self.stage:03d}" / "model_optim_rng.pt"

    def save_checkpoint(self, directory: str, tag: str, iteration: int, extra: dict | None = None) -> None:
        """Megatron-LM's per-rank ``torch`` checkpoint (``model``, ``optimizer``, ``opt_param_scheduler``,
        ``iteration``; ``extra`` entries added); replicas are equal after every step, so data-parallel
        rank 0 writes, as Megatron-LM does. No collective."""
        if self.replica != 0:
            return
        path = self.checkpoint_file(directory, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"checkpoint_version": 3.0, "iteration": int(iteration), **self.state_bundle(), **(extra or {})},
                   tmp)
        tmp.replace(path)  # a save cut short never looks complete

    def load_checkpoint(self, directory: str, tag: str, optimizer: bool = True,
                        scheduler: bool = True) -> dict | None:
        """Restore :meth:`save_checkpoint`'s file (replica 0's) into this rank; returns its entries
        other than the state (``iteration``, the extras), None when there is no such file."""
        path = self.checkpoint_file(directory, tag)
        if not path.is_file():
            return None
        state = torch.load(path, weights_only=False)
        self.load_state_bundle(state, optimizer=optimizer, scheduler=scheduler)
        return {k: v for k, v in state.items() if k not in ("model", "optimizer", "opt_param_scheduler")}

    # ------------------------------------------------------------------ contract
    def set_plan(self, plan: RoutePlan | Program) -> None:
        """Run ``plan`` from the next step on (checked against the grid; a Program runs as compiled)."""
        if self.tensor > 1 and plan_of(plan).stage_nodes == grid_stage_nodes(self.stages, self.replicas):
            plan = relabel_plan(plan_of(plan), self.grid.stage_nodes)
        self.fb.set_plan(plan, self.microbatches)
        self.plan, self.program = self.fb.plan, self.fb.program

    def _batches(self, batch_source: BatchSource, step: int, count: int):
        if not self.is_home:
            return None
        return iter([dict(zip(("tokens", "labels"), batch_source(step, self.replica, i))) for i in range(count)])

    def _mean_loss(self, outputs: list) -> float:
        # Loss ranks report their microbatches; TP peers hold copies, so count tensor rank 0 only.
        total = sum(float(o["lm loss"]) for o in outputs) if self.tensor_rank == 0 else 0.0
        count = len(outputs) if self.tensor_rank == 0 else 0
        stats = torch.tensor([total, float(count)], dtype=torch.float64)
        self._all_reduce(stats, "loss all-reduce")
        return float(stats[0] / stats[1])

    def _all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        """Sum over the world (a fault-tolerant backend makes this failure-aware)."""
        dist.all_reduce(tensor)

    def _configure_fb(self, fb: RoutedForwardBackward) -> None:
        """Hook for subclasses: set up a routed schedule built after construction (evaluation)."""

    def train_step(self, step: int, batch_source: BatchSource) -> StepResult:
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.fb(forward_step_func=gpt_forward_step, data_iterator=self._batches(batch_source, step,
                                                                                           self.microbatches),
                          model=[self.model], num_microbatches=self.microbatches, seq_length=self.seq_len,
                          micro_batch_size=self.micro_batch_size)
        self.optimizer.step()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step(increment=1)
        return StepResult(loss=self._mean_loss(outputs), lr=lr)

    @torch.no_grad()
    def validation_loss(self, batch_source: BatchSource, microbatches_per_home: int) -> float:
        if microbatches_per_home not in self._eval_fb:
            plan = full_pipeline(self.grid.stage_nodes, microbatches_per_home, self.layout)
            self._eval_fb[microbatches_per_home] = RoutedForwardBackward(plan, num_microbatches=microbatches_per_home,
                                                                         grid=self.grid)
            self._configure_fb(self._eval_fb[microbatches_per_home])
        fb = self._eval_fb[microbatches_per_home]
        self.model.eval()
        try:
            outputs = fb(forward_step_func=gpt_forward_step,
                         data_iterator=self._batches(batch_source, 0, microbatches_per_home), model=[self.model],
                         num_microbatches=microbatches_per_home, seq_length=self.seq_len,
                         micro_batch_size=self.micro_batch_size, forward_only=True)
        finally:
            self.model.train()
        return self._mean_loss(outputs)


def build_megatron_backend(cfg: Any, plan: RoutePlan | Program, model_cfg: Any, rank: int,
                           world_size: int) -> MegatronBackend:
    """The ``backend=megatron`` entry point of the main job (``integration/train.py``).

    Every check (megatron-core version, TP vs heads, world layout, plan vs rank grid) runs before
    any model is built or any rank computes. ``torch.distributed`` must already be initialised.
    """
    check_megatron_version()
    return MegatronBackend(cfg, plan, model_cfg, rank, world_size)
