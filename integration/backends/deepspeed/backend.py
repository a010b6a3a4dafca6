"""The DeepSpeed training backend of the main job: model, optimizer, LR schedule, routed engine."""

from __future__ import annotations

import math
from typing import Any

import torch

from ...backend import BatchSource, StepResult, TrainingBackend
from ...models.llama import BlockStack, DecoderBlock, HomeStage, LlamaConfig, LMHead, TokenEmbedding, lm_loss
from ...plan.builders import full_pipeline
from ...plan.routeplan import RoutePlan
from ...runtime.program import Program, as_program, compile_plan
from ...config import rules_of
from .engine import RoutedPipelineEngine, RoutingSettings
from .module import FactorySpec, initialize_routed, linear_pipeline_module, ring_pipeline_module


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_pipeline_module(model_cfg: LlamaConfig, layout: str, num_stages: int, replicas: int,
                          layers_per_stage: int, seed: int):
    """The PipelineModule for ``layout``; body stage s always holds blocks (s-1)*k .. s*k-1 (ring)."""
    if layout == "ring":
        home = FactorySpec(HomeStage, model_cfg, seed)
        bodies = [FactorySpec(BlockStack, model_cfg, layers_per_stage, (s - 1) * layers_per_stage, seed)
                  for s in range(1, num_stages)]
        return ring_pipeline_module(home, bodies, replicas, lm_loss)
    n_blocks = layers_per_stage * num_stages
    layers = ([FactorySpec(TokenEmbedding, model_cfg, 0, seed)]
              + [FactorySpec(DecoderBlock, model_cfg, i, seed) for i in range(n_blocks)]
              + [FactorySpec(LMHead, model_cfg, 0, seed)])
    # Balance decoder blocks, so stage 0 and the last stage carry embedding/head on top of k blocks.
    return linear_pipeline_module(layers, num_stages, replicas, lm_loss, partition_method="type:DecoderBlock")


def deepspeed_config(train_cfg: Any, replicas: int) -> dict:
    """DeepSpeed JSON config from the ``train`` group (fp32 on CPU; bf16 is a user override)."""
    return {
        "train_micro_batch_size_per_gpu": int(train_cfg.micro_batch_size),
        "gradient_accumulation_steps": int(train_cfg.microbatches),
        "train_batch_size": int(train_cfg.micro_batch_size) * int(train_cfg.microbatches) * replicas,
        "gradient_clipping": float(train_cfg.grad_clip),
        "steps_per_print": 10 ** 9,  # the main job prints its own progress
        "wall_clock_breakdown": False,
        "bf16": {"enabled": bool(train_cfg.get("bf16", False))},
    }


class DeepSpeedBackend(TrainingBackend):
    """Routed DeepSpeed pipeline training for the main job (see :class:`integration.backend.TrainingBackend`)."""

    # Recovery hook: the engine class :meth:`rebuild_engine` builds (a subclass may swap it).
    engine_class: type[RoutedPipelineEngine] = RoutedPipelineEngine

    def __init__(self, cfg: Any, plan: RoutePlan | Program, model_cfg: LlamaConfig, rank: int, world_size: int,
                 module: Any = None, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None):
        """``plan``: the main job hands its preflight's compiled :class:`Program` (a plan is compiled here).
        ``module``/``optimizer``/``scheduler``: reuse existing ones (recovery) instead of building them."""
        par, tr = cfg.parallel, cfg.train
        self.cfg = cfg
        self.program = as_program(plan, cfg.routing.get("max_inflight"))
        self.plan = self.program.plan
        self._full_programs: dict[int, Program] = {}  # validation: the full pipeline, compiled once per size
        self.rank = rank
        self.module = module if module is not None else build_pipeline_module(
            model_cfg, cfg.model.layout, int(par.stages), int(par.replicas), int(cfg.model.layers_per_stage),
            int(tr.seed))
        self.optimizer = optimizer if optimizer is not None else torch.optim.AdamW(
            self.module.parameters(), lr=float(tr.lr), betas=tuple(float(b) for b in tr.betas),
            weight_decay=float(tr.weight_decay), foreach=False)
        self.scheduler = scheduler if scheduler is not None else torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(int(tr.warmup_steps), int(tr.steps), float(tr.min_lr) / float(tr.lr)))
        mbs, seq = int(tr.micro_batch_size), int(model_cfg.seq_len)
        rules = rules_of(cfg)
        settings = RoutingSettings(plan=self.program, act_shape=(mbs, seq, model_cfg.d_model), label_shape=(mbs, seq),
                                   gradient_rule=str(cfg.routing.gradient_rule), rules=rules,
                                   max_inflight=cfg.routing.get("max_inflight"))
        self.ds_config = deepspeed_config(tr, int(par.replicas))
        self.routing = settings
        self.engine: RoutedPipelineEngine | None = None
        self.rebuild_engine()

    def rebuild_engine(self) -> None:
        """A new engine around the existing module/optimizer/scheduler on the current process group.

        Recovery hook: after a regroup the old engine's groups are dead; the engine's construction
        is collective (parameter broadcast and count), so every rank of the group calls this together.
        """
        import gc

        if self.engine is not None:
            self.engine = None  # drop the old engine (and its references to dead groups) first
            gc.collect()
        self.routing.plan = self.program
        self.engine, *_ = initialize_routed(model=self.module, config=self.ds_config, optimizer=self.optimizer,
                                            lr_scheduler=self.scheduler, routing=self.routing,
                                            engine_class=self.engine_class)

    def set_plan(self, plan: RoutePlan | Program) -> None:
        self.engine.set_plan(plan)
        self.plan, self.program = self.engine.plan, self.engine.program

    def train_step(self, step: int, batch_source: BatchSource) -> StepResult:
        self.engine.set_batch_source(batch_source)
        lr = self.optimizer.param_groups[0]["lr"]
        loss = self.engine.train_batch()
        return StepResult(loss=float(loss), lr=float(lr))

    def validation_loss(self, batch_source: BatchSource, microbatches_per_home: int) -> float:
        full = self._full_programs.get(microbatches_per_home)
        if full is None:
            full = compile_plan(full_pipeline(self.plan.stage_nodes, microbatches_per_home, self.plan.layout),
                                self.routing.max_inflight)
            self._full_programs[microbatches_per_home] = full
        return float(self.engine.evaluate(full, batch_source))


def build_deepspeed_backend(cfg: Any, plan: RoutePlan | Program, model_cfg: LlamaConfig, rank: int,
                            world_size: int) -> DeepSpeedBackend:
    return DeepSpeedBackend(cfg, plan, model_cfg, rank, world_size)
