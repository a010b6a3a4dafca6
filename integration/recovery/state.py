"""A stage's state as recovery moves it: local-index state dicts and sha256 digests for bitwise audits."""

from __future__ import annotations

import hashlib

import torch


def state_digest(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    """sha256 over the module's state dict and (optionally) the optimizer state, for bitwise audits."""
    return digest_of(module.state_dict(), optimizer.state_dict() if optimizer is not None else None)


def digest_of(model_state: dict[str, torch.Tensor], optimizer_state: dict | None = None) -> str:
    """:func:`state_digest` of a state dict and an optimizer ``state_dict()`` (e.g. a home mirror's)."""
    h = hashlib.sha256()
    for k, v in sorted(model_state.items()):
        if not torch.is_tensor(v):
            continue  # megatron's `_extra_state` (None without Transformer Engine) holds no weights
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    if optimizer_state is not None:
        sd = optimizer_state
        for pid in sorted(sd["state"]):
            for k, v in sorted(sd["state"][pid].items()):
                h.update(f"{pid}/{k}".encode())
                h.update(v.detach().contiguous().cpu().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    return h.hexdigest()


def local_key(key: str, start: int) -> str:
    """A PipelineModule state key with its global layer index made local (``3.blocks..`` -> ``0.blocks..``)."""
    head, _, rest = key.partition(".")
    return f"{int(head) - start}.{rest}" if head.isdigit() else key


def stage_state(module) -> dict[str, torch.Tensor]:
    """The stage's state dict with layer indices made local (``3.blocks..`` on stage 3 -> ``0.blocks..``),
    so neighbouring stages' keys match (a PipelineModule names its layers by global index)."""
    start = getattr(module, "_local_start", 0)
    # Tensors only: megatron modules add `_extra_state` entries (None without Transformer Engine).
    return {local_key(key, start): value for key, value in module.state_dict().items() if torch.is_tensor(value)}


def load_stage_state(module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`stage_state`: load local-index keys into this stage's PipelineModule."""
    start = getattr(module, "_local_start", 0)
    missing, unexpected = module.load_state_dict({local_key(key, -start): value for key, value in state.items()},
                                                 strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # see stage_state
    if missing or unexpected:
        raise RuntimeError(f"load_stage_state: state does not fit the stage (missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]})")
