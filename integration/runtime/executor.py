"""Run one rank's program: per-microbatch slots, compute through a backend handler, p2p to any rank.

The executor owns what DeepSpeed's and megatron's 1F1B engines keep in single shared slots
(one loss, one received gradient): here every microbatch has its own input, output, loss and
gradient slot, because routed microbatches finish in any order. The model math is delegated to a
backend :class:`StageHandler` so DeepSpeed and megatron-core share this one implementation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .boundary import BoundaryLayout, BoundaryMismatch, flatten, recv_payload, send_payload, unflatten
from .p2p import RoutedP2P, TensorSpec
from .program import (BWD, FWD, LOAD, LOSS_PARTS, PART_EMBED, PART_FIRST, RECV_ACT, RECV_BATCH, RECV_GRAD,
                      RECV_LABELS, SEND_ACT, SEND_BATCH, SEND_GRAD, SEND_LABELS, Op)


BACKWARD_KINDS = (BWD, SEND_GRAD, RECV_GRAD)


class StageHandler(Protocol):
    """What a backend supplies: data, the forward of a model part, the loss and the backward."""

    def load(self, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) of microbatch ``mb`` of the current step (home ranks only)."""

    def forward(self, part: str, mb: int, inputs: torch.Tensor) -> torch.Tensor:
        """Run ``part`` of this rank's model on ``inputs``."""

    def loss(self, part: str, mb: int, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of microbatch ``mb`` (loss parts only)."""

    def backward_loss(self, part: str, mb: int, loss: torch.Tensor) -> None:
        """Backward from the loss (with the backend's loss scaling)."""

    def backward(self, part: str, mb: int, output: torch.Tensor, grad: torch.Tensor) -> None:
        """Backward from ``output`` with the gradient received from downstream (in structured mode:
        ``output`` is the stage's payload and ``grad`` the list of gradients of its float tensors)."""

    # Only for programs compiled with ``carry_batch=True``:
    def batch_tensors(self, mb: int) -> list[torch.Tensor]:
        """Home: the flattened data batch of ``mb`` to send along its route."""

    def receive_batch(self, mb: int, tensors: list[torch.Tensor], layout: BoundaryLayout) -> None:
        """Another node of the route: the data batch of ``mb`` as the home loaded it."""


@dataclass
class _Slot:
    inputs: torch.Tensor
    output: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class IterationResult:
    losses: dict[int, torch.Tensor] = field(default_factory=dict)  # mb -> loss (ranks that compute losses)
    ops_run: int = 0


class ProgramExecutor:
    """Executes the ops of one rank for one iteration, strictly in program order."""

    def __init__(self, rank: int, handler: StageHandler, p2p: RoutedP2P, act_spec: TensorSpec,
                 label_spec: TensorSpec):
        self.rank = rank
        self.handler = handler
        self.p2p = p2p
        self.act_spec = act_spec
        self.label_spec = label_spec
        self.step = 0
        self.forward_only = False
        # carry_batch programs: (home rank, "batch") -> the layout agreed in the boundary handshake.
        # Structured mode: also (peer, "act" | "grad" | "labels") for every pair, both directions.
        self.recv_layouts: dict[tuple[int, str], BoundaryLayout] = {}
        self.send_layouts: dict[tuple[int, str], BoundaryLayout] = {}
        # Structured mode (set with the layouts, after a boundary handshake): activations, gradients
        # and labels are nested payloads (tuples of tensors of any dtype), one packed message each,
        # per-boundary layouts; received float tensors become fresh leaves that require grad.
        self.structured = False
        # Always on, for measured drift (integration/recovery/drift.py): one (kind, mb, part, peer,
        # start, end) per op of the current iteration, perf_counter seconds (CLOCK_MONOTONIC: one
        # clock for every process of a machine). Two clock reads and an append per op.
        self.trace: list[tuple[str, int, str | None, int | None, float, float]] = []
        # Emulation only (a slower node, recovery.straggler): seconds to stall after a compute op of
        # the given duration, counted as part of the op. None: nothing added.
        self.compute_delay: Callable[[Op, float], float] | None = None
        self._reset()

    def _reset(self) -> None:
        self.tokens: dict[int, torch.Tensor] = {}
        self.labels: dict[int, torch.Tensor] = {}
        self.slots: dict[tuple[int, str], _Slot] = {}
        self.last_output: dict[int, torch.Tensor] = {}
        self.recv_act: dict[int, torch.Tensor] = {}
        self.recv_grad: dict[int, torch.Tensor] = {}
        self.send_grad: dict[int, torch.Tensor] = {}
        self.result = IterationResult()

    def run(self, ops: list[Op], step: int, forward_only: bool = False,
            before_op: Callable[[Op], None] | None = None) -> IterationResult:
        """Run a whole program (all ops of this rank for ``step``).

        ``forward_only`` (evaluation) drops the backward ops and keeps no autograd state;
        ``before_op`` is called ahead of every op (failure injection hooks in there).
        """
        self.begin(step, forward_only)
        for op in ops:
            if not (forward_only and op.kind in BACKWARD_KINDS):
                if before_op is not None:
                    before_op(op)
                self.run_op(op)
        return self.end()

    def begin(self, step: int, forward_only: bool = False) -> None:
        self.step = step
        self.forward_only = forward_only
        self.trace = []
        self._reset()

    def end(self) -> IterationResult:
        self.p2p.flush()
        leftovers = {name: sorted(d) for name, d in (("slots", self.slots), ("received activations", self.recv_act),
                                                      ("received gradients", self.recv_grad)) if d}
        if leftovers:
            raise RuntimeError(f"rank {self.rank}: program ended with unconsumed state {leftovers}")
        return self.result

    def run_op(self, op: Op) -> None:
        t0 = time.perf_counter()
        getattr(self, f"_op_{op.kind}")(op)
        if self.compute_delay is not None and op.kind in (FWD, BWD):
            time.sleep(self.compute_delay(op, time.perf_counter() - t0))
        self.trace.append((op.kind, op.mb, op.part, op.peer, t0, time.perf_counter()))
        self.result.ops_run += 1

    # ------------------------------------------------------------------ compute
    def _op_load(self, op: Op) -> None:
        tokens, labels = self.handler.load(op.mb)
        self.tokens[op.mb] = tokens
        self.labels[op.mb] = labels

    def _op_fwd(self, op: Op) -> None:
        if op.part in (PART_EMBED, PART_FIRST):
            inputs = self.tokens.pop(op.mb)
        else:
            inputs = self.recv_act.pop(op.mb)
        output = self.handler.forward(op.part, op.mb, inputs)
        slot = _Slot(inputs, output)
        if op.part in LOSS_PARTS:
            labels = self.labels.pop(op.mb)
            slot.loss = self.handler.loss(op.part, op.mb, output, labels)
            self.result.losses[op.mb] = slot.loss.detach()
        if not self.forward_only:
            self.slots[(op.mb, op.part)] = slot
        self.last_output[op.mb] = output

    def _op_bwd(self, op: Op) -> None:
        slot = self.slots.pop((op.mb, op.part))
        if op.part in LOSS_PARTS:
            self.handler.backward_loss(op.part, op.mb, slot.loss)
        else:
            self.handler.backward(op.part, op.mb, slot.output, self.recv_grad.pop(op.mb))
        if op.part in (PART_EMBED, PART_FIRST):
            return  # the route starts here: data, no gradient goes anywhere
        if self.structured:
            floats = [t for t in flatten(slot.inputs)[0] if t.is_floating_point()]
            missing = [i for i, t in enumerate(floats) if t.grad is None]
            if missing:
                raise RuntimeError(f"rank {self.rank}: microbatch {op.mb} ({op.part}): float input tensor(s) {missing} "
                                   f"of this stage got no gradient; every float tensor crossing a boundary must be "
                                   f"used by the stage that receives it (send masks/ids as integer or bool tensors)")
            self.send_grad[op.mb] = [t.grad for t in floats]
        elif slot.inputs.is_floating_point():
            if slot.inputs.grad is None:
                raise RuntimeError(f"rank {self.rank}: no input gradient for microbatch {op.mb} ({op.part})")
            self.send_grad[op.mb] = slot.inputs.grad

    # ------------------------------------------------------------------ communication
    def _op_send_act(self, op: Op) -> None:
        output = self.last_output.pop(op.mb)
        if self.structured:
            self._send_structured(output, op, "act")
        else:
            self.p2p.send(output, op.peer, "act", op.mb, self.step)

    def _op_recv_act(self, op: Op) -> None:
        if self.structured:
            tensors = [t.clone().detach() for t in self._recv_structured(op, "act")]
            for t in tensors:
                t.requires_grad_(t.is_floating_point() and not self.forward_only)
            self.recv_act[op.mb] = unflatten(tensors, self.recv_layouts[(op.peer, "act")])
            return
        t = self.p2p.recv(self.act_spec, op.peer, "act", op.mb, self.step)
        t.requires_grad_(t.is_floating_point() and not self.forward_only)
        self.recv_act[op.mb] = t

    def _op_send_grad(self, op: Op) -> None:
        grad = self.send_grad.pop(op.mb)
        if self.structured:
            self._send_structured(grad, op, "grad")
        else:
            self.p2p.send(grad, op.peer, "grad", op.mb, self.step)

    def _op_recv_grad(self, op: Op) -> None:
        if self.structured:
            self.recv_grad[op.mb] = self._recv_structured(op, "grad")
        else:
            self.recv_grad[op.mb] = self.p2p.recv(self.act_spec, op.peer, "grad", op.mb, self.step)

    def _op_send_labels(self, op: Op) -> None:
        labels = self.labels.pop(op.mb)
        if self.structured:
            self._send_structured(labels, op, "labels")
        else:
            self.p2p.send(labels, op.peer, "labels", op.mb, self.step)

    def _op_recv_labels(self, op: Op) -> None:
        if self.structured:
            self.labels[op.mb] = unflatten(self._recv_structured(op, "labels"), self.recv_layouts[(op.peer, "labels")])
        else:
            self.labels[op.mb] = self.p2p.recv(self.label_spec, op.peer, "labels", op.mb, self.step)

    def _send_structured(self, payload, op: Op, kind: str) -> None:
        tensors, layout = flatten(payload)
        agreed = self.send_layouts.get((op.peer, kind))
        if agreed is None or layout.key() != agreed.key():
            raise BoundaryMismatch(
                f"rank {self.rank}: microbatch {op.mb}'s {kind} to rank {op.peer} is {layout.describe()}, but the "
                f"boundary was agreed as {agreed.describe() if agreed else 'nothing'}; shapes must stay fixed "
                f"between boundary discoveries (after a shape change call engine.reset_activation_shape() on every "
                f"rank, as with stock DeepSpeed)")
        send_payload(self.p2p, tensors, op.peer, kind, op.mb, self.step)

    def _recv_structured(self, op: Op, kind: str) -> list[torch.Tensor]:
        return recv_payload(self.p2p, self.recv_layouts[(op.peer, kind)], op.peer, kind, op.mb, self.step)

    def _op_send_batch(self, op: Op) -> None:
        send_payload(self.p2p, self.handler.batch_tensors(op.mb), op.peer, "batch", op.mb, self.step)

    def _op_recv_batch(self, op: Op) -> None:
        layout = self.recv_layouts.get((op.peer, "batch"))
        if layout is None:
            raise RuntimeError(f"rank {self.rank}: no agreed batch layout from rank {op.peer} (run the boundary "
                               f"handshake before a carry_batch program)")
        self.handler.receive_batch(op.mb, recv_payload(self.p2p, layout, op.peer, "batch", op.mb, self.step), layout)
        self.labels[op.mb] = None  # the labels travel inside the batch; the handler's loss reads them there


# Every op kind has a method; checked at import so a new kind cannot be silently ignored.
for _kind in (LOAD, FWD, BWD, SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD, SEND_LABELS, RECV_LABELS, SEND_BATCH,
              RECV_BATCH):
    assert hasattr(ProgramExecutor, f"_op_{_kind}"), _kind
