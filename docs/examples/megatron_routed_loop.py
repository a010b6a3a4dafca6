"""megatron-core's simple training loop with SkipPipe routing: the lines marked ``# ROUTED``.

The loop has the shape of megatron-core's own example loop: parallel_state, a GPTModel per
pipeline stage in megatron DDP, a GPT-style DataLoader iterator on every rank (loss masks at
end-of-document tokens, attention reset at document boundaries), the user's
``forward_step_func`` reading every field of the batch, megatron's optimizer, and a
``dist_checkpointing`` save and load at the end. Routing replaces ``get_forward_backward_func()``
by :class:`RoutedForwardBackward` (it reads the layout from the model and builds the plan on
megatron's rank grid) and guards the optimizer (a stage no microbatch visits does not move).
Delete the marked lines to get the stock loop back.

Run (CPU or GPU; pipeline size = world size / TP)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 docs/examples/megatron_routed_loop.py --plan skip
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 docs/examples/megatron_routed_loop.py --plan stock
"""

from __future__ import annotations

import argparse
import os
import tempfile
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from integration.backends.megatron.cpu_compat import apply_cpu_patches
from integration.backends.megatron.schedule import RoutedForwardBackward  # ROUTED

VOCAB, SEQ, MICRO_BATCH, MICROBATCHES, EOD = 100, 32, 2, 4, 0
DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def initialize_distributed(tensor_model_parallel_size: int = 1) -> None:
    """Process group (if the launcher did not make one) and megatron-core's parallel groups."""
    parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    apply_cpu_patches()  # megatron-core on CPU (gloo); does nothing when CUDA is available
    pipeline = dist.get_world_size() // tensor_model_parallel_size
    parallel_state.initialize_model_parallel(tensor_model_parallel_size, pipeline)
    model_parallel_cuda_manual_seed(123)


def model_provider() -> GPTModel:
    """A small GPT, one layer per pipeline stage."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = TransformerConfig(num_layers=pp, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                               pipeline_dtype=torch.float32, pipeline_model_parallel_size=pp,
                               tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                               hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
                               masked_softmax_fusion=False, gradient_accumulation_fusion=False)
    torch.manual_seed(1234 + parallel_state.get_pipeline_model_parallel_rank())
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=SEQ, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage())


class MockDocuments(torch.utils.data.Dataset):
    """Random token windows with end-of-document tokens, in megatron's GPT sample format (its
    masks: ``eod_mask_loss`` and ``reset_attention_mask``)."""

    def __len__(self) -> int:
        return 4096

    def __getitem__(self, idx: int) -> dict:
        g = torch.Generator().manual_seed(idx)
        text = torch.randint(1, VOCAB, (SEQ + 1,), generator=g)
        text[torch.rand(SEQ + 1, generator=g) < 0.1] = EOD
        tokens = text[:-1].contiguous()
        attention_mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
            tokens, EOD, reset_position_ids=False, reset_attention_mask=True, eod_mask_loss=True,
            create_attention_mask=True)
        return {"tokens": tokens, "labels": text[1:].contiguous(), "attention_mask": attention_mask,
                "loss_mask": loss_mask, "position_ids": position_ids}


def get_train_data_iterator():
    """This data-parallel rank's shard of the documents, as a DataLoader iterator."""
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    shard = torch.utils.data.Subset(MockDocuments(), range(rank, len(MockDocuments()), dp))
    return iter(torch.utils.data.DataLoader(shard, batch_size=MICRO_BATCH, shuffle=False))


def forward_step_func(data_iterator, model):
    def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
        losses = output_tensor.float()
        loss_mask = loss_mask.view(-1).float()
        loss = torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()
        return loss, {"lm loss": loss.detach().clone()}

    data = next(data_iterator)
    tokens, attention_mask = data["tokens"].to(DEVICE), data["attention_mask"].to(DEVICE)
    position_ids, labels, loss_mask = data["position_ids"].to(DEVICE), data["labels"].to(DEVICE), data["loss_mask"]
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask.to(DEVICE))


def checkpoint_round_trip(gpt_model: DistributedDataParallel) -> bool:
    """dist_checkpointing save, then load into the same model; True if the weights came back equal."""
    model = gpt_model.module
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    path = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    dist_checkpointing.save(sharded_state_dict=model.sharded_state_dict(prefix=""), checkpoint_dir=path[0])
    model.load_state_dict(dist_checkpointing.load(sharded_state_dict=model.sharded_state_dict(prefix=""),
                                                  checkpoint_dir=path[0]))
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def train(steps: int = 5, routed: bool = True, plan_kind: str = "skip") -> dict:
    """Train ``steps`` iterations; returns this rank's reported losses per step."""
    initialize_distributed()
    gpt_model = model_provider().to(DEVICE)
    config = gpt_model.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    gpt_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt_model)
    config.no_sync_func = gpt_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optim = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0, bf16=False, fp16=False),
                                   [gpt_model])
    train_iterator = get_train_data_iterator()
    forward_backward_func = get_forward_backward_func()
    if routed:  # ROUTED
        forward_backward_func = RoutedForwardBackward.for_model(  # ROUTED
            gpt_model, plan_kind, num_microbatches=MICROBATCHES, skip_ratio=0.25)  # ROUTED
        forward_backward_func.guard_optimizer(optim)  # ROUTED
    history = []
    for iteration in range(steps):
        gpt_model.zero_grad_buffer()
        optim.zero_grad()
        losses_reduced = forward_backward_func(forward_step_func=forward_step_func, data_iterator=train_iterator,
                                               model=[gpt_model], num_microbatches=MICROBATCHES, seq_length=SEQ,
                                               micro_batch_size=MICRO_BATCH, decoder_seq_length=SEQ,
                                               forward_only=False)
        optim.step()
        history.append([float(x["lm loss"]) for x in losses_reduced])
        if losses_reduced:
            print(f"rank {dist.get_rank()} iteration {iteration}: lm loss "
                  f"{sum(history[-1]) / len(history[-1]):.4f}", flush=True)
    ok = checkpoint_round_trip(gpt_model)
    parallel_state.destroy_model_parallel()
    return {"losses": history, "checkpoint_round_trip": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="skip", choices=["stock", "full", "skip"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train(args.steps, routed=args.plan != "stock", plan_kind=args.plan)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
