"""The convergence (CC1-CC5) and timing (TC1) rules of SkipPipe, checked on a RoutePlan.

``validate`` never stops at the first problem: it returns every violation, each naming the rule,
the microbatch (or node) and the reason, so a user can fix a plan file in one go.
Rule text: ``shared/spec/skippipe.md`` section 2. Our readings where the spec leaves room:

* CC3: f is the furthest stage reached so far (stage 0 at the start). Visiting s < f is a swap of
  distance f - s; each swap must have distance <= ``max_swap_distance`` (1: adjacent stages only),
  at most ``max_swaps`` swaps per route and the distances sum to at most ``max_swap_total``.
* CC4: a forward jump from f to s > f skips s - f - 1 stages; the return to the home node at the
  end of a ring route is not a jump.
* CC5: in the linear layout the loss stage S-1 is on every route, so equal visits is required of
  the skippable stages 1..S-2.
* TC1: a node serves at most ``memory`` distinct routes per iteration (routes compared as node
  sequences). With a ``node_order`` the live activations on a node, counted along that order,
  never exceed ``memory``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from .routeplan import LAYOUTS, RoutePlan

RULE_IDS = ("CC1", "CC2", "CC3", "CC4", "CC5", "TC1", "LAYOUT", "ORDER")


@dataclass(frozen=True)
class Rules:
    """Which limits to enforce. ``path_length`` None means: use the plan's own L."""

    path_length: int | None = None
    max_swaps: int = 2
    max_swap_distance: int = 1
    max_swap_total: int = 2
    max_jump: int = 4
    equal_visits: bool = True
    memory: int | None = None  # None: take the plan's memory (TC1 unchecked if that is None too)

    @classmethod
    def from_mapping(cls, cfg: dict | None) -> "Rules":
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"routing.rules: unknown key(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**cfg)


@dataclass(frozen=True)
class Violation:
    rule: str
    microbatch: int | None
    reason: str
    node: int | None = None

    def __str__(self) -> str:
        where = f"microbatch {self.microbatch}" if self.microbatch is not None else (
            f"node {self.node}" if self.node is not None else "plan")
        return f"{self.rule} ({where}): {self.reason}"


class PlanValidationError(ValueError):
    """Raised by executors that refuse an invalid plan; carries every violation."""

    def __init__(self, violations: list[Violation], context: str = "plan"):
        self.violations = violations
        lines = "\n  ".join(str(v) for v in violations[:50])
        more = f"\n  ... and {len(violations) - 50} more" if len(violations) > 50 else ""
        super().__init__(f"{context} violates {len(violations)} rule(s):\n  {lines}{more}")


def validate(plan: RoutePlan, rules: Rules | None = None) -> list[Violation]:
    """Return every rule violation of ``plan`` (empty list: the plan is valid)."""
    rules = rules or Rules()
    out: list[Violation] = []
    S = plan.num_stages
    L = rules.path_length if rules.path_length is not None else plan.path_length
    node_of = plan.node_stage()

    if plan.layout not in LAYOUTS:
        out.append(Violation("LAYOUT", None, f"layout {plan.layout!r} is not one of {LAYOUTS}"))
    if S < 2 or not plan.stage_nodes[0]:
        out.append(Violation("LAYOUT", None, f"a pipeline needs at least 2 stages and a home node, plan has {S} "
                                             f"stages"))
        return out
    seen_nodes: Counter = Counter(n for stage in plan.stage_nodes for n in stage)
    for n, c in seen_nodes.items():
        if c > 1:
            out.append(Violation("LAYOUT", None, f"node {n} is listed in stage_nodes {c} times", node=n))
    mb_ids = Counter(r.mb for r in plan.routes)
    for mb, c in mb_ids.items():
        if c > 1:
            out.append(Violation("LAYOUT", mb, f"microbatch id {mb} appears {c} times"))

    for route in plan.routes:
        mb = route.mb
        # CC1: home is a stage-0 node, stage 0 never appears as a hop.
        if not (0 <= route.home_replica < len(plan.stage_nodes[0])) or \
                plan.stage_nodes[0][route.home_replica] != route.home_node:
            out.append(Violation("CC1", mb, f"home node {route.home_node} (replica {route.home_replica}) "
                                            f"is not that replica of stage 0 {plan.stage_nodes[0]}"))
        for hop in route.hops:
            if hop.stage == 0:
                out.append(Violation("CC1", mb, "stage 0 (home) appears as a hop: it is never skipped or moved"))
            elif not (0 < hop.stage < S):
                out.append(Violation("CC2", mb, f"hop to stage {hop.stage} outside 1..{S - 1}"))
            elif not (0 <= hop.replica < len(plan.stage_nodes[hop.stage])) or \
                    plan.stage_nodes[hop.stage][hop.replica] != hop.node:
                out.append(Violation("CC1", mb, f"hop (stage {hop.stage}, replica {hop.replica}) names node "
                                                f"{hop.node}, which is not that replica in stage_nodes"))
            elif node_of.get(hop.node, (None,))[0] != hop.stage:
                out.append(Violation("CC1", mb, f"node {hop.node} does not hold stage {hop.stage}"))
        body = [h.stage for h in route.hops]
        # CC2: exactly L-1 distinct body stages.
        if len(body) != L - 1:
            out.append(Violation("CC2", mb, f"route visits {len(body)} body stages {body}; "
                                            f"path length L={L} needs exactly {L - 1}"))
        dup = [s for s, c in Counter(body).items() if c > 1]
        if dup:
            out.append(Violation("CC2", mb, f"route visits stage(s) {dup} more than once: {body}"))
        # CC3 / CC4: swaps and jumps, measured against the furthest stage reached so far.
        f, swaps, total = 0, 0, 0
        for s in body:
            if s < f:
                d = f - s
                swaps += 1
                total += d
                if d > rules.max_swap_distance:
                    out.append(Violation("CC3", mb, f"stage {s} after reaching stage {f} is a swap of distance "
                                                    f"{d} > {rules.max_swap_distance} (only adjacent stages swap): "
                                                    f"body order {body}"))
            else:
                skipped = s - f - 1
                if skipped > rules.max_jump:
                    out.append(Violation("CC4", mb, f"jump from stage {f} to {s} skips {skipped} stages "
                                                    f"> {rules.max_jump}: body order {body}"))
                f = s
        if swaps > rules.max_swaps:
            out.append(Violation("CC3", mb, f"{swaps} swaps > {rules.max_swaps} allowed: body order {body}"))
        if total > rules.max_swap_total:
            out.append(Violation("CC3", mb, f"swap distances sum to {total} > {rules.max_swap_total}: "
                                            f"body order {body}"))
        if plan.layout == "linear" and (not body or body[-1] != S - 1):
            out.append(Violation("LAYOUT", mb, f"linear layout: the loss lives on stage {S - 1}, so every route "
                                               f"must end there; body order {body}"))

    # CC5: equal visits per body stage.
    # In the linear layout the loss stage S-1 is on every route, so only stages 1..S-2 can balance.
    if rules.equal_visits and S > 1:
        last = S - 1 if plan.layout == "linear" else S
        visits = plan.stage_visits()[1:last]
        if len(set(visits)) > 1:
            detail = ", ".join(f"stage {s + 1}: {v}" for s, v in enumerate(visits))
            out.append(Violation("CC5", None, f"body stages are visited unequally ({detail})"))

    # TC1: memory.
    memory = rules.memory if rules.memory is not None else plan.memory
    if memory is not None:
        paths: dict[int, set] = defaultdict(set)
        for route in plan.routes:
            for n in route.nodes:
                paths[n].add(route.nodes)
        for n, ps in sorted(paths.items()):
            if len(ps) > memory:
                out.append(Violation("TC1", None, f"node {n} serves {len(ps)} distinct routes > memory {memory}",
                                     node=n))
        if plan.node_order is not None:
            out.extend(_check_node_order(plan, memory))
    elif plan.node_order is not None:
        out.extend(_check_node_order(plan, None))
    return out


def _check_node_order(plan: RoutePlan, memory: int | None) -> list[Violation]:
    """A per-node order must list exactly the node's work, F before B, and respect memory."""
    out: list[Violation] = []
    expected: dict[int, Counter] = defaultdict(Counter)
    for route in plan.routes:
        for n in set(route.nodes):
            expected[n][(route.mb, "F")] += 1
            expected[n][(route.mb, "B")] += 1
    for n, order in sorted((plan.node_order or {}).items()):
        got = Counter((mb, ph) for mb, ph in order)
        if got != expected.get(n, Counter()):
            out.append(Violation("ORDER", None, f"node_order of node {n} does not list exactly one F and one B "
                                                f"for each microbatch that visits it", node=n))
            continue
        live, peak, fwd_done = 0, 0, set()
        for mb, ph in order:
            if ph == "F":
                fwd_done.add(mb)
                live += 1
                peak = max(peak, live)
            else:
                if mb not in fwd_done:
                    out.append(Violation("ORDER", mb, f"node {n} runs the backward before the forward", node=n))
                live -= 1
        if memory is not None and peak > memory:
            out.append(Violation("TC1", None, f"node {n} holds {peak} live activations > memory {memory} "
                                              f"along its node_order", node=n))
    return out


def check(plan: RoutePlan, rules: Rules | None = None, context: str = "plan") -> None:
    """Raise :class:`PlanValidationError` listing every violation, if there is any."""
    violations = validate(plan, rules)
    if violations:
        raise PlanValidationError(violations, context)


def check_fits_grid(plan: RoutePlan, stage_nodes: list[list[int]], microbatches_per_home: int,
                    rules: Rules | None, framework: str, grid_note: str, microbatch_setting: str) -> None:
    """Refuse a plan that does not fit an engine's rank grid, then check the rules.

    ``stage_nodes`` is the engine's own stage -> replica -> rank grid; ``grid_note`` says how the
    framework numbers ranks and ``microbatch_setting`` names the per-replica microbatch count.
    """
    S = len(stage_nodes)
    if plan.num_stages != S:
        raise ValueError(f"routing plan: it has {plan.num_stages} stages but parallel.stages is {S}; "
                         f"build the plan for {S} stages")
    if plan.stage_nodes != stage_nodes:
        raise ValueError(f"routing plan: stage_nodes {plan.stage_nodes} do not match the {framework} rank grid "
                         f"{stage_nodes} ({grid_note}); {framework} needs the same replica count on every stage")
    per_home = {n: 0 for n in plan.stage_nodes[0]}
    for r in plan.routes:
        per_home[r.home_node] = per_home.get(r.home_node, 0) + 1
    bad = {n: c for n, c in per_home.items() if c != microbatches_per_home}
    if bad:
        raise ValueError(f"routing plan: home nodes {sorted(bad)} own {sorted(set(bad.values()))} microbatches, "
                         f"but {microbatch_setting}={microbatches_per_home} per replica")
    check(plan, rules or Rules(), context="routing plan")
