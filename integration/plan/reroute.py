"""Route around lost nodes: the plan the survivors run until a replacement has joined.

:func:`route_around` turns a :class:`RoutePlan` and a set of lost node ids into a plan for the nodes
that are left (``docs/replan.md``):

* a hop on a lost node whose stage still has a surviving replica moves to a surviving replica
  (the one with the fewest visits so far: the replicas stay balanced);
* a stage without a surviving replica is *dead*: every route skips it. Routes that never visited
  it then have one hop more than those that did, so each of them drops a hop at the live body
  stage visited most (keeping the forward jumps within CC4), and every route has the same length
  again (CC2) with equal visits of every live body stage (CC5);
* the result is a *compact* plan: dead stages and lost nodes are left out, stages and nodes are
  renumbered densely in their old order (``stage_map``, ``node_map``), so it is an ordinary plan of
  a shorter pipeline on the survivors' group ranks, checked by :func:`integration.plan.rules.validate`
  like any other.

What cannot hold is said, never hidden: measured against the *original* pipeline, CC5 fails for a
dead stage (no node is left to visit it; its weights are rebuilt by the recovery ladder when a
node joins) and CC2's path length shrinks by the number of dead stages every route loses; those
two are listed in :attr:`Reroute.relaxed` with what is done instead. A home (stage 0) replica or,
in the linear layout, the loss stage cannot be routed around (their microbatches' data, embedding
and loss live there): :class:`RerouteError` says so and the job waits for the replacement.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable

from .routeplan import Hop, MicrobatchRoute, RoutePlan
from .rules import Rules, Violation, validate
from .simulator import simulate


class RerouteError(ValueError):
    """The lost nodes cannot be routed around (the survivors must wait for a replacement)."""


@dataclass
class Reroute:
    """The survivors' plan and how it was made from the original one."""

    plan: RoutePlan                      # compact: dead stages and lost nodes removed, renumbered
    lost_nodes: tuple[int, ...]
    dead_stages: tuple[int, ...]         # original stage ids no route visits any more
    moved_hops: int                      # hops moved to a surviving replica of their stage
    dropped_hops: int                    # hops removed (dead stages + CC2 equalisation)
    stage_map: dict[int, int]            # original stage -> compact stage (live stages only)
    node_map: dict[int, int]             # original node id -> compact node id (survivors only)
    relaxed: list[str] = field(default_factory=list)   # rules of the original pipeline that cannot hold
    violations: list[Violation] = field(default_factory=list)  # the compact plan's own (empty: valid)
    rules: Rules = field(default_factory=Rules)  # the rules the compact plan is checked with (after `relaxed`)

    @property
    def ok(self) -> bool:
        return not self.violations


def route_around(plan: RoutePlan, lost: Iterable[int], rules: Rules | None = None) -> Reroute:
    """The plan for the nodes left after ``lost`` (see the module docstring)."""
    rules = rules or Rules()
    lost_set = set(lost)
    unknown = sorted(lost_set - set(plan.nodes))
    if unknown:
        raise RerouteError(f"reroute: nodes {unknown} are not in the plan (nodes {plan.nodes})")
    S = plan.num_stages
    lost_homes = sorted(n for n in plan.stage_nodes[0] if n in lost_set)
    if lost_homes:
        raise RerouteError(f"reroute: home node(s) {lost_homes} (stage 0) lost: their microbatches' data, embedding "
                           f"and loss live there, no route can skip them; waiting for a replacement")
    survivors = {s: [r for r, n in enumerate(reps) if n not in lost_set] for s, reps in enumerate(plan.stage_nodes)}
    dead = sorted(s for s in range(1, S) if not survivors[s])
    if plan.layout == "linear" and S - 1 in dead:
        raise RerouteError(f"reroute: stage {S - 1} (the linear layout's loss stage) has no surviving replica; "
                           f"every route must end there; waiting for a replacement")
    if len(dead) >= S - 1:
        raise RerouteError(f"reroute: no body stage has a surviving node (lost {sorted(lost_set)}); nothing to train")
    # 1. moves to surviving replicas, removal of dead-stage hops
    load = {s: Counter({r: 0 for r in survivors[s]}) for s in range(1, S)}
    for route in plan.routes:
        for h in route.hops:
            if h.node not in lost_set:
                load[h.stage][h.replica] += 1
    moved, dropped = 0, 0
    bodies: list[list[tuple[int, int]]] = []
    for route in plan.routes:
        hops = []
        for h in route.hops:
            if h.stage in dead:
                dropped += 1
                continue
            rep = h.replica
            if h.node in lost_set:
                rep = min(survivors[h.stage], key=lambda r: (load[h.stage][r], r))
                load[h.stage][rep] += 1
                moved += 1
            hops.append((h.stage, rep))
        bodies.append(hops)
    # 2. equal lengths again (CC2): longer routes drop a hop at the most visited live stage
    target = min(len(b) for b in bodies)
    visits = Counter(s for b in bodies for s, _ in b)
    fixed_last = S - 1 if plan.layout == "linear" else None
    for b in sorted(bodies, key=len, reverse=True):
        while len(b) > target:
            order = [s for s, _ in b]
            cands = [i for i, (s, _) in enumerate(b) if s != fixed_last
                     and _jumps_ok([x for j, x in enumerate(order) if j != i], rules.max_jump, dead)]
            if not cands:
                raise RerouteError(f"reroute: a route {order} cannot drop a stage within the CC4 jump limit "
                                   f"({rules.max_jump}); waiting for a replacement")
            i = max(cands, key=lambda i: (visits[b[i][0]], b[i][0]))
            visits[b[i][0]] -= 1
            del b[i]
            dropped += 1
    # 3. the compact plan on dense ids
    live_stages = [s for s in range(S) if s not in dead]
    stage_map = {s: k for k, s in enumerate(live_stages)}
    node_map: dict[int, int] = {}
    replica_map: dict[tuple[int, int], int] = {}
    stage_nodes: list[list[int]] = []
    for s in live_stages:
        row = []
        for r in survivors[s]:
            node_map[plan.stage_nodes[s][r]] = len(node_map)
            replica_map[(s, r)] = len(row)
            row.append(node_map[plan.stage_nodes[s][r]])
        stage_nodes.append(row)
    home_rep = {r: replica_map[(0, r)] for r in survivors[0]}
    routes = [MicrobatchRoute(route.mb, home_rep[route.home_replica], node_map[route.home_node],
                              tuple(Hop(stage_map[s], replica_map[(s, r)], node_map[plan.stage_nodes[s][r]])
                                    for s, r in b))
              for route, b in zip(plan.routes, bodies)]
    meta = {**plan.meta, "rerouted": {"lost_nodes": sorted(lost_set), "dead_stages": dead,
                                      "stage_map": {str(k): v for k, v in stage_map.items()},
                                      "node_map": {str(k): v for k, v in node_map.items()}}}
    compact = RoutePlan(stage_nodes=stage_nodes, routes=routes, path_length=target + 1, layout=plan.layout,
                        memory=plan.memory, node_order=None, meta=meta)
    relaxed = []
    if dead:
        relaxed.append(f"CC5: original stage(s) {dead} have no node left and are visited by no route (0 visits) "
                       f"until a replacement joins and the recovery ladder rebuilds them; the {len(live_stages) - 1} "
                       f"live body stages are checked instead")
    if target + 1 != plan.path_length:
        relaxed.append(f"CC2: path length L={plan.path_length} -> {target + 1} (every route lost the same number of "
                       f"hops); rules are checked on the compact pipeline of {len(live_stages)} stages")
    effective = replace(rules, path_length=None)
    violations = validate(compact, effective)
    tc1 = [v for v in violations if v.rule == "TC1" and v.node is not None]
    if tc1 and compact.memory is not None and rules.memory is None:
        need = _distinct_routes(compact)
        relaxed.append(f"TC1: moved or shortened routes make node(s) {sorted(v.node for v in tc1)} serve up to "
                       f"{need} distinct routes > memory {compact.memory}; the survivors' plan sets memory={need} "
                       f"(those nodes keep that many activations live)")
        compact.memory = need
    cc5 = [v for v in violations if v.rule == "CC5"]
    live_visits = compact.stage_visits()[1:(compact.num_stages - 1 if plan.layout == "linear" else None)]
    if cc5 and live_visits and max(live_visits) - min(live_visits) <= 1:
        relaxed.append(f"CC5 (live stages): {sum(live_visits)} hops cannot split equally over {len(live_visits)} "
                       f"live body stages; visits {live_visits} differ by at most one")
        effective = replace(effective, equal_visits=False)
    return Reroute(compact, tuple(sorted(lost_set)), tuple(dead), moved, dropped, stage_map, node_map, relaxed,
                   validate(compact, effective), effective)


def _distinct_routes(plan: RoutePlan) -> int:
    """The most distinct routes (node sequences) any node serves (TC1's count)."""
    paths: dict[int, set] = {}
    for route in plan.routes:
        for n in route.nodes:
            paths.setdefault(n, set()).add(route.nodes)
    return max((len(p) for p in paths.values()), default=0)


def _jumps_ok(order: list[int], max_jump: int, dead: list[int]) -> bool:
    """CC4 on the compact pipeline: a forward jump skips at most ``max_jump`` *live* stages."""
    f = 0
    for s in order:
        if s > f:
            if sum(1 for x in range(f + 1, s) if x not in dead) > max_jump:
                return False
            f = s
    return True


def predicted_iteration(plan: RoutePlan) -> float:
    """One iteration of ``plan`` in units of w (every node's stage forward = 1, links free): the
    simulator's paper mode, for comparing two plans of the same job (a predicted gain)."""
    n = max(plan.nodes) + 1
    return simulate(plan, cost=[[0.0] * n for _ in range(n)], stage_times=[1.0] * n, mode="paper",
                    record=False).iteration_s
