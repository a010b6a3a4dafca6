"""Path planner: a route for every microbatch plus a per-node processing order.

Structure (why it is fast): with TC1 each home replica has ``slots = min(memory, m)`` route
slots, microbatch j of a home uses slot j % slots, and each body node can carry at most
``memory`` slot routes. So a plan is H x slots *slot routes*, not H x m independent paths, and the
sizing rule makes the node capacities exactly tight. The planner

1. places nodes on stages (:func:`placement.anneal_placement`) unless ``stage_nodes`` is given;
2. builds balanced stage sets (CC5), then assigns replicas greedily by link cost under the
   capacity limit (TC1);
3. improves the slot routes by local search with moves that keep CC5 and TC1 by construction
   (swap the replicas two routes use on a stage, move a route to a replica with free capacity,
   exchange a stage between two routes, reorder a route within CC3/CC4). The objective is first
   the static round-trip time of each route (sum of squares: long routes dominate), which gives
   the *collision-unaware* plan; then
4. (collision-aware, TC2) the same moves are scored by the event simulator (paper mode) with the
   best of three node service policies, so waiting at shared nodes is what gets minimised. The
   simulated schedule becomes ``plan.node_order``: every node's F/B order is fixed, and replaying
   the plan with that order reproduces the simulated time exactly.

Clusters whose links all cost the same skip step 4: routing cannot gain on the links there, so
:mod:`.exact` solves routes and per-node schedule together as a CP-SAT model (hop layers), and the
searched plan is used only where that model does not apply or does no better than FIFO.

Every returned plan passes ``rules.validate`` (CC1-CC5, TC1 and the node_order check).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .builders import full_pipeline
from .cluster import Cluster, load_cluster
from .costmodel import BODY_TOTAL, HOME_F, HOME_TOTAL
from .placement import (LayoutError, anneal_placement, check_layout, derive_stage_sizes, placement_score,
                        relabel_by_tour, ring_placement)
from .orders import valid_orders
from .routeplan import RoutePlan, make_route
from .rules import Rules, validate
from .simulator import DEFAULT_GAP_S, POLICIES, simulate

__all__ = ["Effort", "PlannerResult", "VariantResult", "plan_routes", "plan_for_training", "compare_variants",
           "LayoutError", "valid_orders"]


MAX_LINKED_CANDIDATES = 20_000  # routes of all homes the linked models enumerate (skippipe-20: 2970)
MAX_PLANNED_NODES = 400  # default budget: 100 nodes plan in well under a minute on one core


@dataclass
class PlannerResult:
    """A plan and what the planner predicts for it."""

    plan: RoutePlan
    placement_score: float
    predicted_paper_s: float
    predicted_full_s: float
    runtime_s: float
    stage_nodes: list[list[int]] = field(default_factory=list)
    policy: str = "fifo"
    evaluations: int = 0
    placement_runtime_s: float = 0.0


# ----------------------------------------------------------------------------- search state
class _Routes:
    """H x slots slot routes (lists of body nodes in visiting order) with node loads."""

    def __init__(self, stage_nodes: list[list[int]], slots: int, cap: dict[int, int], C: np.ndarray,
                 w: np.ndarray, gap: float, rules: Rules):
        self.stage_nodes = stage_nodes
        self.slots = slots
        self.cap = cap
        self.C = C.tolist()
        self.w = w.tolist()
        self.gap = gap
        self.rules = rules
        self.stage_of = {n: s for s, g in enumerate(stage_nodes) for n in g}
        self.replica_of = {n: r for g in stage_nodes for r, n in enumerate(g)}
        self.homes: list[int] = [h for h in stage_nodes[0] for _ in range(slots)]
        self.routes: list[list[int]] = []
        self.load: dict[int, int] = {n: 0 for g in stage_nodes[1:] for n in g}
        self.by_node: dict[int, set[int]] = {n: set() for g in stage_nodes[1:] for n in g}

    def rt(self, i: int, nodes: Sequence[int] | None = None) -> float:
        """Isolated round trip of slot route i: compute, gaps and the links both ways."""
        h = self.homes[i]
        nodes = self.routes[i] if nodes is None else nodes
        C, w = self.C, self.w
        t = w[h] * HOME_TOTAL + sum(w[n] for n in nodes) * BODY_TOTAL + self.gap * (2 * len(nodes) + 2)
        seq = [h, *nodes, h]
        for a, b in zip(seq, seq[1:]):
            t += C[a][b] + C[b][a]
        return t

    def set_route(self, i: int, nodes: list[int]) -> None:
        for n in self.routes[i]:
            self.load[n] -= 1
            self.by_node[n].discard(i)
        self.routes[i] = nodes
        for n in nodes:
            self.load[n] += 1
            self.by_node[n].add(i)

    def best_order(self, i: int, nodes: Sequence[int]) -> list[int]:
        by_stage = {self.stage_of[n]: n for n in nodes}
        best, best_t = None, math.inf
        for o in valid_orders(list(by_stage), self.rules):
            cand = [by_stage[s] for s in o]
            t = self.rt(i, cand)
            if t < best_t:
                best, best_t = cand, t
        return best

    def to_plan(self, m: int, path_length: int, memory: int, meta: dict[str, Any]) -> RoutePlan:
        routes = []
        H = len(self.stage_nodes[0])
        for r in range(H):
            for j in range(m):
                nodes = self.routes[r * self.slots + j % self.slots]
                hops = [(self.stage_of[n], self.replica_of[n]) for n in nodes]
                routes.append(make_route(r * m + j, self.stage_nodes, r, hops))
        return RoutePlan(stage_nodes=[list(g) for g in self.stage_nodes], routes=routes, path_length=path_length,
                         layout="ring", memory=memory, meta=dict(meta))


def _stage_sets(n_routes: int, S: int, hops: int, rng: random.Random, rules: Rules) -> list[list[int]]:
    """Balanced stage sets (CC5): each body stage appears n_routes*hops/(S-1) times; CC4-valid."""
    per = n_routes * hops // (S - 1)
    for _ in range(200):
        remaining = {s: per for s in range(1, S)}
        sets, ok = [], True
        for _ in range(n_routes):
            ranked = sorted(remaining, key=lambda s: (-remaining[s], rng.random()))
            chosen = sorted(ranked[:hops])
            if remaining[chosen[0]] <= 0 or not valid_orders(chosen, rules):
                ok = False
                break
            for s in chosen:
                remaining[s] -= 1
            sets.append(chosen)
        if ok and all(v == 0 for v in remaining.values()):
            rng.shuffle(sets)
            return sets
    raise LayoutError(f"CC4 (jump limit): no balanced stage sets with L-1={hops} of {S - 1} body stages keep jumps "
                      f"<= {rules.max_jump} stages; raise path_length")


def _initial(state: _Routes, n_routes: int, hops: int, rng: random.Random) -> None:
    S = len(state.stage_nodes)
    sets = _stage_sets(n_routes, S, hops, rng, state.rules)
    state.routes = [[] for _ in range(n_routes)]
    order = list(range(n_routes))
    rng.shuffle(order)
    C = state.C
    for i in order:
        h = state.homes[i]
        nodes = []
        for s in sets[i]:
            free = [n for n in state.stage_nodes[s] if state.load[n] < state.cap[n]]
            n = min(free, key=lambda x: (C[h][x] + C[x][h], state.load[x], rng.random()))
            state.load[n] += 1  # reserve now; set_route recounts
            nodes.append(n)
        for n in nodes:
            state.load[n] -= 1
        state.set_route(i, state.best_order(i, nodes))


def _propose(state: _Routes, rng: random.Random, focus: list[int] | None) -> list[tuple[int, list[int]]] | None:
    """A random move as new routes for one or two slot routes (CC5 and TC1 preserved)."""
    R = len(state.routes)
    a = rng.choice(focus) if focus and rng.random() < 0.5 else rng.randrange(R)
    route_a = state.routes[a]
    k = rng.randrange(len(route_a))
    x = route_a[k]
    s = state.stage_of[x]
    move = rng.random()
    if move < 0.45:  # replica change on stage s
        others = [n for n in state.stage_nodes[s] if n != x]
        if not others:
            return None
        y = rng.choice(others)
        if state.load[y] < state.cap[y]:
            new_a = list(route_a)
            new_a[k] = y
            return [(a, state.best_order(a, new_a))]
        b = rng.choice(sorted(state.by_node[y]))
        if b == a:
            return None
        new_a = list(route_a)
        new_a[k] = y
        new_b = [x if n == y else n for n in state.routes[b]]
        return [(a, state.best_order(a, new_a)), (b, state.best_order(b, new_b))]
    if move < 0.85:  # exchange stage s of route a with stage t of route b
        b = rng.randrange(R)
        if b == a:
            return None
        route_b = state.routes[b]
        stages_a = {state.stage_of[n] for n in route_a}
        stages_b = {state.stage_of[n] for n in route_b}
        if s in stages_b:
            return None
        cands = [n for n in route_b if state.stage_of[n] not in stages_a]
        if not cands:
            return None
        y = rng.choice(cands)
        new_a = [y if n == x else n for n in route_a]
        new_b = [x if n == y else n for n in route_b]
        sa = [state.stage_of[n] for n in new_a]
        sb = [state.stage_of[n] for n in new_b]
        if not valid_orders(sa, state.rules) or not valid_orders(sb, state.rules):
            return None
        return [(a, state.best_order(a, new_a)), (b, state.best_order(b, new_b))]
    # reorder: a random valid order (the static search already holds the cheapest one)
    by_stage = {state.stage_of[n]: n for n in route_a}
    o = rng.choice(valid_orders(list(by_stage), state.rules))
    new_a = [by_stage[t] for t in o]
    return None if new_a == route_a else [(a, new_a)]


def _static_search(state: _Routes, rng: random.Random, deadline: float, max_iters: int) -> int:
    """Hill climbing (with sideways moves) on the sum of squared isolated round trips."""
    times = [state.rt(i) for i in range(len(state.routes))]
    it = 0
    while it < max_iters and time.perf_counter() < deadline:
        it += 1
        mv = _propose(state, rng, None)
        if not mv:
            continue
        new_t = {i: state.rt(i, nodes) for i, nodes in mv}
        delta = sum(new_t[i] ** 2 - times[i] ** 2 for i in new_t)
        if delta <= 1e-12:
            for i, nodes in mv:
                state.set_route(i, nodes)
                times[i] = new_t[i]
    return it


@dataclass
class _Eval:
    obj: float
    makespan: float
    policy: str
    late_routes: list[int]
    late_mbs: list[int]


def _evaluate(state: _Routes, plan_args: tuple, C: np.ndarray, w: np.ndarray, memory: int,
              policies: Sequence[str], prio: dict[int, float]) -> _Eval:
    m, L = plan_args
    plan = state.to_plan(m, L, memory, {})
    best = None
    for pol in policies:
        r = simulate(plan, cost=C, stage_times=w, memory=memory, policy=pol, record=False, priority=prio)
        # Tie-break on the mean microbatch end so the search sees progress below the makespan.
        obj = r.iteration_s + 0.01 * sum(r.mb_end.values()) / len(r.mb_end)
        if best is None or obj < best.obj:
            ends = sorted(r.mb_end.items(), key=lambda kv: -kv[1])
            late_mbs = [mb for mb, _ in ends[: max(1, len(ends) // 6)]]
            late = [(mb // m) * state.slots + (mb % m) % state.slots for mb in late_mbs]
            best = _Eval(obj, r.iteration_s, pol, late, late_mbs)
    return best


def _sim_search(state: _Routes, rng: random.Random, deadline: float, plan_args: tuple, C: np.ndarray,
                w: np.ndarray, memory: int, max_evals: int) -> tuple[_Eval, int, dict[int, float]]:
    """Local search with the simulated iteration time as the objective (collision-aware).

    Two kinds of moves: route moves (see ``_propose``) and priority moves, which give a late
    microbatch precedence over another one at every node they share (``priority`` policy)."""
    m, _ = plan_args
    n_mb = len(state.stage_nodes[0]) * m
    # Start from "earlier round first" with a random tie order inside a round.
    prio = {mb: (mb % m) // state.slots + 0.5 * rng.random() for mb in range(n_mb)}
    cur = _evaluate(state, plan_args, C, w, memory, POLICIES + ("priority",), prio)
    policies = sorted({cur.policy, "priority"})
    evals = len(POLICIES) + 1
    best = (cur, [list(r) for r in state.routes], dict(prio))
    T0 = 0.01 * cur.makespan
    t_start = time.perf_counter()
    span = max(1e-6, deadline - t_start)
    while evals < max_evals and time.perf_counter() < deadline:
        if rng.random() < 0.35:  # priority move
            a = rng.choice(cur.late_mbs) if rng.random() < 0.6 else rng.randrange(n_mb)
            b = rng.randrange(n_mb)
            if a == b:
                continue
            prio[a], prio[b] = prio[b], prio[a]
            ev = _evaluate(state, plan_args, C, w, memory, policies, prio)
            old_routes = None
        else:
            mv = _propose(state, rng, cur.late_routes)
            if not mv:
                continue
            old_routes = [(i, list(state.routes[i])) for i, _ in mv]
            for i, nodes in mv:
                state.set_route(i, nodes)
            ev = _evaluate(state, plan_args, C, w, memory, policies, prio)
        evals += 1
        # Cooling follows whichever budget (evaluations or time) runs out first.
        frac = min(1.0, max(evals / max_evals, (time.perf_counter() - t_start) / span))
        T = T0 * (1 - frac) ** 2 + 1e-9
        d = ev.obj - cur.obj
        if d <= 0 or rng.random() < math.exp(-d / T):
            cur = ev
            if ev.obj < best[0].obj:
                best = (ev, [list(r) for r in state.routes], dict(prio))
        elif old_routes is None:
            prio[a], prio[b] = prio[b], prio[a]
        else:
            for i, nodes in old_routes:
                state.set_route(i, nodes)
    ev, routes, prio = best
    for i, nodes in enumerate(routes):
        state.set_route(i, nodes)
    return ev, evals, prio


# ----------------------------------------------------------------------------- public API
def _setup(cluster: Cluster, stage_nodes, stage_sizes, num_stages, path_length, memory, m, seed,
           placement_budget_s, placement_evals, warm: dict | None = None):
    N = cluster.num_nodes
    C = cluster.cost_matrix()
    t0 = time.perf_counter()
    if stage_nodes is None:
        if stage_sizes is None:
            stage_sizes = derive_stage_sizes(N, num_stages, path_length, memory, m)
        if len(stage_sizes) != num_stages:
            raise LayoutError(f"stage_sizes: {len(stage_sizes)} sizes for num_stages={num_stages}; give one size "
                              f"per stage")
        check_layout(N, stage_sizes, path_length, memory, m)
        stage_nodes = _search_placement(cluster, C, stage_sizes, path_length, memory, m, seed, placement_budget_s,
                                        placement_evals, warm=warm)
    else:
        stage_nodes = [list(map(int, g)) for g in stage_nodes]
        flat = [n for g in stage_nodes for n in g]
        bad = [n for n in flat if not 0 <= n < N]
        if bad:
            raise LayoutError(f"stage_nodes: node ids {bad[:5]} are outside the cluster's 0..{N - 1}; use a cluster "
                              f"with at least {max(flat) + 1} nodes")
        if len(set(flat)) != len(flat):
            raise LayoutError("stage_nodes: a node is listed twice; every node holds one stage")
        check_layout(len(flat), [len(g) for g in stage_nodes], path_length, memory, m)
    return stage_nodes, C, time.perf_counter() - t0


NEAR_FLOOR = 0.01  # a linked plan this close to its floor (linked bounds) skips the simulated search
RING_TRIES = 4  # ring placements tried where links differ (the first at full length)


def _search_placement(cluster, C, stage_sizes, path_length, memory, m, seed, budget_s, evals,
                      tries: int = 3, warm: dict | None = None) -> list[list[int]]:
    """Anneal ``tries`` placements (seeds seed, seed+1, ...) on the spec's score and keep the one whose
    route lower bound (:func:`linked.lower_bound`) is lowest: the score does not see that one slow
    home sets the whole iteration's floor. Where links differ, that one and the ring placement
    are then compared on a quick plan each (:func:`_quick_linked_time`)."""
    from .linked import count_candidates, lower_bound
    best, best_key = None, None
    w = cluster.stage_times()
    rules = Rules()
    sizes_ok = all(n.memory >= memory for n in cluster.nodes) and min(memory, m) == memory
    from . import exact
    ring = ring_placement(C, w, stage_sizes, path_length - 1, seed=seed) if sizes_ok else None
    ring_t = math.inf
    if ring is not None and count_candidates(ring, path_length, rules) <= MAX_LINKED_CANDIDATES:
        best = ring
        best_key = ring_key = (lower_bound(ring, C, w, memory, m, path_length, rules, DEFAULT_GAP_S, True),
                               placement_score(C, ring).total)
        if exact.uniform_link_cost(C, list(range(len(C)))) is None:
            # Links differ: which node of a slow ring is its home decides how its slots collide,
            # and the ring annealing does not see it; a few shorter ring runs, each planned
            # quickly, and the fastest kept (counted work: deterministic).
            ring_t = _quick_linked_time(ring, C, w, memory, m, path_length, rules)
            for k in range(1, RING_TRIES):
                r = ring_placement(C, w, stage_sizes, path_length - 1, seed=RING_TRIES * seed + k, iters=4000)
                t = _quick_linked_time(r, C, w, memory, m, path_length, rules)
                if t < ring_t - 1e-9:
                    ring, ring_t = r, t
            best = ring
            best_key = ring_key = (lower_bound(ring, C, w, memory, m, path_length, rules, DEFAULT_GAP_S, True),
                                   placement_score(C, ring).total)
    ring_best, ring_best_t = best, ring_t
    best, best_key = None, None
    for k in range(tries):
        # Where a ring placement competes, the annealed ones share the budget evenly (planner time).
        pl = anneal_placement(C, stage_sizes, seed=seed + k, time_budget_s=budget_s / tries,
                              max_evals=max(1, evals // tries) if k or ring_best is not None else evals)
        sn = relabel_by_tour(pl.stage_nodes, C)
        if count_candidates(sn, path_length, rules) > MAX_LINKED_CANDIDATES:
            return sn  # large clusters: the bound is too costly to compare; keep the first
        key = (lower_bound(sn, C, w, memory, m, path_length, rules, DEFAULT_GAP_S, True), pl.score.total)
        if best_key is None or key < best_key:
            best, best_key = sn, key
    if ring_best is None:
        return best
    # The lower bound is loose where a slow node sits in a body stage (nothing spaces the slots
    # that share it), so ring and annealed placement are compared on a plan each: one route per
    # home + a short CP-SAT schedule (under a second each, deterministic); ties keep the bound order.
    best_t = _quick_linked_time(best, C, w, memory, m, path_length, rules) if ring_t < math.inf else math.inf
    chosen, chosen_t = best, best_t
    if ring_t < best_t - 1e-9 or (ring_t <= best_t + 1e-9 and ring_key <= best_key):
        chosen, chosen_t = ring_best, ring_best_t
    if chosen_t < math.inf:
        spare, spare_t = _spare_placement(chosen, C, w, memory, m, path_length, rules, warm=warm)
        if spare_t < chosen_t - 1e-9:
            return spare
    return chosen


SPARE_DTIME = 0.25  # CP-SAT deterministic seconds per spare-node schedule
SPARE_EVALS = 3  # spare-node placements planned quickly (the best by the collision-free bound)
WARM_FRACTION = 0.25  # a schedule that continues from a stored one of the same routes gets this share


def _final_dtime(effort) -> float:
    """Budget of the linked plan's final schedule (deterministic seconds)."""
    return max(1.0, effort.linked_dtime / 4)


def _spare_placement(stage_nodes, C, w, memory, m, path_length, rules,
                     warm: dict | None = None) -> tuple[list[list[int]] | None, float]:
    """The slowest home (longest shortest round trip) swapped into a body stage, where it may stay
    unvisited: CC5 counts visits per stage and TC1 distinct routes per node, so one route per home
    with one body node shared by two homes covers the stage without it. Every swap with a body
    node is ranked by the (max, sum) isolated round trip of its one-route-per-home routes (branch
    and bound, one shared node); the best :data:`SPARE_EVALS` are planned quickly and the fastest
    returned with its time (None, inf where none applies). Counted work: deterministic."""
    from . import linked
    Cl = np.asarray(C).tolist()
    slots = min(memory, m)
    rt0 = {h: linked.candidates(stage_nodes, h, C, w, path_length, rules)[:1] for h in stage_nodes[0]}
    if any(not c for c in rt0.values()):
        return None, math.inf
    slow = max(stage_nodes[0], key=lambda h: (rt0[h][0].round_trip_s, -h))

    def key(sn):  # (longest, total) isolated round trip of one route per home, one shared node
        cap = {n: memory for x in sn[1:] for n in x}
        routes = linked.choose_one_route_per_home(sn, C, w, memory, m, path_length, cap, DEFAULT_GAP_S, rules,
                                                  max_nodes=20_000, shared=1)
        if routes is None:
            return None
        rts = [linked.round_trip(sn[0][k // slots], r, Cl, w) for k, r in enumerate(routes)]
        return max(rts), sum(rts)

    base = key(stage_nodes)
    ranked = []
    for s, g in enumerate(stage_nodes[1:], 1):
        for i, b in enumerate(g):
            sn = [list(x) for x in stage_nodes]
            sn[0][sn[0].index(slow)], sn[s][i] = b, slow
            k = key(sn)
            # Only a variant whose longest route is shorter can win (e.g. not where homes tie).
            if k is not None and (base is None or k[0] < base[0] - 1e-9):
                ranked.append(((*k, b), sn))
    ranked.sort(key=lambda x: x[0])
    best, best_t = None, math.inf
    for _, sn in ranked[:SPARE_EVALS]:
        t = _quick_linked_time(sn, C, w, memory, m, path_length, rules, shared=1, dtime=SPARE_DTIME, warm=warm)
        if t < best_t - 1e-9:
            best, best_t = sn, t
    return best, best_t


def _quick_linked_time(stage_nodes, C, w, memory, m, path_length, rules, shared: int = 0,
                       dtime: float = 1.0, warm: dict | None = None) -> float:
    """Paper-mode time of one route per home with a short CP-SAT schedule; inf where none exists.
    ``shared``: body nodes that may carry a second home (:func:`linked.choose_one_route_per_home`)."""
    from . import exact, linked
    if not exact.solver_available() or m % min(memory, m) or \
            exact.uniform_link_cost(C, [n for g in stage_nodes for n in g]) is not None:
        return math.inf
    cap = {n: memory for g in stage_nodes[1:] for n in g}
    routes = linked.choose_one_route_per_home(stage_nodes, C, w, memory, m, path_length, cap, DEFAULT_GAP_S, rules,
                                              max_nodes=100_000, shared=shared)
    if routes is None:
        return math.inf
    res = linked.schedule_routes(stage_nodes, routes, C, w, memory, m, path_length, DEFAULT_GAP_S,
                                 deterministic_time=dtime, warm=warm)
    return math.inf if res is None else simulate(res[0], cost=C, stage_times=w, memory=memory,
                                                 record=False).iteration_s


def _static_state(cluster, stage_nodes, C, memory, m, path_length, seed, deadline, rules, unit=False,
                  static_iters=20000):
    w = cluster.stage_times()
    slots = min(memory, m)
    cap = {n: min(memory, cluster.nodes[n].memory) for g in stage_nodes[1:] for n in g}
    if unit:  # network- and speed-oblivious: every link and node looks the same
        C = np.ones_like(C)
        np.fill_diagonal(C, 0.0)
        w = np.ones_like(w)
    state = _Routes(stage_nodes, slots, cap, C, w, DEFAULT_GAP_S, rules)
    rng = random.Random(seed)
    _initial(state, len(state.homes), path_length - 1, rng)
    if not unit:
        _static_search(state, rng, deadline, static_iters)
    return state, rng


def _exact_plan(cluster, state, stage_nodes, C, w, memory, m, path_length, rules, effort, meta) -> RoutePlan | None:
    """Equal-link clusters: routes + schedule from the CP-SAT model (:mod:`.exact`), or None where it
    does not apply or finds nothing; the caller compares it with the searched plan."""
    from . import exact
    why = exact.applicable(stage_nodes, C, memory, m, path_length, state.cap)
    if why is not None or not exact.solver_available():
        return None
    res = exact.solve_uniform(stage_nodes, C, w, memory, m, path_length, state.cap, DEFAULT_GAP_S, rules,
                              deterministic_time=effort.exact_dtime,
                              meta={**meta, "method": "cp-sat hop layers"})
    if res is None or validate(res.plan, rules):
        return None
    res.plan.meta["solver_status"] = res.status
    return res.plan


def _linked_plan(state, stage_nodes, C, w, memory, m, path_length, rules, effort, meta, seed,
                 warm: dict | None = None) -> RoutePlan | None:
    """Links that differ: routes + schedule from the CP-SAT models of :mod:`.linked`, seeded with the
    static search's routes; None where the model is too large or finds nothing."""
    from . import exact, linked
    body = [n for g in stage_nodes[1:] for n in g]
    if exact.uniform_link_cost(C, [n for g in stage_nodes for n in g]) is not None or len(body) > 40 or \
            m % min(memory, m) or not exact.solver_available() or \
            linked.count_candidates(stage_nodes, path_length, rules) > MAX_LINKED_CANDIDATES:
        return None
    routes = linked.choose_one_route_per_home(stage_nodes, C, w, memory, m, path_length, state.cap,
                                              DEFAULT_GAP_S, rules)
    shared = linked.choose_one_route_per_home(stage_nodes, C, w, memory, m, path_length, state.cap,
                                              DEFAULT_GAP_S, rules, max_nodes=100_000, shared=1)
    Cl = np.asarray(C).tolist()
    slots = min(memory, m)

    def worst(rs):  # longest isolated round trip of a one-route-per-home plan
        return max(linked.round_trip(stage_nodes[0][k // slots], r, Cl, w) for k, r in enumerate(rs))

    def schedule(rs, method: str):  # the final CP-SAT schedule of these routes (warm-started where stored)
        return linked.schedule_routes(stage_nodes, rs, C, w, memory, m, path_length, DEFAULT_GAP_S,
                                      deterministic_time=_final_dtime(effort), seed=seed, warm=warm,
                                      warm_time=WARM_FRACTION * _final_dtime(effort),
                                      meta={**meta, "method": method})

    if shared is not None and (routes is None or worst(shared) < worst(routes) - 1e-9):
        # One body node carrying two homes shortens the longest route (e.g. a slow body node is
        # left unvisited): schedule both and keep the faster replay.
        alt = schedule(shared, "one route per home (one shared body node) + cp-sat schedule")
        if alt is not None and not validate(alt[0], rules):
            t_alt = simulate(alt[0], cost=C, stage_times=w, memory=memory, record=False).iteration_s
            base = None
            # The unshared routes cannot end before their worst home's collision-free bound.
            if routes is not None and t_alt > max(
                    (slots - 1) * (w[h] * HOME_F + DEFAULT_GAP_S) + (m // slots) * linked.round_trip(h, r, Cl, w) +
                    (m // slots - 1) * DEFAULT_GAP_S for h, r in zip(stage_nodes[0], routes[::slots])):
                base = schedule(routes, "one route per home + cp-sat schedule")
            if base is None or validate(base[0], rules) or \
                    t_alt < simulate(base[0], cost=C, stage_times=w, memory=memory, record=False).iteration_s:
                return alt[0]
            return base[0]
    if routes is None:  # capacities that let homes share body nodes: the joint model decides
        routes = linked.solve_joint(stage_nodes, C, w, memory, m, path_length, state.cap, DEFAULT_GAP_S, rules,
                                    per_home=effort.linked_per_home, hint=[list(r) for r in state.routes],
                                    deterministic_time=effort.linked_dtime, seed=seed)
    if routes is None:
        return None
    res = schedule(routes, "one route per home + cp-sat schedule")
    if res is None or validate(res[0], rules):
        return None
    return res[0]


@dataclass(frozen=True)
class Effort:
    """Search budgets in evaluations: with no time cap the planner is deterministic for a seed,
    so every rank of a training job that plans for itself gets the same plan."""

    placement_evals: int = 3000
    static_iters: int = 20000
    sim_evals: int = 2000
    exact_dtime: float = 10.0  # CP-SAT deterministic budget for equal-link clusters (0: never use it)
    linked_dtime: float = 8.0  # CP-SAT deterministic budget where links differ, <= 40 body nodes (0: never)
    linked_per_home: int = 16  # candidate routes per home in that model (the shortest round trips)


def plan_routes(cluster: Cluster | str, stage_nodes: list[list[int]] | None = None,
                stage_sizes: Sequence[int] | None = None, num_stages: int = 6, path_length: int = 4,
                memory: int = 3, microbatches_per_home: int = 6, seed: int = 0,
                time_budget_s: float | None = None, collision_aware: bool = True, rules: Rules | None = None,
                effort: Effort = Effort()) -> PlannerResult:
    """Plan routes for one iteration.

    ``stage_nodes`` fixes the placement (e.g. the training job's rank grid); otherwise nodes are
    placed with ``stage_sizes`` (or sizes derived from |P0|*(L-1) = |Ps|*(S-1)). The search runs
    for ``effort``'s evaluation budgets (deterministic); ``time_budget_s`` additionally caps the wall
    time (placement ~30%, static search ~15%, simulated search the rest), trading determinism for
    a bound. ``collision_aware=False`` stops after the static search (the no-TC2 variant, FIFO).
    """
    t0 = time.perf_counter()
    cluster = load_cluster(cluster)
    if cluster.num_nodes > MAX_PLANNED_NODES and time_budget_s is None:
        raise LayoutError(f"cluster {cluster.name!r}: {cluster.num_nodes} nodes > {MAX_PLANNED_NODES}, the most the "
                          f"planner's default (deterministic) budget covers in about a minute; pass time_budget_s "
                          f"(CLI --time-budget) to plan it under a wall-time cap, or plan a part of the cluster")
    for name, v in (("memory", memory), ("microbatches_per_home", microbatches_per_home), ("num_stages", num_stages),
                    ("path_length", path_length), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise LayoutError(f"{name}: must be an integer (got {v!r})")
    if time_budget_s is not None and not (math.isfinite(time_budget_s) and time_budget_s > 0):
        raise LayoutError(f"time_budget_s: must be a finite number of seconds > 0 (got {time_budget_s!r})")
    rules = rules or Rules(memory=memory)
    m = microbatches_per_home
    cap = math.inf if time_budget_s is None else time_budget_s
    warm: dict = {}  # CP-SAT schedules of this run, reused by later calls on the same routes
    stage_nodes, C, t_place = _setup(cluster, stage_nodes, stage_sizes, num_stages, path_length, memory, m,
                                     seed, 0.3 * cap, effort.placement_evals, warm=warm)
    left = cap - (time.perf_counter() - t0)
    static_deadline = time.perf_counter() + (0.2 if collision_aware else 0.9) * max(0.0, left)
    state, rng = _static_state(cluster, stage_nodes, C, memory, m, path_length, seed, static_deadline, rules,
                               static_iters=effort.static_iters)
    w = cluster.stage_times()
    evals = 0
    policy = "fifo"
    prio = None
    meta: dict[str, Any] = {"builder": "planner", "seed": seed, "cluster": cluster.name,
                            "collision_aware": collision_aware}
    exact_plan = None
    if collision_aware and effort.exact_dtime > 0:
        # Equal links: the CP-SAT plan replaces the simulated search unless FIFO on the static
        # routes already does as well (then the search runs as usual).
        exact_plan = _exact_plan(cluster, state, stage_nodes, C, w, memory, m, path_length, rules, effort, meta)
        if exact_plan is not None:
            static = simulate(state.to_plan(m, path_length, memory, {}), cost=C, stage_times=w, memory=memory,
                              record=False).iteration_s
            if simulate(exact_plan, cost=C, stage_times=w, memory=memory, record=False).iteration_s >= static:
                exact_plan = None
    linked_plan = None
    if collision_aware and exact_plan is None and effort.linked_dtime > 0:
        # Links differ: one route per home (branch and bound) + a CP-SAT schedule, compared below
        # with the simulated search; the faster replay wins.
        linked_plan = _linked_plan(state, stage_nodes, C, w, memory, m, path_length, rules, effort, dict(meta), seed,
                                   warm=warm)
    if linked_plan is not None:
        # Within NEAR_FLOOR of the (sound) route bound: the simulated search cannot gain more.
        # Or below the floor of plans whose every body node carries whole slots, which is all the
        # simulated search builds where capacities are tight (a shared node left one unvisited).
        from .linked import candidates, home_bound, lower_bound
        t_linked = simulate(linked_plan, cost=C, stage_times=w, memory=memory, record=False).iteration_s
        slot_floor = lower_bound(stage_nodes, C, w, memory, m, path_length, rules, DEFAULT_GAP_S, True)
        near = t_linked < slot_floor
        if not near:  # the slowest home alone, few routes and a short solve: cheap, and a floor
            floor = lower_bound(stage_nodes, C, w, memory, m, path_length, rules, DEFAULT_GAP_S)
            slow = max(stage_nodes[0],
                       key=lambda h: candidates(stage_nodes, h, C, w, path_length, rules)[0].round_trip_s)
            if t_linked > (1 + NEAR_FLOOR) * floor:
                floor = max(floor, home_bound(stage_nodes, C, w, memory, m, path_length, rules, DEFAULT_GAP_S, slow,
                                              deterministic_time=0.5, max_routes=8))
            near = t_linked <= (1 + NEAR_FLOOR) * floor
        if near:
            exact_plan = linked_plan
    if collision_aware and exact_plan is None:
        deadline = t0 + 0.97 * cap
        ev, evals, prio = _sim_search(state, rng, deadline, (m, path_length), C, w, memory, effort.sim_evals)
        policy = ev.policy
        if linked_plan is not None:  # keep whichever of the two replays faster
            t_linked = simulate(linked_plan, cost=C, stage_times=w, memory=memory, record=False).iteration_s
            if t_linked < ev.makespan - 1e-9:
                exact_plan = linked_plan
    if exact_plan is not None:
        plan, policy = exact_plan, "node_order"
    else:
        plan = state.to_plan(m, path_length, memory, meta)
    if collision_aware and exact_plan is None:
        sim = simulate(plan, cluster, memory=memory, policy=policy, priority=prio)
        plan.node_order = sim.node_order()
        meta["policy"] = policy
        plan.meta = meta
    violations = validate(plan, rules)
    if violations:  # the moves keep every rule by construction; this guards the construction itself
        raise RuntimeError("planner produced an invalid plan: " + "; ".join(map(str, violations[:5])))
    paper = simulate(plan, cluster, mode="paper", memory=memory).iteration_s
    full = simulate(plan, cluster, mode="full", memory=memory).iteration_s
    return PlannerResult(plan=plan, placement_score=placement_score(C, stage_nodes).total, predicted_paper_s=paper,
                         predicted_full_s=full, runtime_s=time.perf_counter() - t0, stage_nodes=stage_nodes,
                         policy=policy, evaluations=evals, placement_runtime_s=t_place)


def plan_for_training(cluster_name_or_path: str | Cluster, stage_nodes: list[list[int]], path_length: int,
                      memory: int | None, microbatches_per_home: int, seed: int = 0,
                      effort: Effort = Effort()) -> RoutePlan:
    """Plan paths on the training job's rank grid: node ids are ranks, rank i = cluster node i.

    Built-in profiles are sized to the job (world size = largest rank + 1). No time cap: the
    result depends only on the arguments, so every rank computes the same plan. ``memory`` None
    takes the smallest node memory of the cluster."""
    world = max(n for g in stage_nodes for n in g) + 1
    cluster = load_cluster(cluster_name_or_path, num_nodes=world)
    if cluster.num_nodes < world:
        raise LayoutError(f"cluster {cluster.name!r} has {cluster.num_nodes} nodes but the job has {world} ranks; "
                          f"describe every rank in the cluster file")
    if memory is None:
        memory = int(min(cluster.nodes[n].memory for g in stage_nodes for n in g))
    res = plan_routes(cluster, stage_nodes=stage_nodes, num_stages=len(stage_nodes), path_length=path_length,
                      memory=memory, microbatches_per_home=microbatches_per_home, seed=seed, effort=effort)
    return res.plan


# ----------------------------------------------------------------------------- the four variants
@dataclass
class VariantResult:
    """One row of the comparison: a variant's plan and predicted times."""

    name: str
    plan: RoutePlan
    paper_s: float
    full_s: float
    planner_s: float


VARIANTS = ("full pipeline (DT-FM)", "oblivious skip (DT-FM skip)", "skip, no TC2", "ours (TC2)")


def compare_variants(cluster: Cluster | str, stage_nodes: list[list[int]] | None = None,
                     stage_sizes: Sequence[int] | None = None, num_stages: int = 6, path_length: int = 4,
                     memory: int = 3, microbatches_per_home: int = 6, seed: int = 0,
                     time_budget_s: float | None = None,
                     effort: Effort = Effort()) -> tuple[list[VariantResult], PlannerResult]:
    """The four variants on one placement (ours picks it; the others reuse it)."""
    cluster = load_cluster(cluster)
    ours = plan_routes(cluster, stage_nodes, stage_sizes, num_stages, path_length, memory, microbatches_per_home,
                       seed, time_budget_s, effort=effort)
    sn = ours.stage_nodes
    C = cluster.cost_matrix()
    rules = Rules(memory=memory)
    out = []
    t = time.perf_counter()
    full = full_pipeline(sn, microbatches_per_home)
    full.meta["builder"] = "full"
    out.append((VARIANTS[0], full, time.perf_counter() - t))
    t = time.perf_counter()
    st, _ = _static_state(cluster, sn, C, memory, microbatches_per_home, path_length, seed, 0.0, rules, unit=True)
    obl = st.to_plan(microbatches_per_home, path_length, memory, {"builder": "oblivious", "seed": seed})
    out.append((VARIANTS[1], obl, time.perf_counter() - t))
    t = time.perf_counter()
    st, _ = _static_state(cluster, sn, C, memory, microbatches_per_home, path_length, seed, math.inf, rules,
                          static_iters=effort.static_iters)
    notc2 = st.to_plan(microbatches_per_home, path_length, memory, {"builder": "planner-no-tc2", "seed": seed})
    out.append((VARIANTS[2], notc2, time.perf_counter() - t))
    res = []
    for name, plan, secs in out:
        res.append(VariantResult(name, plan, simulate(plan, cluster, mode="paper", memory=memory).iteration_s,
                                 simulate(plan, cluster, mode="full", memory=memory).iteration_s, secs))
    res.append(VariantResult(VARIANTS[3], ours.plan, ours.predicted_paper_s, ours.predicted_full_s, ours.runtime_s))
    return res, ours
