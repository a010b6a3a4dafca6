"""Failure injection: real SIGKILL / SIGSTOP of the own process at a scheduled point, or at random.

A :class:`FailureInjector` is called by the training loop and the executor at fixed points
(``at(step, phase)``: ``phase`` is ``forward`` or ``backward`` for op-level points, ``boundary``
between iterations, ``regroup`` on a survivor inside a recovery, after the generation settled and before the new group
forms; ``recovery`` on a survivor inside a recovery that resumes at ``step``, after
the new group formed and before the exchange: a failure during recovery; ``validation`` at the start
of a validation pass, ``step`` being the number of steps done, so ``train.steps`` is the final one;
``startup`` before the first group forms, with ``step=0``; ``construction`` inside the backend's
construction on the first group, with ``step=0``: DeepSpeed between the PipelineModule's group
creation and the engine build, megatron-core before its groups are created); ``final`` before the
final barrier (after the final validation and the summary; ``step=train.steps``) and ``exit``
right after it (the job is complete: nothing to recover); ``drift`` inside a drift re-plan's
agreement (``routing.replan.drift``), after the decision was published and before the members
acknowledge it, at a window boundary where a re-plan was triggered (``step`` = that boundary).
When a scheduled or
random failure matches this rank, the process signals
itself: ``kill`` sends SIGKILL (the process is gone, exactly like a lost node: no cleanup, no
exception, sockets reset by the kernel) and ``hang`` sends SIGSTOP (the process freezes with its
sockets open, like a stuck node: only heartbeats can tell).

Schedules are strings so they pass through Hydra overrides unchanged:
``"kill:stage=2,step=3,phase=forward;hang:stage=1,replica=0,step=5"``. ``gen=K`` pins an entry to
generation K instead of its step's round, e.g. a second failure in the replay of the same step
(``kill:stage=2,step=3,phase=backward;kill:stage=4,step=3,phase=forward,gen=1``).
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass
from typing import Callable

from .rebuild import per_iteration_probability

PHASES = ("forward", "backward", "boundary", "recovery", "validation", "startup", "construction", "final", "exit",
          "regroup", "drift")
MODES = ("kill", "hang")


@dataclass(frozen=True)
class ScheduledFailure:
    """Fail (``mode``) the rank holding ``stage`` (replica ``replica``, any when None) at ``step`` in ``phase``."""

    stage: int
    step: int
    phase: str = "forward"
    mode: str = "kill"
    replica: int | None = 0
    after_ops: int = 0  # fire at the (after_ops+1)-th matching point of that step's attempt, e.g. mid-phase
    gen: int | None = None  # fire in this generation (None: the generation of its step's round)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"recovery.inject: phase {self.phase!r} is not one of {PHASES}")
        if self.mode not in MODES:
            raise ValueError(f"recovery.inject: mode {self.mode!r} is not one of {MODES}")


def parse_schedule(text: str | None) -> list[ScheduledFailure]:
    """Parse ``"kill:stage=2,step=3,phase=backward;hang:stage=1,step=5"`` (empty -> no failures)."""
    out: list[ScheduledFailure] = []
    for item in (text or "").split(";"):
        item = item.strip()
        if not item:
            continue
        mode, _, rest = item.partition(":")
        fields: dict[str, object] = {"mode": mode.strip()}
        for kv in rest.split(","):
            if not kv.strip():
                continue
            key, sep, value = kv.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in ("stage", "step", "phase", "replica", "after_ops", "gen"):
                raise ValueError(f"recovery.inject: cannot read {kv!r} in {item!r}; use mode:stage=S,step=T"
                                 f"[,phase={'|'.join(PHASES)}][,replica=R][,after_ops=N][,gen=K]")
            fields[key] = value if key == "phase" else (None if value in ("any", "*") else int(value))
        if "stage" not in fields or "step" not in fields:
            raise ValueError(f"recovery.inject: {item!r} needs stage= and step=")
        out.append(ScheduledFailure(**fields))  # type: ignore[arg-type]
    return out


class FailureInjector:
    """Decides, at each call of :meth:`at`, whether this rank dies now, and makes it so.

    ``generation`` guards replays: entries are grouped by step into rounds (all entries of one step
    form one round, e.g. two adjacent stages killed at once); round k fires only while this
    process's group is in generation k (k failures recorded before it). Each round records at
    least one failure, so the replacement (or the replayed step) does not die again at the same
    point, while later rounds still fire in later generations (a soak of many failures). The
    session sets :attr:`generation` on every regroup. ``active=False`` disables the schedule.
    ``rate_per_hour`` with ``iteration_seconds`` adds random failures at iteration boundaries
    (p_it from :func:`integration.recovery.rebuild.per_iteration_probability`), drawn from a
    generator seeded by (seed, step), so every rank draws the same numbers, and applied to this
    rank's stage only (the home stage only with ``random_home``, i.e. when it is replicated).
    """

    def __init__(self, stage: int, replica: int, schedule: list[ScheduledFailure] | None = None,
                 rate_per_hour: float = 0.0, iteration_seconds: float = 0.0, seed: int = 0,
                 num_stages: int | None = None, active: bool = True,
                 signal_self: Callable[[int], None] | None = None, generation: int = 0,
                 random_home: bool = False):
        self.stage = stage
        self.replica = replica
        self.schedule = list(schedule or [])
        self.p_iteration = per_iteration_probability(rate_per_hour, iteration_seconds) if rate_per_hour else 0.0
        self.seed = seed
        self.num_stages = num_stages
        self.active = active
        self.generation = generation
        # Random failures spare the home stage unless it can be rebuilt exactly (CheckFree+ home
        # replication): the spec's failure model puts E and H on a home that never fails.
        self.random_home = random_home
        steps = sorted({f.step for f in self.schedule if f.gen is None})
        pinned = {f.gen for f in self.schedule if f.gen is not None}
        # Round k is fired in generation k + (failures a round produces beyond one, before it),
        # skipping the generations that pinned (``gen=``) entries take.
        self._round_generation: dict[int, int] = {}
        g = 0
        for st in steps:
            while g in pinned:
                g += 1
            self._round_generation[st] = g
            g += len([f for f in self.schedule if f.step == st and f.gen is None])
        self._signal = signal_self or (lambda sig: os.kill(os.getpid(), sig))
        self._seen: dict[tuple[int, str, int], int] = {}

    def _mine(self, f: ScheduledFailure) -> bool:
        return f.stage == self.stage and (f.replica is None or f.replica == self.replica)

    def at(self, step: int, phase: str) -> None:
        """Call at each injection point; does not return when this rank is to fail now."""
        if not self.active:
            return
        # Counted per generation: ``after_ops`` points into one attempt of the step (a survivor that
        # replays it in the next generation counts from 0 again, as a replacement does).
        key = (step, phase, self.generation)
        n = self._seen.get(key, 0)
        self._seen[key] = n + 1
        for f in self.schedule:
            if (self._mine(f) and f.step == step and f.phase == phase and f.after_ops == n
                    and (self._round_generation[f.step] if f.gen is None else f.gen) == self.generation):
                self.fire(f.mode)
        if phase == "boundary" and self.p_iteration > 0 and n == 0 and (self.stage > 0 or self.random_home):
            rng = random.Random(f"{self.seed}:{step}:{self.stage}")
            if rng.random() < self.p_iteration:
                self.fire("kill")

    def fire(self, mode: str) -> None:
        """SIGKILL (``kill``) or SIGSTOP (``hang``) this process."""
        self._signal(signal.SIGKILL if mode == "kill" else signal.SIGSTOP)


@dataclass(frozen=True)
class Straggler:
    """``recovery.straggler``: rank ``rank``'s compute ops take ``factor`` times as long from step ``step``
    (an added sleep of ``(factor - 1)`` x the op's own time: a slower node, not a failure)."""

    rank: int
    factor: float
    step: int = 0

    def delay(self, step: int, op_seconds: float) -> float:
        """Seconds the straggling rank sleeps after a compute op of ``op_seconds`` at ``step``."""
        return (self.factor - 1.0) * op_seconds if step >= self.step else 0.0


def parse_straggler(text: str | None) -> Straggler | None:
    """Parse ``"rank=3,factor=3,step=10"`` (empty -> None)."""
    if not (text or "").strip():
        return None
    fields: dict[str, float] = {}
    for kv in text.split(","):
        key, sep, value = kv.partition("=")
        key = key.strip()
        if not sep or key not in ("rank", "factor", "step"):
            raise ValueError(f"recovery.straggler: cannot read {kv.strip()!r} in {text!r}; use rank=R,factor=F[,step=K]")
        try:
            fields[key] = float(value) if key == "factor" else int(value)
        except ValueError:
            raise ValueError(f"recovery.straggler: {key}={value.strip()!r} is not a number") from None
    if "rank" not in fields or "factor" not in fields:
        raise ValueError(f"recovery.straggler: {text!r} needs rank= and factor=")
    if fields["factor"] < 1 or fields["rank"] < 0 or fields.get("step", 0) < 0:
        raise ValueError(f"recovery.straggler: {text!r}: factor must be >= 1, rank and step >= 0")
    return Straggler(int(fields["rank"]), float(fields["factor"]), int(fields.get("step", 0)))
