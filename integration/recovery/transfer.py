"""Point-to-point transfer of a stage's state (state dicts, optimizer state) to a joining rank.

States are serialised with ``torch.save`` into one uint8 tensor (bitwise exact, any nesting),
preceded by its length; both go through the failure-aware wait.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist

from .detect import FailureMonitor


def send_state(obj: Any, dst: int, monitor: FailureMonitor, what: str) -> int:
    """Send ``obj`` to rank ``dst``; returns the bytes sent."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    monitor.wait(dist.isend(torch.tensor([payload.numel()], dtype=torch.int64), dst), what)
    monitor.wait(dist.isend(payload, dst), what)
    return payload.numel()


def recv_state(src: int, monitor: FailureMonitor, what: str) -> Any:
    """Receive an object sent by :func:`send_state` from rank ``src``."""
    size = torch.zeros(1, dtype=torch.int64)
    monitor.wait(dist.irecv(size, src), what)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    monitor.wait(dist.irecv(payload, src), what)
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=False)
