"""Build DeepSpeed PipelineModules for the ring (home-stage) and linear layouts, and the engine.

Layers are given as factories so each rank builds only its own stage (DeepSpeed's LayerSpec),
and weights depend only on (seed, layer index): every replica and the single-process reference
start bitwise identical.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

from .engine import RoutedPipelineEngine, RoutingSettings
from .prebuilt_op import load_prebuilt_shm_op


class FactorySpec(LayerSpec):
    """A LayerSpec built by any callable returning an ``nn.Module`` (LayerSpec itself wants a class)."""

    def __init__(self, factory: Callable[..., torch.nn.Module], *args: Any, **kwargs: Any):
        self.typename = factory
        self.module_args = args
        self.module_kwargs = kwargs
        self.global_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1

    def build(self, log: bool = False) -> torch.nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)


def ensure_deepspeed_comm() -> None:
    """Let DeepSpeed's comm layer wrap the already-initialised torch.distributed default group."""
    import deepspeed
    from deepspeed import comm as ds_dist

    if not ds_dist.is_initialized():
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        load_prebuilt_shm_op()
        deepspeed.init_distributed(dist_backend=backend or "gloo")
        _release_cpu_shm_segment()


def _release_cpu_shm_segment() -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU all-reduce op once every rank has mapped it.

    DeepSpeed's CPU comm op creates a ~100 MB segment per rank named after the rendezvous address and
    port and never unlinks it: every job (and every test run, on a fresh port) leaves them behind until
    /dev/shm fills the machine's memory. The mappings stay valid after the name is gone.
    """
    from pathlib import Path

    if not torch.distributed.is_initialized() or torch.distributed.get_backend() != "gloo":
        return
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return
    rank = str(torch.distributed.get_rank())
    mine = {line.split()[-1] for line in maps.read_text().splitlines()
            if "/dev/shm/deepspeed_allreduce_buffer_" in line and not line.endswith("(deleted)")}
    torch.distributed.barrier()  # every rank has opened every peer's segment during init
    for path in mine:
        if path.rsplit("_", 1)[-1] == rank:
            Path(path).unlink(missing_ok=True)


def ring_pipeline_module(home: FactorySpec, bodies: list[FactorySpec], replicas: int,
                         loss_fn: Callable) -> PipelineModule:
    """Stage 0 = home (embedding + head + loss), stages 1..S-1 = one body module each."""
    ensure_deepspeed_comm()
    topo = PipeDataParallelTopology(num_pp=len(bodies) + 1, num_dp=replicas)
    return PipelineModule(layers=[home] + list(bodies), topology=topo, loss_fn=loss_fn, partition_method="uniform")


def linear_pipeline_module(layers: list[FactorySpec], num_stages: int, replicas: int, loss_fn: Callable,
                           partition_method: str = "uniform") -> PipelineModule:
    """The usual DeepSpeed layout: a flat layer list cut into ``num_stages`` contiguous stages."""
    ensure_deepspeed_comm()
    topo = PipeDataParallelTopology(num_pp=num_stages, num_dp=replicas)
    return PipelineModule(layers=layers, topology=topo, loss_fn=loss_fn, partition_method=partition_method)


def initialize_routed(model: PipelineModule, config: dict, routing: RoutingSettings,
                      optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                      engine_class: type[RoutedPipelineEngine] = RoutedPipelineEngine) -> RoutedPipelineEngine:
    """``deepspeed.initialize`` for a routed pipeline: the same steps as its pipeline branch, our engine class.

    The plan is validated against the topology before anything is built. ``engine_class`` lets a
    subclass (e.g. the fault-tolerant engine) be built the same way.
    """
    import deepspeed
    from deepspeed import comm as ds_dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero import partition_parameters

    partition_parameters.shutdown_init_context()
    if torch.distributed.is_initialized():
        ensure_deepspeed_comm()
    else:
        load_prebuilt_shm_op()
        ds_dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=None)
        _release_cpu_shm_segment()
    mpu = model.mpu()
    config_class = DeepSpeedConfig(config, mpu)
    deepspeed.set_optimizer_flags(config_class, model)
    engine = engine_class(args=None, model=model, optimizer=optimizer,
                                  model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  training_data=None, lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=False,
                                  collate_fn=None, config=config, config_class=config_class, routing=routing)
    partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine
