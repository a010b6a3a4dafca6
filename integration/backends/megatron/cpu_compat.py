"""Run megatron-core on CPU (gloo): every patch of megatron's hard-coded CUDA calls, in one place.

megatron-core assumes a GPU in a few spots that a CPU training job reaches: ``device="cuda"``
factories and ``torch.cuda.current_device()`` buffers (schedules, p2p, grad buffers, clipping,
masks, rotary tables, ``dist_checkpointing`` save/load), ``torch.cuda.synchronize()``, the CUDA RNG state tracker, a
``Tensor.cuda()`` when tied embeddings are synchronised, and an assertion that fp32 grads are
``torch.cuda.FloatTensor`` in grad clipping. The patches are:

* a module-local ``torch`` shim installed as the ``torch`` global of the megatron modules that
  mention CUDA: ``torch.cuda.*`` device/sync/RNG calls and ``device="cuda"`` factory arguments
  map to the CPU. Nothing global in torch changes; other code keeps the real ``torch``;
* the RNG tracker's state get/set use the CPU generator (forking it for TP regions);
* ``LanguageModule.setup_embeddings_and_output_layer`` runs with ``Tensor.cuda`` as identity;
* ``clip_grad_by_total_norm_fp32`` accepts CPU fp32 grads (same math: upstream's scale kernel).

They touch private names, so they are applied only to the versions in
:data:`SUPPORTED_VERSIONS` (anything else is refused with a clear error), and never when CUDA is
available (on GPU megatron runs unpatched). The source-level form of the last two, for users who
prefer to patch their tree, is ``patches/megatron-core-0.16.1-cpu.diff``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch

SUPPORTED_VERSIONS = ("0.16.1",)

_applied = False

# Modules whose CUDA calls a CPU training step reaches; each must import (checked by the version guard).
_SHIMMED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.parallel_state",
    "megatron.core.utils",
    # dist_checkpointing save/load: torch.cuda.synchronize()/current_device() and device="cuda" buffers
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

# Private names the patches replace or wrap; their absence means an unsupported megatron-core.
_REQUIRED_NAMES = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.models.common.language_module.language_module", "LanguageModule"),
)


class UnsupportedMegatronVersion(RuntimeError):
    """The installed megatron-core is not one the CPU patches were written and tested for."""


def megatron_version() -> str:
    """The installed megatron-core version string."""
    from megatron.core import package_info

    return package_info.__version__


def check_megatron_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedMegatronVersion` unless ``version`` (default: installed) is supported."""
    version = version if version is not None else megatron_version()
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedMegatronVersion(
            f"megatron-core {version} is not supported by integration.backends.megatron (supported: "
            f"{', '.join(SUPPORTED_VERSIONS)}); the routed schedule and the CPU patches use megatron-core internals "
            f"that change between releases. Install megatron-core=={SUPPORTED_VERSIONS[-1]}")


def _cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):  # a CUDA ordinal, as torch.cuda.current_device() returns
        return "cpu"
    return device


def _factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)
    return wrapper


def _make_cuda_shim() -> types.ModuleType:
    cuda = types.ModuleType("torch.cuda (cpu shim)")
    cuda.__dict__.update(torch.cuda.__dict__)
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    return cuda


def _make_torch_shim() -> types.ModuleType:
    # A copy of torch's namespace (plain dict lookups, no per-attribute overhead in hot paths).
    shim = types.ModuleType("torch (cpu shim)")
    shim.__dict__.update(torch.__dict__)
    shim.cuda = _make_cuda_shim()
    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint"):
        setattr(shim, name, _factory(getattr(torch, name)))
    return shim


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _rng_state_get(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _rng_state_set(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_clip_by_total_norm(original: Callable) -> Callable:
    from megatron.core.optimizer import clip_grads

    @functools.wraps(original)
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = []
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                # Upstream asserts 'torch.cuda.FloatTensor'; the CPU equivalent is an fp32 grad.
                if grad.dtype != torch.float32 and not use_decoupled_grad:
                    raise AssertionError(f"fp32 grad expected, got {grad.dtype}")
                grads.append(clip_grads.to_local_if_dtensor(grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            dummy_overflow_buf = torch.zeros(1, dtype=torch.int)
            clip_grads.multi_tensor_applier(clip_grads.multi_tensor_scale_impl, dummy_overflow_buf,
                                            [grads, grads], clip_coeff)
    return clip_grad_by_total_norm_fp32


def _import(name: str) -> types.ModuleType:
    __import__(name)
    return sys.modules[name]


def apply_cpu_patches() -> bool:
    """Patch megatron-core for CPU training; idempotent. Returns whether patches are active.

    Does nothing (returns False) when CUDA is available. Raises
    :class:`UnsupportedMegatronVersion` for a megatron-core outside :data:`SUPPORTED_VERSIONS`
    or one that lacks a patched name, before touching anything.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    check_megatron_version()
    modules = {name: _import(name) for name in _SHIMMED_MODULES}
    for mod_name, attr in _REQUIRED_NAMES:
        if not hasattr(_import(mod_name), attr):
            raise UnsupportedMegatronVersion(f"megatron-core {megatron_version()}: {mod_name}.{attr} is missing; "
                                             f"the CPU patches do not fit this build")
    shim = _make_torch_shim()
    for mod in modules.values():
        if mod.__dict__.get("torch") is torch and "cuda" in Path(mod.__file__).read_text():
            mod.torch = shim

    random_mod = modules["megatron.core.tensor_parallel.random"]
    random_mod._get_cuda_rng_state = _rng_state_get
    random_mod._set_cuda_rng_state = _rng_state_set

    clip_mod = modules["megatron.core.optimizer.clip_grads"]
    clip = _make_clip_by_total_norm(clip_mod.clip_grad_by_total_norm_fp32)
    clip_mod.clip_grad_by_total_norm_fp32 = clip
    modules["megatron.core.optimizer.optimizer"].clip_grad_by_total_norm_fp32 = clip

    lm_mod = _import("megatron.core.models.common.language_module.language_module")
    setup = lm_mod.LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def setup_embeddings_and_output_layer(self) -> None:
        with _tensor_cuda_is_identity():  # upstream moves the tied weight with .cuda() before its all-reduce
            setup(self)

    lm_mod.LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
    _applied = True
    return True


def cpu_patches_active() -> bool:
    """Whether :func:`apply_cpu_patches` has patched this process."""
    return _applied
