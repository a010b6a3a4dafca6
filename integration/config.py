"""Checks of the main job's config that run before any process computes, and derived settings."""

from __future__ import annotations

import os
from typing import Any

from .models.llama import LlamaConfig

BACKENDS = ("deepspeed", "megatron")
LAYOUTS = ("ring", "linear")
ROUTING_KINDS = ("full", "skip", "checkfree_plus", "planned", "file")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def expected_world_size(cfg: Any) -> int:
    par = cfg.parallel
    tensor = int(par.get("tensor", 1)) if cfg.backend.name == "megatron" else 1
    return int(par.stages) * int(par.replicas) * tensor


def validate_config(cfg: Any, world_size: int) -> None:
    """Raise :class:`ConfigError` for every config problem we can see without computing anything."""
    problems: list[str] = []
    name = cfg.backend.name
    if name not in BACKENDS:
        problems.append(f"backend.name: {name!r} is not one of {BACKENDS}")
    par = cfg.parallel
    for key in ("stages", "replicas", "tensor"):
        if int(par.get(key, 1)) < 1:
            problems.append(f"parallel.{key}: must be >= 1, got {par.get(key)}")
    if int(par.stages) < 2:
        problems.append(f"parallel.stages: a pipeline needs at least 2 stages, got {par.stages}")
    if name == "deepspeed" and int(par.get("tensor", 1)) != 1:
        problems.append("parallel.tensor: tensor parallelism is available with backend=megatron only; "
                        "set parallel.tensor=1")
    want = expected_world_size(cfg)
    if world_size != want:
        problems.append(f"parallel: world size {world_size} does not fit parallel.stages ({par.stages}) x "
                        f"parallel.replicas ({par.replicas})"
                        + (f" x parallel.tensor ({par.tensor})" if name == "megatron" else "")
                        + f" = {want}; launch {want} ranks (deepspeed --num_gpus {want}) or change parallel.*")
    if cfg.model.layout not in LAYOUTS:
        problems.append(f"model.layout: {cfg.model.layout!r} is not one of {LAYOUTS}")
    if int(cfg.model.layers_per_stage) < 1:
        problems.append(f"model.layers_per_stage: must be >= 1, got {cfg.model.layers_per_stage}")
    kind = cfg.routing.kind
    if kind not in ROUTING_KINDS:
        problems.append(f"routing.kind: {kind!r} is not one of {ROUTING_KINDS}")
    if cfg.routing.gradient_rule not in ("visited", "all"):
        problems.append(f"routing.gradient_rule: {cfg.routing.gradient_rule!r}; use visited or all")
    if kind in ("skip", "planned") and cfg.model.layout == "linear" and int(par.stages) < 3:
        problems.append("routing: skipping with model.layout=linear needs at least 3 stages "
                        "(the last stage holds the loss and is never skipped)")
    tr = cfg.train
    for key in ("steps", "micro_batch_size", "microbatches"):
        if int(tr[key]) < 1:
            problems.append(f"train.{key}: must be >= 1, got {tr[key]}")
    if float(tr.lr) <= 0 or float(tr.min_lr) < 0 or float(tr.min_lr) > float(tr.lr):
        problems.append(f"train.lr / train.min_lr: need 0 <= min_lr <= lr and lr > 0, got {tr.lr} / {tr.min_lr}")
    try:
        model_config(cfg, vocab_size=int(cfg.data.get("vocab_size") or 256)).validate()
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def model_config(cfg: Any, vocab_size: int) -> LlamaConfig:
    m = cfg.model
    return LlamaConfig(vocab_size=int(vocab_size), d_model=int(m.d_model), n_heads=int(m.n_heads),
                       ffn_hidden=None if m.get("ffn_hidden") is None else int(m.ffn_hidden),
                       seq_len=int(m.seq_len), rope_theta=float(m.rope_theta), init_std=float(m.init_std))
