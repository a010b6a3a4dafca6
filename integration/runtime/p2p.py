"""Point-to-point transfers to ANY rank, with a header that is checked on arrival.

DeepSpeed's p2p only talks to the previous/next stage and megatron-core's only to its pipeline
neighbours, so routed microbatches use ``torch.distributed`` isend/irecv directly. gloo checks
neither shape nor dtype (a mismatch corrupts silently) and NCCL ignores tags, so every payload is
prefixed with a small int64 header (magic, step, microbatch, kind, dtype, shape), sent in the same
message, that the receiver compares with what its program expects before it trusts the payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

MAGIC = 0x5C1F
HEADER_LEN = 12
MAX_DIMS = HEADER_LEN - 6
HEADER_BYTES = HEADER_LEN * 8

KIND_CODES = {"act": 1, "grad": 2, "labels": 3, "batch": 4}  # batch: a microbatch's data along its route
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.bool]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}


class FailedWork:
    """Stands for a p2p/collective whose *launch* raised (gloo raises at ``isend``/``irecv`` time
    when the pair to a dead peer is already closed): its ``wait`` re-raises that error, so the one
    place that blocks (a failure-aware wait) sees it exactly like an error of the transfer itself."""

    def __init__(self, error: BaseException):
        self.error = error

    def wait(self, *args, **kwargs) -> bool:
        raise self.error

    def is_completed(self) -> bool:
        return True


# Emulated wide-area runs only (integration/runtime/netem.py installs its delay layer here); None otherwise.
_launch_hook: Callable[[Callable[..., object], tuple, dict], object] | None = None


def launch(start: Callable[..., object], *args, **kwargs) -> object:
    """``start(*args, **kwargs)`` (``dist.isend``, ``dist.irecv``, an ``async_op`` collective); a
    ``RuntimeError`` raised by the launch itself comes back as a :class:`FailedWork` to wait on."""
    try:
        if _launch_hook is not None:
            return _launch_hook(start, args, kwargs)
        return start(*args, **kwargs)
    except RuntimeError as exc:  # gloo: "Connection closed by peer" (DistBackendError is a RuntimeError)
        return FailedWork(exc)


class TransferMismatch(RuntimeError):
    """The header that arrived does not describe what this rank's program expects."""


@dataclass
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _header(step: int, mb: int, kind: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"p2p: tensors of more than {MAX_DIMS} dims are not supported")
    vals = [MAGIC, step, mb, KIND_CODES[kind], _DTYPE_CODE[tensor.dtype], tensor.dim(), *tensor.shape]
    vals += [0] * (HEADER_LEN - len(vals))
    return torch.tensor(vals, dtype=torch.int64)


def _describe(h: list[int]) -> str:
    kind = {v: k for k, v in KIND_CODES.items()}.get(h[3], f"?{h[3]}")
    dtype = _DTYPES[h[4]] if 0 <= h[4] < len(_DTYPES) else f"?{h[4]}"
    return f"{kind} of microbatch {h[2]} at step {h[1]}, {dtype} shape {tuple(h[6:6 + h[5]])}"


class RoutedP2P:
    """Header-checked isend/irecv between global ranks of ``group``.

    Sends are asynchronous; their handles are kept until :meth:`flush` so buffers stay alive.
    ``wait`` is the single place that blocks, so a failure-aware runtime can replace it; an error
    raised by the launch itself (a peer already gone) is handed to ``wait`` too (:func:`launch`).
    """

    def __init__(self, rank: int, device: torch.device | str = "cpu", group=None,
                 wait: Callable[[object, str], None] | None = None):
        self.rank = rank
        self.device = torch.device(device)
        self.group = group
        self._wait = wait or (lambda work, what: work.wait())
        self._pending: list[tuple[object, torch.Tensor, str]] = []
        self.bytes_sent = 0
        self.messages = 0

    def send(self, tensor: torch.Tensor, peer: int, kind: str, mb: int, step: int) -> None:
        payload = tensor.detach().contiguous()
        header = _header(step, mb, kind, payload).to(self.device)
        # Header and payload travel as ONE message: half the messages of a separate header.
        nbytes = payload.numel() * payload.element_size()
        message = torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8, device=self.device)
        message[:HEADER_BYTES].copy_(header.view(torch.uint8))
        message[HEADER_BYTES:].copy_(payload.reshape(-1).view(torch.uint8))
        what = f"send {kind} mb {mb} to rank {peer}"
        work = launch(dist.isend, message, dst=peer, group=self.group)
        if isinstance(work, FailedWork):
            self._wait(work, what)  # raises now, through the same (failure-aware) path as a failed wait
        self._pending.append((work, message, what))
        self.bytes_sent += nbytes
        self.messages += 1

    def recv(self, spec: TensorSpec, peer: int, kind: str, mb: int, step: int) -> torch.Tensor:
        want = _header(step, mb, kind, torch.empty(spec.shape, dtype=spec.dtype, device="meta")).tolist()
        nbytes = torch.Size(spec.shape).numel() * torch.empty((), dtype=spec.dtype).element_size()
        message = torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8, device=self.device)
        what = f"receive {kind} of microbatch {mb} from rank {peer}"
        self._wait(launch(dist.irecv, message, src=peer, group=self.group), what)
        h = message[:HEADER_BYTES].view(torch.int64).tolist()
        if h != want:
            raise TransferMismatch(
                f"rank {self.rank}: expected {_describe(want)} from rank {peer}, but the header says "
                f"{_describe(h) if h[0] == MAGIC else 'garbage (not a routed-pipeline header)'}; the ranks disagree "
                f"on the plan or the model shapes (check that every rank got the same config)")
        # The payload starts at byte 96, aligned for every dtype we send.
        return message[HEADER_BYTES:].view(spec.dtype).view(spec.shape)

    def flush(self) -> None:
        """Wait for every outstanding send (end of iteration)."""
        pending, self._pending = self._pending, []
        for work, _, what in pending:
            self._wait(work, what)
