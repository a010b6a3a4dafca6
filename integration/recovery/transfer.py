"""Point-to-point transfer of a stage's state (state dicts, optimizer state) to a joining rank.

States are serialised with ``torch.save`` into one uint8 tensor (bitwise exact, any nesting),
preceded by its length; both go through the failure-aware wait.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist

from ..runtime.p2p import launch
from .detect import FailureMonitor


def pack_state(obj: Any) -> torch.Tensor:
    """``obj`` serialised with ``torch.save`` into one uint8 tensor (serialise once, send to several ranks)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def send_packed(payload: torch.Tensor, dst: int, monitor: FailureMonitor, what: str, tag: int = 0) -> int:
    """Send a :func:`pack_state` payload to rank ``dst`` (length first); returns the bytes sent."""
    monitor.wait(launch(dist.isend, torch.tensor([payload.numel()], dtype=torch.int64), dst, tag=tag), what)
    monitor.wait(launch(dist.isend, payload, dst, tag=tag), what)
    return payload.numel() + 8


def send_state(obj: Any, dst: int, monitor: FailureMonitor, what: str, tag: int = 0) -> int:
    """Send ``obj`` to rank ``dst``; returns the bytes sent."""
    return send_packed(pack_state(obj), dst, monitor, what, tag) - 8


def recv_state(src: int, monitor: FailureMonitor, what: str, tag: int = 0) -> Any:
    """Receive an object sent by :func:`send_state` from rank ``src``."""
    size = torch.zeros(1, dtype=torch.int64)
    monitor.wait(launch(dist.irecv, size, src, tag=tag), what)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    monitor.wait(launch(dist.irecv, payload, src, tag=tag), what)
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=False)
