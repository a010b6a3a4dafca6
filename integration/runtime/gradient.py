"""The gradient rule and the unvisited-stage rule, in one place for every backend (no torch).

* ``visited`` (default, SkipPipe's distributed trainer): each stage's gradient is the mean over the
  microbatches that visited it this iteration (all replicas together). Frameworks average over all
  microbatches, so a visited stage's reduced gradient is multiplied by total / visits.
* ``all`` (a stock pipeline): the mean over all microbatches, visited or not (factor 1).

A stage no microbatch visited does not move at all: no reduction, no optimizer update (Adam's
momentum and weight decay would change it); counters and the LR schedule still advance.
"""

from __future__ import annotations

GRADIENT_RULES = ("visited", "all")


def stage_moves(stage_visits: int) -> bool:
    """Whether a stage with ``stage_visits`` visits this iteration reduces gradients and steps."""
    return stage_visits > 0


def check_gradient_rule(rule: str) -> None:
    if rule not in GRADIENT_RULES:
        raise ValueError(f"routing.gradient_rule: {rule!r} is not one of {GRADIENT_RULES}")


def gradient_factor(rule: str, total_microbatches: int, stage_visits: int) -> float:
    """What multiplies a visited stage's framework-averaged gradient under ``rule`` (1.0: leave it)."""
    check_gradient_rule(rule)
    if rule == "all" or not stage_moves(stage_visits):
        return 1.0
    return total_microbatches / stage_visits
