"""A plain DeepSpeed pipeline-parallel training script, routed by skipfree: the lines with a trailing
skipfree comment.

Written the way DeepSpeed's pipeline examples are (a ``PipelineModule`` of ``LayerSpec``s with a
``loss_fn``, the optimizer in the DeepSpeed config, ``training_data=`` and ``engine.train_batch()``).
A line whose comment is just "skipfree" is added; one whose comment is "skipfree: was <code>"
replaces ``<code>`` of the stock script.
Run (CPU, 4 processes; ``--plan full`` trains exactly as stock DeepSpeed)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 docs/examples/deepspeed_pipe_routed.py --plan skip
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from integration.backends.deepspeed.module import initialize_routed  # skipfree

WIDTH, CLASSES, SAMPLES = 32, 10, 512


class Blobs(torch.utils.data.Dataset):
    """Synthetic classification data: class-dependent Gaussian blobs (no download)."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        centers = torch.randn(CLASSES, WIDTH, generator=g) * 2.0
        self.x = centers[self.labels] + torch.randn(n, WIDTH, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i]


def build_model(stages: int, depth: int) -> PipelineModule:
    layers = []
    for _ in range(depth):
        layers += [LayerSpec(nn.Linear, WIDTH, WIDTH), LayerSpec(nn.ReLU)]
    layers.append(LayerSpec(nn.Linear, WIDTH, CLASSES))
    return PipelineModule(layers=layers, num_stages=stages, loss_fn=nn.CrossEntropyLoss(), partition_method="uniform")


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline-parallel-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--plan", default="full", help="full | skip")  # skipfree
    args = parser.parse_args(argv)

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    torch.manual_seed(1234)
    model = build_model(args.pipeline_parallel_size, depth=args.pipeline_parallel_size)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 4,
        "steps_per_print": 5,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "routing": {"plan": args.plan, "skip_ratio": 0.25, "gradient_rule": "visited"},  # skipfree
    }
    engine, _, _, _ = initialize_routed(  # skipfree: was engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        training_data=Blobs(SAMPLES), config=config)
    losses = [float(engine.train_batch()) for _ in range(args.steps)]
    return losses


if __name__ == "__main__":
    main()
