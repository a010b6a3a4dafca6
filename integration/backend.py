"""The contract between the main job (``integration/train.py``) and a training backend.

A backend owns the model, optimizer and engine of its framework (DeepSpeed or megatron-core) and
runs one iteration of the current RoutePlan per ``train_step``. The main job owns config,
data, plan building, logging and the progress bar, so both backends report the same metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .plan.routeplan import RoutePlan

#: (step, home replica, index within that home's microbatches) -> (tokens, labels), both [b, s] int64.
BatchSource = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepResult:
    loss: float  # mean training loss over every microbatch of the iteration (same value on every rank)
    lr: float


class TrainingBackend(Protocol):
    """What ``train.py`` calls; see :mod:`integration.backends.deepspeed.backend` for the reference implementation."""

    plan: RoutePlan

    def train_step(self, step: int, batch_source: BatchSource) -> StepResult:
        """Run one iteration of ``plan`` on the microbatches ``batch_source`` gives for ``step``."""

    def validation_loss(self, batch_source: BatchSource, microbatches_per_home: int) -> float:
        """Mean loss of the FULL model (all stages in order), forward only, same value on every rank."""

    def stage_of_rank(self, rank: int) -> tuple[int, int]:
        """(pipeline stage, replica) of a global rank."""
