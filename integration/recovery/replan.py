"""Re-plan while training: survivors continue on a plan for the ranks they have (``routing.replan``).

With ``routing.replan.enabled=true`` and an agent that delays replacements (``python -m launch.agent
--respawn-delay S``, or no replacement at all for a while), a lost rank does not stall the job:

1. the agent marks the rank *absent* in the store and records the failure with the absent set
   (:func:`integration.recovery.detect.record_failure`);
2. every survivor computes the same group for that generation (:meth:`Replanner.members_of`): the
   ranks that still have a process, when :func:`integration.plan.reroute.route_around` can route
   the job's plan around the absent ones (and the survivors' grid is one DeepSpeed can run: the
   same replica count on every live stage); otherwise every rank (the survivors wait for the
   replacement, as without re-planning, and an event says why);
3. the survivors form the smaller gloo group (group ranks = positions among the members), the
   backend takes the compact plan's pipeline (its stage count and program), and the lowest member
   publishes the plan through the store; every member validates it (the rules, its own grid, the
   digest of the plan it computed itself) and acknowledges it in a failure-aware store exchange;
   they switch at the step they all resume at. A death during the switch raises
   :class:`PeerFailure` there and is recovered like any other failure;
4. when the agent starts the delayed replacements it records a ``join`` generation: the survivors
   abort the step in flight (it is replayed), re-form the full group with the replacements, the
   recovery ladder rebuilds the lost stages from their neighbours (CheckFree), and the same
   agreement switches back to the job's own plan.

Every switch is one ``replan`` event (reason, predicted gain, measured gain), emitted once
``measure_steps`` steps ran on the new plan. Predicted: the simulator's iteration time of the
previous plan over the new one (:func:`integration.plan.reroute.predicted_iteration`, uniform
nodes); measured: the mean step time of the last steps on the previous plan over the first ones
on the new plan (> 1: faster).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..plan.reroute import RerouteError, route_around, predicted_iteration
from ..plan.routeplan import RoutePlan
from ..plan.rules import Rules, check_fits_grid
from ..runtime.program import Program, compile_plan
from .detect import failures_between
from .events import EventLog
from .rendezvous import store_all_gather


@dataclass
class ReplanSettings:
    """``routing.replan``: validated by :class:`integration.schema.ReplanConfig` (drift keys:
    :mod:`integration.recovery.drift`)."""

    enabled: bool = False
    measure_steps: int = 3  # steps on each side of a switch for its measured gain
    drift: bool = False
    window: int = 5
    drift_threshold: float = 0.25
    drift_windows: int = 2
    gain_threshold: float = 0.1
    cooldown: int = 10
    ewma: float = 0.5
    planner_budget_s: float = 2.0
    check_every: int = 0


BASE_KEY = "replan/base"  # the full group's plan after a drift switch (a joiner adopts it)


@dataclass
class Layout:
    """What a generation's group runs: its members, plan (compiled), stage count and rules."""

    members: list[int]
    program: Program
    rules: Rules
    reason: str
    predicted_s: float
    details: dict

    @property
    def plan(self) -> RoutePlan:
        return self.program.plan

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    @property
    def digest(self) -> str:
        return plan_digest(self.plan)


def route_change(new: RoutePlan, old: RoutePlan) -> dict:
    """The node sequences of a switch, for its event: ``routes`` (new) and ``from_routes`` (old)."""
    return {"routes": [list(r.nodes) for r in new.routes], "from_routes": [list(r.nodes) for r in old.routes]}


def plan_digest(plan: RoutePlan) -> str:
    return hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()


class Replanner:
    """One rank's side of re-planning (see the module docstring); deterministic on every rank."""

    def __init__(self, program: Program, rules: Rules, settings: ReplanSettings, world_size: int, rank: int,
                 max_inflight: int | None, events: EventLog, reroute: bool = True):
        self.rules, self.settings, self.world_size, self.rank = rules, settings, world_size, rank
        self.max_inflight = max_inflight
        # The backend's program form (megatron's carries the batch) and whether the survivors may run a
        # smaller group (DeepSpeed's topology only; megatron keeps its grid: drift re-plans only).
        self.carry_batch, self.reroute = program.carry_batch, reroute
        self.events = events
        everyone = list(range(world_size))
        self.full = Layout(everyone, program, rules, "the job's own plan", predicted_iteration(program.plan), {})
        self._members: dict[int, list[int]] = {0: everyone}
        self._refused: dict[int, str] = {}
        self._layouts: dict[tuple[int, ...], Layout] = {tuple(everyone): self.full}
        self.current = self.full
        self.step_times: deque[float] = deque(maxlen=settings.measure_steps)
        self.pending: dict | None = None  # a switch waiting for its measured gain
        self.switches: list[dict] = []

    # ------------------------------------------------------------------ who is in a generation's group
    def members_of(self, store: Any, generation: int) -> list[int]:
        """The ranks of ``generation``'s group: the ranks with a process when the job's plan can be
        routed around the absent ones, else every rank (then the group waits for the replacements)."""
        if generation not in self._members:
            self.sync_base(store)
            record = failures_between(store, generation - 1, generation)[0]
            absent = sorted(set(record.absent))
            members = list(range(self.world_size))
            if absent:
                try:
                    self._layout([r for r in members if r not in absent])
                    members = [r for r in members if r not in absent]
                except RerouteError as exc:
                    self._refused[generation] = str(exc)
            self._members[generation] = members
        return self._members[generation]

    def refused(self, generation: int) -> str | None:
        """Why ``generation`` waits for replacements instead of re-planning (None: it did not refuse)."""
        return self._refused.get(generation)

    def _layout(self, members: list[int]) -> Layout:
        key = tuple(members)
        if key not in self._layouts:
            lost = [r for r in range(self.world_size) if r not in members]
            if not self.reroute:
                raise RerouteError(f"reroute: rank(s) {lost} lost; the survivors' smaller group is built for "
                                   f"backend=deepspeed only: waiting for the replacement(s)")
            rr = route_around(self.full.plan, lost, self.rules)
            if not rr.ok:
                raise RerouteError("reroute: the survivors' plan breaks " + "; ".join(str(v) for v in rr.violations))
            counts = {len(reps) for reps in rr.plan.stage_nodes}
            if len(counts) != 1:
                raise RerouteError(f"reroute: the survivors' stages have {sorted(counts)} replicas; DeepSpeed's grid "
                                   f"needs the same count on every stage")
            what = (f"routes skip stage(s) {list(rr.dead_stages)}" if rr.dead_stages else "") + \
                   (f"{', ' if rr.dead_stages else ''}{rr.moved_hops} hop(s) moved to surviving replicas"
                    if rr.moved_hops else "")
            self._layouts[key] = Layout(members, self.compile(rr.plan), rr.rules,
                                        f"rank(s) {lost} lost, no replacement yet: {what}",
                                        predicted_iteration(rr.plan),
                                        {"dead_stages": list(rr.dead_stages), "moved_hops": rr.moved_hops,
                                         "dropped_hops": rr.dropped_hops, "relaxed": rr.relaxed,
                                         "node_map": {str(k): v for k, v in rr.node_map.items()}})
        return self._layouts[key]

    def compile(self, plan: RoutePlan) -> Program:
        """``plan`` as the backend runs it (the job's ``max_inflight``, megatron's batch messages)."""
        return compile_plan(plan, self.max_inflight, carry_batch=self.carry_batch)

    def layout_of(self, members: list[int]) -> Layout:
        return self._layout(sorted(members))

    # ------------------------------------------------------------------ the full group's plan (drift)
    def adopt_base(self, program: Program, reason: str, details: dict) -> Layout:
        """From now on the full group runs ``program`` (a drift re-plan of the same grid): the plan
        a lost rank is routed around and the plan a join switches back to. (Its ``predicted_s`` stays
        in uniform-node units, comparable with the survivors' plans; measured seconds go in ``details``.)"""
        everyone = list(range(self.world_size))
        layout = Layout(everyone, program, self.rules, reason, predicted_iteration(program.plan), details)
        self.full = layout
        self._layouts = {tuple(everyone): layout}
        return layout

    def publish_base(self, store: Any, plan: RoutePlan) -> None:
        """The planning rank records the full group's new plan, before the switch is acknowledged:
        if a rank dies during the switch, every member of the next generation (replacements too)
        adopts it in :meth:`sync_base`, so the group runs one plan whichever ranks switched."""
        store.set(BASE_KEY, plan.to_json(indent=None))

    def sync_base(self, store: Any) -> None:
        """Adopt the full group's plan published by a drift switch, if it is not the one held here."""
        if not store.check([BASE_KEY]):
            return
        plan = RoutePlan.from_json(store.get(BASE_KEY).decode())
        if plan_digest(plan) != self.full.digest:
            self.adopt_base(self.compile(plan), "a drift re-plan of the full group", route_change(plan, self.full.plan))

    # ------------------------------------------------------------------ agreement
    def agree(self, store: Any, generation: int, members: list[int], monitor: Any, timeout_s: float,
              resume_step: int) -> tuple[Layout, list[str]]:
        """The lowest member publishes the generation's plan, every member validates it and all
        acknowledge (failure-aware store exchange); returns the layout and every member's problems
        (empty: agreed). A failure anywhere raises :class:`PeerFailure`."""
        self.sync_base(store)
        layout = self.layout_of(members)
        key = f"replan/g{generation}"
        me = members.index(self.rank)
        if me == 0:
            store.set(f"{key}/plan", layout.plan.to_json(indent=None))
        deadline = time.time() + timeout_s
        while not store.check([f"{key}/plan"]):
            monitor.check(f"re-plan agreement {key}")
            if time.time() > deadline:
                raise TimeoutError(f"re-plan: member {members[0]} did not publish {key}/plan within {timeout_s:.0f} s")
            time.sleep(0.01)
        problems = self._validate(store.get(f"{key}/plan").decode(), layout)
        acks = store_all_gather(store, f"{key}/ack", {"rank": self.rank, "problems": problems}, me, len(members),
                                monitor, timeout_s)
        bad = [f"rank {a['rank']}: {p}" for a in acks for p in a["problems"]]
        if not bad:
            self._switch(layout, generation, resume_step)
        return layout, bad

    def _validate(self, text: str, layout: Layout) -> list[str]:
        """This member's check of the published plan: parses, fits the group's grid, keeps its rules,
        and is the plan this member computed from the same failure records."""
        try:
            plan = RoutePlan.from_json(text)
            full = self.full.plan
            check_fits_grid(plan, layout.plan.stage_nodes, len(full.routes) // len(full.stage_nodes[0]), layout.rules,
                            "DeepSpeed", "the survivors' group ranks", "train.microbatches")
        except ValueError as exc:
            return [str(exc)[:500]]
        if plan_digest(plan) != layout.digest:
            return [f"the published plan differs from the one this rank computed ({plan_digest(plan)[:12]} vs "
                    f"{layout.digest[:12]}): the ranks do not share config or failure records"]
        return []

    # ------------------------------------------------------------------ events
    def _switch(self, layout: Layout, generation: int, step: int, predicted_gain: float | None = None,
                trigger: str = "membership") -> None:
        """Record a switch to ``layout`` at ``step`` (its event waits for the measured steps).
        ``predicted_gain``: given by the drift re-plan (measured costs); else the uniform-node one."""
        if layout.digest == self.current.digest:
            return
        if self.pending is not None:
            self._emit()
        before = sum(self.step_times) / len(self.step_times) if self.step_times else None
        joined = sorted(set(range(self.world_size)) - set(self.current.members))
        # Back to the full group after a join; a full group that only changed plan (a drift plan adopted
        # after a failure during its switch) keeps that plan's reason.
        reason = layout.reason if layout is not self.full or trigger != "membership" or not joined else \
            f"replacement(s) for {joined} joined and were rebuilt: back to the job's own plan"
        self.pending = {"reason": reason, "trigger": trigger, "generation": generation, "at_step": step,
                        "from_plan": self.current.digest[:16], "to_plan": layout.digest[:16],
                        "members": layout.members, "stages": layout.num_stages,
                        "predicted_iteration_w": round(layout.predicted_s, 4),
                        "predicted_gain": predicted_gain if predicted_gain is not None
                        else self.current.predicted_s / layout.predicted_s,
                        "step_s_before": before, "after": [], **layout.details}
        self.current = layout
        self.step_times.clear()

    def observe_step(self, seconds: float) -> None:
        """A committed step took ``seconds`` (engine time, no recovery)."""
        self.step_times.append(seconds)
        if self.pending is not None:
            self.pending["after"].append(seconds)
            if len(self.pending["after"]) >= self.settings.measure_steps:
                self._emit()

    def flush(self) -> None:
        """Emit a switch still waiting for its measurement (end of the run, or the next switch)."""
        if self.pending is not None:
            self._emit()

    def _emit(self) -> None:
        p, self.pending = self.pending, None
        after = p.pop("after")
        mean_after = sum(after) / len(after) if after else None
        before = p["step_s_before"]
        rec = {**p, "step_s_after": mean_after, "measured_steps": len(after),
               "measured_gain": before / mean_after if before and mean_after else None}
        self.switches.append(rec)
        self.events.emit("replan", step=p["at_step"], **rec)
