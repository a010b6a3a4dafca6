"""Small DeepSpeed PipelineModules of the kinds users write, for the drop-in tests (tests/deepspeed/).

Each is a plain ``PipelineModule`` of ``LayerSpec``s with a ``loss_fn``, built from a fixed seed, and
a data function giving (inputs, labels) microbatches as DeepSpeed's pipe engine reads them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology

MBS = 2


# ---------------------------------------------------------------- layers passing (hidden, mask)
class TupleIn(nn.Module):
    """First layer of the tuple model: ((x, mask)) -> (hidden, mask); mask is an int64 tensor."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d)

    def forward(self, inputs):
        x, mask = inputs
        return torch.tanh(self.proj(x)) * mask.unsqueeze(-1).float(), mask


class TupleBlock(nn.Module):
    """(hidden, mask) -> (hidden, mask): a masked residual layer."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, inputs):
        h, mask = inputs
        return h + torch.tanh(self.lin(h)) * mask.unsqueeze(-1).float(), mask


class TupleOut(nn.Module):
    """(hidden, mask) -> logits (mean over unmasked positions)."""

    def __init__(self, d: int, classes: int):
        super().__init__()
        self.head = nn.Linear(d, classes)

    def forward(self, inputs):
        h, mask = inputs
        pooled = (h * mask.unsqueeze(-1).float()).sum(1) / mask.float().sum(1, keepdim=True).clamp(min=1.0)
        return self.head(pooled)


class Reshape(nn.Module):
    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


# ---------------------------------------------------------------- the models
def _module(layers, stages: int, replicas: int, loss_fn, **kwargs) -> PipelineModule:
    torch.manual_seed(1234)
    topo = PipeDataParallelTopology(num_pp=stages, num_dp=replicas)
    return PipelineModule(layers=layers, topology=topo, loss_fn=loss_fn, partition_method="uniform", **kwargs)


def linear_stack(stages: int, replicas: int, **kwargs) -> PipelineModule:
    """Equal-width Linear+Tanh blocks (every boundary [MBS, 16] float32); float input, int labels."""
    layers = [LayerSpec(nn.Linear, 8, 16)]
    for _ in range(2 * stages - 2):
        layers += [LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 16, 16)]
    layers += [LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 16, 5)]
    return _module(layers, stages, replicas, nn.CrossEntropyLoss(), **kwargs)


def conv_net(stages: int, replicas: int) -> PipelineModule:
    """AlexNet-style: every boundary of a PP4 cut has another shape ([2,4,8,8], [2,8,4,4], [2,32], ...)."""
    layers = [LayerSpec(nn.Conv2d, 1, 4, 3, padding=1), LayerSpec(nn.ReLU),
              LayerSpec(nn.Conv2d, 4, 8, 3, padding=1), LayerSpec(nn.MaxPool2d, 2),
              LayerSpec(nn.Conv2d, 8, 8, 3, padding=1), LayerSpec(nn.MaxPool2d, 2),
              LayerSpec(Reshape, 32), LayerSpec(nn.Linear, 32, 5)]
    return _module(layers, stages, replicas, nn.CrossEntropyLoss())


def tuple_model(stages: int, replicas: int) -> PipelineModule:
    """Stages pass (hidden, mask) tuples (float hidden carries gradients, int mask does not)."""
    layers = [LayerSpec(TupleIn, 6, 12)] + [LayerSpec(TupleBlock, 12) for _ in range(stages * 2 - 2)] + \
             [LayerSpec(TupleOut, 12, 4)]
    return _module(layers, stages, replicas, nn.CrossEntropyLoss())


def regression(stages: int, replicas: int) -> PipelineModule:
    """MSE regression: float labels."""
    layers = [LayerSpec(nn.Linear, 4, 8)]
    for _ in range(stages - 1):
        layers += [LayerSpec(nn.Sigmoid), LayerSpec(nn.Linear, 8, 8)]
    layers += [LayerSpec(nn.Linear, 8, 1)]
    return _module(layers, stages, replicas, nn.MSELoss())


def inplace_first(stages: int, replicas: int) -> PipelineModule:
    """Every stage starts with ReLU(inplace=True) on what it receives (stock clones received activations)."""
    layers = []
    for _ in range(stages):
        layers += [LayerSpec(nn.ReLU, inplace=True), LayerSpec(nn.Linear, 6, 6)]
    return _module(layers, stages, replicas, nn.MSELoss())


# ---------------------------------------------------------------- tensor parallelism inside a stage
class TPGroup:
    """The model-parallel process group, set once the PipelineModule (whose grid creates it) exists."""

    group: object = None


class _CopyToTP(torch.autograd.Function):
    """Megatron's column-parallel input: identity forward, gradient summed over the TP group."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.tp.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's row-parallel output: partial products summed over the TP group, identity backward."""

    @staticmethod
    def forward(ctx, x, tp):
        x = x.contiguous()
        torch.distributed.all_reduce(x, group=tp.group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _full_linear(d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, generator=g) * 0.1


class ColumnParallel(nn.Module):
    """Output features split over the TP ranks: this rank's rows of a full (seeded) weight."""

    def __init__(self, d_in: int, d_out: int, seed: int, tp: TPGroup, rank: int, size: int):
        super().__init__()
        w, b = _full_linear(d_in, d_out, seed)
        part = d_out // size
        self.weight = nn.Parameter(w[rank * part:(rank + 1) * part].clone())
        self.bias = nn.Parameter(b[rank * part:(rank + 1) * part].clone())
        self.tp = tp

    def forward(self, x):
        return nn.functional.linear(_CopyToTP.apply(x, self.tp), self.weight, self.bias)


class RowParallel(nn.Module):
    """Input features split over the TP ranks: this rank's columns, partial outputs all-reduced, full bias."""

    def __init__(self, d_in: int, d_out: int, seed: int, tp: TPGroup, rank: int, size: int):
        super().__init__()
        w, b = _full_linear(d_in, d_out, seed)
        part = d_in // size
        self.weight = nn.Parameter(w[:, rank * part:(rank + 1) * part].clone())
        self.bias = nn.Parameter(b.clone())
        self.tp = tp

    def forward(self, x):
        return _ReduceFromTP.apply(nn.functional.linear(x, self.weight), self.tp) + self.bias


def tp_mlp(stages: int, replicas: int, tensor: int = 2) -> PipelineModule:
    """Per stage a column-parallel then row-parallel linear pair (Tanh between and after), on a
    PipeModelDataParallelTopology; each rank holds its TP slice of weights from fixed seeds."""
    topo = PipeModelDataParallelTopology(num_pp=stages, num_mp=tensor, num_dp=replicas)
    rank = topo.get_coord(torch.distributed.get_rank()).model
    tp = TPGroup()
    layers, d = [], 8
    for s in range(stages):
        last = s == stages - 1
        layers += [LayerSpec(ColumnParallel, d, 32, 10 * s, tp, rank, tensor), LayerSpec(nn.Tanh),
                   LayerSpec(RowParallel, 32, 5 if last else 16, 10 * s + 1, tp, rank, tensor)]
        layers += [] if last else [LayerSpec(nn.Tanh)]
        d = 16
    module = PipelineModule(layers=layers, topology=topo, loss_fn=nn.CrossEntropyLoss(),
                            partition_method="type:ColumnParallel")
    tp.group = module.mpu().get_slice_parallel_group()
    return module


def data_for(kind: str, n: int, seed: int) -> list:
    """``n`` microbatches (inputs, labels) for the model ``kind``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind in ("linear_stack", "ckpt", "tp_mlp"):
            out.append((torch.randn(MBS, 8, generator=g), torch.randint(0, 5, (MBS,), generator=g)))
        elif kind == "conv_net":
            out.append((torch.randn(MBS, 1, 8, 8, generator=g), torch.randint(0, 5, (MBS,), generator=g)))
        elif kind == "tuple_model":
            mask = torch.ones(MBS, 5, dtype=torch.int64)
            mask[:, -1 - int(torch.randint(0, 3, (1,), generator=g)):] = 0
            out.append(((torch.randn(MBS, 5, 6, generator=g), mask), torch.randint(0, 4, (MBS,), generator=g)))
        elif kind == "regression":
            x = torch.randn(MBS, 4, generator=g)
            out.append((x, x.sum(1, keepdim=True) * 0.5))
        elif kind == "inplace_first":
            out.append((torch.randn(MBS, 6, generator=g), torch.randn(MBS, 6, generator=g)))
        else:
            raise KeyError(kind)
    return out


MODELS: dict[str, Callable[..., PipelineModule]] = {
    "linear_stack": linear_stack, "conv_net": conv_net, "tuple_model": tuple_model, "regression": regression,
    "inplace_first": inplace_first,
    "ckpt": lambda s, d: linear_stack(s, d, activation_checkpoint_interval=1),
    "tp_mlp": tp_mlp,
}
