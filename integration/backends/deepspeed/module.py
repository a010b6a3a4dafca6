"""Build DeepSpeed PipelineModules for the ring (home-stage) and linear layouts, and the engine.

Layers are given as factories so each rank builds only its own stage (DeepSpeed's LayerSpec),
and weights depend only on (seed, layer index): every replica and the single-process reference
start bitwise identical.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT
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
    module = PipelineModule(layers=[home] + list(bodies), topology=topo, loss_fn=loss_fn, partition_method="uniform")
    module.skipfree_layout = "ring"  # read by engine.model_layout; every other PipelineModule is linear
    return module


def linear_pipeline_module(layers: list[FactorySpec], num_stages: int, replicas: int, loss_fn: Callable,
                           partition_method: str = "uniform") -> PipelineModule:
    """The usual DeepSpeed layout: a flat layer list cut into ``num_stages`` contiguous stages."""
    ensure_deepspeed_comm()
    topo = PipeDataParallelTopology(num_pp=num_stages, num_dp=replicas)
    return PipelineModule(layers=layers, topology=topo, loss_fn=loss_fn, partition_method=partition_method)


def initialize_routed(args: Any = None, model: PipelineModule | None = None,
                      optimizer: torch.optim.Optimizer | Callable | None = None, model_parameters: Any = None,
                      training_data: Any = None, lr_scheduler: Any = None,
                      distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT, mpu: Any = None,
                      dist_init_required: bool | None = None, collate_fn: Callable | None = None,
                      config: str | dict | None = None, config_params: str | dict | None = None, *,
                      routing: RoutingSettings | Mapping[str, Any] | None = None,
                      engine_class: type[RoutedPipelineEngine] = RoutedPipelineEngine) -> tuple:
    """``deepspeed.initialize`` for a routed pipeline: the same arguments, steps and return value
    ``(engine, optimizer, training_dataloader, lr_scheduler)``, our engine class.

    Routing settings come from ``routing`` (a :class:`RoutingSettings` or a dict) or from a
    ``routing`` block of the DeepSpeed config (removed before DeepSpeed reads it); neither means the
    full plan (stock behaviour). Micro-batch size and gradient accumulation steps are DeepSpeed's
    own config entries; the plan layout is read from the model. The plan is validated against the
    topology before anything is built. ``engine_class`` lets a subclass (e.g. the fault-tolerant
    engine) be built the same way.
    """
    import deepspeed
    from deepspeed import comm as ds_dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config  # deepspeed.initialize's loader
    from deepspeed.runtime.zero import partition_parameters

    if not isinstance(model, PipelineModule):
        raise TypeError(f"initialize_routed: model must be a deepspeed PipelineModule, got {type(model).__name__}; "
                        f"routing applies to pipeline-parallel models (use deepspeed.initialize for others)")
    if mpu is not None:
        raise ValueError("initialize_routed: mpu must be None with pipeline parallelism (as deepspeed.initialize); "
                         "the PipelineModule's topology is the grid")
    if config is None and config_params is not None:
        config = config_params
    if getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise ValueError("initialize_routed: a DeepSpeed config came both in args.deepspeed_config and config=; "
                             "give one")
        config = args.deepspeed_config
    if config is None:
        raise ValueError("initialize_routed: no DeepSpeed config; pass config= (a dict or a JSON path) or "
                         "args.deepspeed_config, as for deepspeed.initialize")
    config = dict(config) if isinstance(config, Mapping) else dict(load_ds_config(config))
    block = config.pop("routing", None)
    if block is not None and routing is not None:
        raise ValueError("initialize_routed: routing settings came both in the config's 'routing' block and the "
                         "routing= keyword; give them once")
    if routing is None:
        routing = RoutingSettings.from_config(block or {})
    elif isinstance(routing, Mapping):
        routing = RoutingSettings.from_config(routing)

    partition_parameters.shutdown_init_context()
    if torch.distributed.is_initialized():
        ensure_deepspeed_comm()
    else:
        load_prebuilt_shm_op()
        ds_dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                 distributed_port=distributed_port, dist_init_required=dist_init_required)
        _release_cpu_shm_segment()
    mpu = model.mpu()
    config_class = DeepSpeedConfig(config, mpu)
    deepspeed.set_optimizer_flags(config_class, model)
    engine = engine_class(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                          training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                          dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                          config_class=config_class, routing=routing)
    partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
