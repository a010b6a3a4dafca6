"""Set up a megatron-core job the way its own training loops do: groups, model, DDP, optimizer.

Shared by the main job's backend, the example, the tests and the benchmark, so they all build the
same thing: ``initialize_model_parallel`` (default rank order), a stage model from
:mod:`integration.backends.megatron.stages` wrapped in megatron's DDP (plain, no distributed optimizer),
megatron's optimizer (Adam, fp32), and a standard GPT ``forward_step_func``.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig

from .cpu_compat import apply_cpu_patches, check_megatron_version
from .stages import build_stage_model


def check_parallel_layout(*, world_size: int, tensor: int, stages: int, n_heads: int, replicas: int | None = None
                          ) -> int:
    """Refuse a parallel layout megatron cannot build, before any group exists; returns DP size."""
    if tensor < 1 or stages < 1:
        raise ValueError(f"parallel.tensor ({tensor}) and parallel.stages ({stages}) must be >= 1")
    if n_heads % tensor:
        raise ValueError(f"parallel.tensor={tensor} does not divide model.n_heads={n_heads}; megatron splits attention "
                         f"heads across tensor-parallel ranks, so choose a tensor size that divides the head count")
    if world_size % (tensor * stages):
        raise ValueError(f"world size {world_size} is not a multiple of parallel.tensor x parallel.stages = "
                         f"{tensor} x {stages}")
    dp = world_size // (tensor * stages)
    if replicas is not None and replicas != dp:
        raise ValueError(f"parallel.replicas={replicas} but world size {world_size} / (tensor {tensor} x stages "
                         f"{stages}) gives {dp} data-parallel replicas")
    return dp


def initialize_megatron(tensor: int, stages: int, seed: int) -> None:
    """megatron's model-parallel init on the already initialised default process group (gloo or NCCL).

    Re-initialises (destroying the previous groups) when called again in one process.
    """
    check_megatron_version()
    apply_cpu_patches()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=stages)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def build_model(layout: str, config: TransformerConfig, *, vocab_size: int, seq_len: int, layers_per_stage: int,
                seed: int, tie_embeddings: bool = True, ddp: bool = True) -> torch.nn.Module:
    """This rank's stage model, on the current device, wrapped in megatron DDP (unless ``ddp=False``)."""
    stage = ps.get_pipeline_model_parallel_rank()
    module = build_stage_model(layout, config, stage=stage, num_stages=ps.get_pipeline_model_parallel_world_size(),
                               vocab_size=vocab_size, seq_len=seq_len, layers_per_stage=layers_per_stage, seed=seed,
                               tie_embeddings=tie_embeddings)
    if torch.cuda.is_available():
        module = module.cuda(torch.cuda.current_device())
    if not ddp:
        return module
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, clip_grad: float = 0.0,
                    min_lr: float | None = None):
    """megatron's Adam (fp32, not distributed) over ``model``; ``min_lr`` for OptimizerParamScheduler."""
    cfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=betas[0],
                          adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad, bf16=False, fp16=False,
                          use_distributed_optimizer=False)
    return get_megatron_optimizer(cfg, [model])


def gpt_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked mean token loss; the reported value is a clone (megatron divides the loss in place)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask) / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def gpt_forward_step(data_iterator, model):
    """A standard megatron GPT ``forward_step_func`` (the shape megatron's examples use).

    Fields a stage does not hold are None (as megatron's ``get_batch`` returns on middle stages);
    a stage without a data iterator (a middle stage under megatron's stock 1F1B) reads nothing.
    """
    batch = next(data_iterator) if data_iterator is not None else {"tokens": None, "labels": None}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def move(t):
        return t.to(device) if t is not None else None

    tokens, labels, loss_mask = move(batch["tokens"]), move(batch["labels"]), move(batch.get("loss_mask"))
    position_ids = move(batch.get("position_ids"))
    if position_ids is None and tokens is not None:
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, batch.get("attention_mask"), labels=labels)
    if loss_mask is None and labels is not None:
        loss_mask = torch.ones(labels.shape, dtype=torch.float32, device=device)
    return output, partial(gpt_loss_func, loss_mask)
