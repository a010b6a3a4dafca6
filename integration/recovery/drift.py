"""Re-plan on measured drift (``routing.replan.drift``): a slowed link or a straggler moves the routes.

Every rank's executor records each op of an iteration (``ProgramExecutor.trace``, always on). With
``routing.replan.drift=true``, at every ``window``-th committed step (by global step, so every rank
of the group stops at the same one):

1. every member publishes its traces and step times of the window through the store
   (failure-aware all-gather, ``drift/g<G>/s<step>``); every member folds all of them into the same
   running estimates (:class:`integration.plan.measured.MeasuredCosts`: an EWMA per directed link
   and per node's forward / loss / backward), so the next steps are computed alike everywhere;
2. drift: the lowest member's median step time of the window against the current plan's
   *predicted* iteration (the measured median of the first window after the start or a kept
   decision; after a switch the calibrated prediction of the new plan, see below). More than
   ``drift_threshold`` slower for ``drift_windows`` windows in a row, outside a ``cooldown`` after
   the start or the last decision, triggers a re-plan; more than ``drift_threshold`` faster only
   resets the prediction to the measured iteration. With ``check_every`` > 0 the planner also runs
   that many windows after the last decision without any drift (a better plan for the same costs);
3. the lowest member plans routes for the same grid on the measured costs
   (:meth:`MeasuredCosts.plan`) and publishes the decision: switch when the prediction of the
   current plan over the new one exceeds ``1 + gain_threshold``, else keep. A switch also records
   the new plan as the full group's base (``replan/base``) before anyone acknowledges;
4. every member checks the published plan (parses, fits its grid and the job's rules) and the
   predicted gain against its own estimates (they are the same numbers: a mismatch means the ranks
   disagree), all acknowledge (store all-gather), and all switch before the next step
   (``backend.set_plan``). A member dying anywhere in 1-4 raises :class:`PeerFailure`: the step is
   applied already, the ordinary recovery follows, and every member of the next generation adopts
   the published base (:meth:`Replanner.sync_base`), so they run one plan whichever ranks switched;
5. the switch is a ``replan`` event (``trigger: drift``) with the reason, the predicted gain and,
   ``measure_steps`` steps later, the measured gain.

Predicted iterations (seconds) are the replay of the job's own programs on the measured costs
(:meth:`MeasuredCosts.predict`: receives as gloo does them, one at a time) plus what it does not
model (the all-reduce, the commit vote, the optimizer step): the last window's measured iteration
minus the replay of the plan that ran, the same for both plans; after a switch the new plan's
predicted iteration is what drift is measured against. The estimates restart with every new
group (a replacement has none of the survivors' windows, and every member must hold the same
numbers). Re-planning runs only while the group has every rank (a survivors' group runs part 1's
plan around the lost ranks). Both backends: megatron-core keeps its grid, so there only drift
re-plans run (a lost rank waits for its replacement).
"""

from __future__ import annotations

import os
import pickle
import statistics
import time
from pathlib import Path
from typing import Any

from ..plan.measured import MeasuredCosts, link_uses
from ..plan.routeplan import RoutePlan
from ..plan.rules import check_fits_grid
from .rendezvous import store_all_gather
from .replan import Replanner, ReplanSettings, plan_digest, route_change


class DriftReplanner:
    """One rank's side of re-planning on measured drift (see the module docstring)."""

    def __init__(self, replan: Replanner, settings: ReplanSettings, microbatches_per_home: int, seed: int = 0):
        self.replan, self.settings = replan, settings
        self.m = microbatches_per_home
        self.seed = seed
        self.costs = self._fresh_costs()
        self._traces: list[list[tuple]] = []
        self._steps: list[float] = []
        self.expected_s: float | None = None  # the current plan's predicted iteration (seconds)
        self.drifting = 0
        self.quiet_until = settings.cooldown
        self.decided_at = 0  # the step of the last decision or new group (check_every counts from it)
        self.generation: int | None = None
        self.decisions: list[dict] = []  # every triggered re-plan (switched or kept), for the summary

    def _fresh_costs(self) -> MeasuredCosts:
        return MeasuredCosts(self.replan.world_size, self.settings.ewma, max_inflight=self.replan.max_inflight,
                             carry_batch=self.replan.carry_batch)

    # ------------------------------------------------------------------ per step
    def observe(self, seconds: float, trace: list[tuple], generation: int, step: int) -> None:
        """A committed step (``step`` = global steps after it) took ``seconds``; ``trace`` is its ops."""
        if generation != self.generation:  # a new group: the estimates, window and baseline restart
            # (a replacement has none of the survivors' windows: every member must hold the same numbers)
            self.generation = generation
            self.costs = self._fresh_costs()
            self._traces, self._steps = [], []
            self.expected_s, self.drifting = None, 0
            self.quiet_until = max(self.quiet_until, step + self.settings.cooldown)
            self.decided_at = step
        self._traces.append([(k, mb, part, peer, a, b) for k, mb, part, peer, a, b in trace])
        self._steps.append(seconds)

    def due(self, step: int) -> bool:
        return step % self.settings.window == 0

    # ------------------------------------------------------------------ the window boundary
    def boundary(self, session: Any) -> None:
        """At a window's last committed step, on every member (collective through the store)."""
        members = session.members
        traces, steps = self._traces, self._steps
        self._traces, self._steps = [], []
        if len(members) != self.replan.world_size:
            return  # the survivors run part 1's plan; drift is measured on the full group only
        t0 = time.time()
        store, monitor, timeout = session.store, session.monitor, session.settings.rendezvous_timeout_s
        gen, step = session.guard.generation, session.engine.global_steps
        key = f"drift/g{gen}/s{step}"
        me = members.index(session.ctx.rank)
        infos = store_all_gather(store, key, {"rank": session.ctx.rank, "traces": traces, "steps": steps},
                                 me, len(members), monitor, timeout)
        dump = os.environ.get("SKIPFREE_DRIFT_DUMP")  # analysis aid: the window's traces, lowest member
        if dump and me == 0:
            Path(dump).mkdir(parents=True, exist_ok=True)
            (Path(dump) / f"window_g{gen}_s{step}.pkl").write_bytes(pickle.dumps(infos))
        self.costs.update({i["rank"]: i["traces"] for i in infos})
        lead = infos[0]["steps"]
        if not lead:
            return
        measured = statistics.median(lead)
        why = self._detect(step, measured)
        if why is None:
            return
        current = self.replan.current.plan
        if me == 0:
            decision = self._decide(current, step, why, measured)
            if decision["switch"]:
                self.replan.publish_base(store, RoutePlan.from_json(decision["plan"]))
            store.set(f"{key}/decision", pickle.dumps(decision))
        decision = self._wait_decision(store, f"{key}/decision", monitor, timeout)
        if session.guard.injector is not None:  # tests: a death during the switch (recovery.inject phase=drift)
            session.guard.injector.at(step, "drift")
        problems = self._validate(decision, current) if me != 0 else []
        acks = store_all_gather(store, f"{key}/ack", {"rank": session.ctx.rank, "problems": problems}, me,
                                len(members), monitor, timeout)
        bad = [f"rank {a['rank']}: {p}" for a in acks for p in a["problems"]]
        self.quiet_until = step + self.settings.cooldown
        self.decided_at = step
        self.drifting = 0
        record = {k: v for k, v in decision.items() if k != "plan"}
        if bad or not decision["switch"]:
            if bad and me == 0:  # the base published with the decision goes back to the plan everyone runs
                self.replan.publish_base(store, current)
            if bad:
                session.events.emit("replan_refused", step=step, generation=gen, reason="drift re-plan: " +
                                    "; ".join(bad)[:1000])
            self.expected_s = measured  # nothing better: this is what the plan does now
            self.decisions.append({**record, "switched": False, "refused": bad})
            return
        plan = RoutePlan.from_json(decision["plan"])
        program = self.replan.compile(plan)
        session.backend.set_plan(program)
        details = {"measured_iteration_s": measured, "predicted_s_current": decision["predicted_s_current"],
                   "predicted_s_new": decision["predicted_s_new"], "plan_s": decision["plan_s"],
                   "switch_s": time.time() - t0, "window": self.settings.window, "estimates": decision["estimates"],
                   **route_change(plan, current)}
        layout = self.replan.adopt_base(program, decision["reason"], details)
        self.replan._switch(layout, gen, step, predicted_gain=decision["predicted_gain"], trigger="drift")
        self.expected_s = decision["predicted_s_new"]
        self.decisions.append({**record, "switched": True, "switch_s": details["switch_s"]})

    def _detect(self, step: int, measured: float) -> str | None:
        """Why the plan is to be re-planned now, or None (the same answer on every member)."""
        if step < self.quiet_until:
            return None
        if self.expected_s is None:
            self.expected_s = measured
            return None
        ratio = measured / self.expected_s
        if ratio < 1 - self.settings.drift_threshold:
            # Faster than predicted is no reason to move: the prediction becomes what is measured (a
            # re-plan here once followed estimation noise to a slower plan: docs/replan.md, Measured).
            self.expected_s, self.drifting = measured, 0
            return None
        self.drifting = self.drifting + 1 if ratio > 1 + self.settings.drift_threshold else 0
        if self.drifting < self.settings.drift_windows:
            every = self.settings.check_every * self.settings.window
            if every and step - self.decided_at >= every:  # no drift, but maybe a better plan for these costs
                return (f"periodic check: {step - self.decided_at} steps without a decision (check_every="
                        f"{self.settings.check_every} windows; iteration {measured:.3f} s, {ratio:.2f}x the prediction)")
            return None
        return (f"measured drift: iteration {measured:.3f} s against {self.expected_s:.3f} s predicted for the "
                f"current plan ({ratio:.2f}x) for {self.drifting} window(s) of {self.settings.window} steps")

    def _decide(self, current: RoutePlan, step: int, why: str, measured: float) -> dict:
        """The lowest member: routes on the measured costs, and whether they gain enough."""
        t0 = time.time()
        plan = self.costs.plan(current, self.replan.rules, self.m, seed=self.seed + step,
                               budget_s=self.settings.planner_budget_s)
        plan_s = time.time() - t0
        cur, new = self._iterations(current, plan, measured)
        gain = cur / new
        switch = gain > 1 + self.settings.gain_threshold and plan_digest(plan) != plan_digest(current)
        verdict = (f"; a re-plan on the measured costs predicts {gain:.3f}x" +
                   (" -> switch" if switch else f" <= 1 + gain_threshold {self.settings.gain_threshold}: keep"))
        return {"switch": switch, "plan": plan.to_json(indent=None) if switch else None, "reason": why + verdict,
                "predicted_gain": gain, "predicted_s_current": cur, "predicted_s_new": new, "plan_s": plan_s,
                "measured_iteration_s": measured, "at_step": step, "estimates": self.costs.describe()}

    def _iterations(self, current: RoutePlan, plan: RoutePlan, measured: float) -> tuple[float, float]:
        """Predicted iterations (seconds) of ``current`` and ``plan``: the replay on the measured costs
        plus what it does not model (the all-reduce, the commit vote: measured minus the replay of
        ``current``), the same for both plans."""
        cur, new = self.costs.predict(current), self.costs.predict(plan)
        fixed = max(measured - cur, 0.0)
        return cur + fixed, new + fixed

    @staticmethod
    def _wait_decision(store: Any, key: str, monitor: Any, timeout_s: float) -> dict:
        deadline = time.time() + timeout_s
        while not store.check([key]):
            monitor.check(f"drift re-plan decision {key}")
            if time.time() > deadline:
                raise TimeoutError(f"drift re-plan: the planning rank did not publish {key} within {timeout_s:.0f} s")
            time.sleep(0.01)
        return pickle.loads(store.get(key))

    def _validate(self, decision: dict, current: RoutePlan) -> list[str]:
        """A member's check of the published decision against its own estimates and grid."""
        if not decision["switch"]:
            return []
        try:
            plan = RoutePlan.from_json(decision["plan"])
            check_fits_grid(plan, current.stage_nodes, self.m, self.replan.rules, "DeepSpeed", "the job's ranks",
                            "train.microbatches")
        except ValueError as exc:
            return [str(exc)[:500]]
        cur, new = self._iterations(current, plan, decision["measured_iteration_s"])
        if abs(cur / new - decision["predicted_gain"]) > 1e-6 * max(1.0, cur / new):
            return [f"predicted gain {decision['predicted_gain']:.6f} published, {cur / new:.6f} from this rank's "
                    f"measurements: the ranks' estimates differ"]
        return []


__all__ = ["DriftReplanner", "link_uses"]
