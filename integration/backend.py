"""The contract between the main job (``integration/train.py``) and a training backend.

A backend owns the model, optimizer and engine of its framework (DeepSpeed or megatron-core) and
runs one iteration of the current RoutePlan per ``train_step``. The main job owns config,
data, plan building, logging and the progress bar, so both backends report the same metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from abc import ABC, abstractmethod
from typing import Callable

import torch

from .plan.routeplan import RoutePlan
from .runtime.program import Program

#: (step, home replica, index within that home's microbatches) -> (tokens, labels), both [b, s] int64.
BatchSource = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepResult:
    loss: float  # mean training loss over every microbatch of the iteration (same value on every rank)
    lr: float


class TrainingBackend(ABC):
    """What the main job calls; both backends (and their fault-tolerant variants) implement it.

    Reference implementation: :class:`integration.backends.deepspeed.backend.DeepSpeedBackend`.
    """

    plan: RoutePlan

    @abstractmethod
    def set_plan(self, plan: RoutePlan | Program) -> None:
        """Run ``plan`` from the next :meth:`train_step` on (``routing.resample_every``); same rank grid.
        The main job hands a :class:`Program` (compiled once, by the trainer); a plan is compiled here."""

    @abstractmethod
    def train_step(self, step: int, batch_source: BatchSource) -> StepResult:
        """Run one iteration of ``plan`` on the microbatches ``batch_source`` gives for ``step``."""

    @abstractmethod
    def validation_loss(self, batch_source: BatchSource, microbatches_per_home: int) -> float:
        """Mean loss of the FULL model (all stages in order), forward only, same value on every rank."""
