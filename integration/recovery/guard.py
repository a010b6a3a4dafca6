"""The per-process recovery state a backend's engine consults (:class:`StepGuard`, survives engine
rebuilds) and the end of a fault-tolerant step shared by every backend (:func:`commit_step`).

Backend-neutral: the DeepSpeed and megatron-core fault-tolerant backends both use it, so neither
imports the other's framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .commit import StepCommit
from .detect import FailureMonitor, PeerFailure, all_reduce
from .inject import FailureInjector


@dataclass
class StepGuard:
    """The per-process recovery state the engine consults; survives engine rebuilds."""

    monitor: FailureMonitor
    commit: StepCommit
    generation: int
    injector: FailureInjector | None = None
    last_grad_norm: float | None = None        # this stage's gradient L2 norm, last committed step
    applied_steps: list[int] = field(default_factory=list)  # steps this process applied (audit)
    last_loss: float | None = None
    home: Any = None  # HomeMirror when recovery.home_replica is on
    straggler: Any = None  # inject.Straggler when recovery.straggler is set (tests, benchmarks)



def commit_step(guard: StepGuard, step: int, grads: list[torch.Tensor], visited: bool, clip: float, norm_group: Any,
                loss_sum: float, loss_count: int, who: str,
                before_mirror: Callable[[], None] | None = None) -> float:
    """The end of a fault-tolerant step, the same for every backend; returns the step's mean loss.

    Before the vote: the global gradient-norm all-reduce (when clipping) over ``norm_group`` and
    the loss all-reduce, failure-aware, and the home mirror's gradient exchange (so a committed
    step is always in the holders' hands). Then the store vote: an aborted step raises
    :class:`PeerFailure` with nothing applied. After a commit nothing talks to another rank:
    ``grads`` are clipped in place, the mirror steps, and the guard records the step; the caller
    runs its optimizer step (which must hold no collective). ``before_mirror`` prepares what the
    mirror reads (megatron: ``param.grad`` from DDP's ``main_grad``).
    """
    sq = sum(float(t.double().pow(2).sum()) for t in grads)
    total_norm = None
    if clip > 0:
        t = torch.tensor([sq], dtype=torch.float64)
        all_reduce(t, guard.monitor, "gradient-norm all-reduce", group=norm_group)
        total_norm = math.sqrt(float(t.item()))
    stats = torch.tensor([loss_sum, float(loss_count)], dtype=torch.float64)
    all_reduce(stats, guard.monitor, "loss all-reduce")
    coef = clip / (total_norm + 1e-6) if total_norm is not None and total_norm > clip else None
    if guard.home is not None:
        if before_mirror is not None:
            before_mirror()
        guard.home.exchange_gradients(step, coef)
    if not guard.commit.decide(guard.generation, step):
        raise PeerFailure(f"{who}: step {step} aborted (a failure was recorded before every rank was ready to "
                          f"step)", guard.monitor.latest)
    if coef is not None:
        for t in grads:
            t.mul_(coef)
    if guard.home is not None:
        guard.home.apply_committed(step)
    if visited:
        guard.last_grad_norm = math.sqrt(sq)
    loss = float(stats[0] / stats[1])
    guard.last_loss = loss
    guard.applied_steps.append(step)
    return loss
