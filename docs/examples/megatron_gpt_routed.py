"""An ordinary megatron-core GPT training loop, with SkipPipe routing switched on.

The loop is the usual megatron-core one (parallel_state, GPTModel, DDP, megatron optimizer,
``forward_backward_func``). Routing changes the 7 lines marked ``# ROUTED``: build a RoutePlan on
megatron's rank grid and use :class:`RoutedForwardBackward` in place of
``get_forward_backward_func()``. Delete them (and keep the stock line) to get plain megatron.

Run (CPU, 2 or 4 ranks; pipeline size = world size)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 docs/examples/megatron_gpt_routed.py --plan skip
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 docs/examples/megatron_gpt_routed.py --plan stock

``apply_cpu_patches`` is only needed on CPU (it does nothing when CUDA is available).
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from integration.backends.megatron.cpu_compat import apply_cpu_patches
from integration.backends.megatron.layout import MegatronGrid  # ROUTED
from integration.backends.megatron.schedule import RoutedForwardBackward  # ROUTED
from integration.plan import build_plan  # ROUTED

VOCAB, SEQ, MICRO_BATCH, MICROBATCHES = 128, 16, 2, 4
DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_provider(pp: int) -> GPTModel:
    config = TransformerConfig(
        num_layers=2 * pp, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(), share_embeddings_and_output_weights=True,
                    position_embedding_type="rope")


def data_iterator(step: int, dp_rank: int):
    """This data-parallel rank's microbatches of ``step`` (a copy task: predict the next token)."""
    for i in range(MICROBATCHES):
        g = torch.Generator().manual_seed(7919 * step + 131 * dp_rank + i)
        seq = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
        yield {"tokens": seq[:, :-1], "labels": seq[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ),
               "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ), "attention_mask": None}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().view(-1)
    loss = torch.sum(losses * loss_mask.view(-1)) / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # megatron divides the returned loss in place


def forward_step_func(data_iterator, model):
    batch = next(data_iterator)
    to = {k: (v.to(DEVICE) if v is not None else None) for k, v in batch.items()}  # None: not held by this stage
    output = model(to["tokens"], to["position_ids"], to["attention_mask"], labels=to["labels"])
    return output, partial(loss_func, to["loss_mask"])


def train(steps: int = 3, plan_kind: str = "full", routed: bool = True) -> list[float]:
    """Train ``steps`` iterations; returns the mean loss per step (every rank)."""
    apply_cpu_patches()
    pp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234 + parallel_state.get_pipeline_model_parallel_rank())
    gpt = model_provider(pp).to(DEVICE)
    config = gpt.config
    model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                    module=gpt)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0),
                                       [model])
    forward_backward_func = get_forward_backward_func()
    if routed:
        grid = MegatronGrid.from_parallel_state()  # ROUTED
        plan = build_plan(plan_kind, grid.stage_nodes, MICROBATCHES, layout="linear", skip_ratio=0.25)  # ROUTED
        forward_backward_func = RoutedForwardBackward(plan, num_microbatches=MICROBATCHES, grid=grid)  # ROUTED
        forward_backward_func.guard_optimizer(optimizer)  # ROUTED: unvisited stages must not move
    history = []
    for step in range(steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward_func(forward_step_func=forward_step_func,
                                       data_iterator=data_iterator(step, parallel_state.get_data_parallel_rank()),
                                       model=[model], num_microbatches=MICROBATCHES, seq_length=SEQ,
                                       micro_batch_size=MICRO_BATCH, forward_only=False)
        optimizer.step()
        stats = torch.tensor([sum(float(x["lm loss"]) for x in losses), float(len(losses))])
        dist.all_reduce(stats)
        history.append(float(stats[0] / stats[1]))
        if dist.get_rank() == 0:
            print(f"step {step}: loss {history[-1]:.4f}", flush=True)
    parallel_state.destroy_model_parallel()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="skip", choices=["stock", "full", "skip"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    train(args.steps, args.plan if args.plan != "stock" else "full", routed=args.plan != "stock")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
