"""Routes and schedule on clusters whose links differ, with OR-tools CP-SAT in two steps.

Why two steps: on a geo-distributed cluster an iteration is as long as its slowest *route slot*
(a home keeps ``slots = min(memory, m)`` microbatches in flight; each slot runs ``m / slots``
microbatches one after another), so the routes decide the floor and the schedule decides how
close to it the plan gets. Both are small integer programs:

1. **routes** (:func:`choose_routes`): per home node, how many of its slots ride each candidate
   route (a CC3/CC4-valid body order and one replica per hop). TC1: a body node carries at most
   its memory of slot routes; CC5: every body stage carries the same number. The objective is the
   collision-free makespan bound: a home's slots leave it one forward apart, so its k-th longest
   slot route ends no earlier than ``k (w + gap) + rounds x round trip + (rounds - 1) gap``.
   A second pass keeps that bound within a slack and minimises the number of (body node, home)
   pairs, because microbatches of one home arrive spaced by the home itself while two homes'
   microbatches collide (SkipPipe's own plan uses one route per home for the same reason).
2. **schedule** (:func:`schedule_routes`): the routes fixed, every op of every microbatch is an
   interval (durations from :mod:`.costmodel`, sends cost C[a][b]); one op at a time per node
   plus the busy gap; a slot's next microbatch starts after the previous one's last backward (the
   simulator's injection rule). Objective: the last home backward. The per-node order of the
   solution becomes ``plan.node_order``.

Determinism: one worker, a fixed random seed and CP-SAT's *deterministic* time limit, so every
rank that plans for itself gets the same plan on any machine. :func:`lower_bound` and the
tighter :func:`tight_lower_bound` (one home scheduled exactly, :func:`home_bound`) are the bounds
printed beside results: no schedule of any routes on this placement can end earlier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Any, Sequence

import numpy as np

from .costmodel import BODY_B, BODY_F, BODY_TOTAL, HOME_B, HOME_F, HOME_TOTAL, LOSS
from .orders import all_orders
from .routeplan import RoutePlan, make_route
from .rules import Rules

UNIT_S = 1e-3  # the solver works in integer milliseconds
MAX_CANDIDATES = 240_000  # all routes of all homes; beyond this the model is not built


@dataclass(frozen=True)
class Candidate:
    """One possible route of a home: body nodes in visiting order and its isolated round trip."""

    nodes: tuple[int, ...]
    round_trip_s: float



def _shape(stage_nodes, memory: int, m: int, path_length: int):
    """(homes, S, hops per route, route slots per home, rounds per slot, node -> stage) of a layout."""
    slots = min(memory, m)
    return (list(stage_nodes[0]), len(stage_nodes), path_length - 1, slots, math.ceil(m / slots),
            {n: s for s, g in enumerate(stage_nodes) for n in g})


def _solve(md: Any, deterministic_time: float, seed: int) -> Any:
    """Solve with one worker and a deterministic time budget (every rank gets the same answer); the
    solver holding a solution, or ``None`` when none was found in the budget."""
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_deterministic_time = deterministic_time
    solver.parameters.random_seed = seed
    status = solver.Solve(md)
    return solver if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None

def round_trip(home: int, nodes: Sequence[int], C: np.ndarray, w: Sequence[float]) -> float:
    """Isolated round trip of one microbatch: its compute plus every send, forward and back.
    The busy gaps are not on a lone microbatch's chain (each follows an op on the node it leaves)."""
    seq = [home, *nodes, home]
    t = w[home] * HOME_TOTAL + sum(w[n] for n in nodes) * BODY_TOTAL
    return t + sum(C[a][b] + C[b][a] for a, b in zip(seq, seq[1:]))


def count_candidates(stage_nodes: Sequence[Sequence[int]], path_length: int, rules: Rules) -> int:
    """How many routes :func:`candidates` would enumerate for all homes (to refuse huge models early)."""
    per_home = sum(math.prod(len(stage_nodes[s]) for s in o)
                   for o in all_orders(len(stage_nodes), path_length - 1, rules))
    return per_home * len(stage_nodes[0])


def candidates(stage_nodes: Sequence[Sequence[int]], home: int, C: np.ndarray, w: Sequence[float],
               path_length: int, rules: Rules) -> list[Candidate]:
    """Every valid route of ``home`` (all orders, all replicas), shortest round trip first.

    Memoised on all inputs (a pure function; the planner asks again for the same placements)."""
    Ca = np.asarray(C, dtype=float)
    key = (Ca.shape, Ca.tobytes(), tuple(float(x) for x in w), tuple(tuple(g) for g in stage_nodes), home,
           path_length, rules)
    hit = _CANDIDATES.get(key)
    if hit is None:
        hit = _candidates(stage_nodes, home, Ca, w, path_length, rules)
        if len(hit) <= _CANDIDATES_MAX_ROUTES:  # large clusters: not kept (memory)
            if len(_CANDIDATES) >= 512:
                _CANDIDATES.pop(next(iter(_CANDIDATES)))
            _CANDIDATES[key] = hit
    return list(hit)


_CANDIDATES: dict = {}  # oldest entries dropped first
_CANDIDATES_MAX_ROUTES = 5000


def _candidates(stage_nodes, home, C, w, path_length, rules) -> list[Candidate]:
    Cl = np.asarray(C).tolist()
    out = []
    for o in all_orders(len(stage_nodes), path_length - 1, rules):
        for nodes in product(*[stage_nodes[s] for s in o]):
            out.append(Candidate(tuple(nodes), round_trip(home, nodes, Cl, w)))
    out.sort(key=lambda c: (c.round_trip_s, c.nodes))
    return out


def lower_bound(stage_nodes: Sequence[Sequence[int]], C: np.ndarray, w: Sequence[float], memory: int, m: int,
                path_length: int, rules: Rules, gap_s: float, every_body_node_carries_slots: bool = False) -> float:
    """No plan on this placement ends before this (paper mode, the simulator's rules).

    Per home: its last slot's first microbatch starts after ``slots - 1`` forwards on the home,
    and each slot runs ``rounds`` microbatches back to back, each at least the home's shortest
    round trip. Also: the busiest home's own compute and gaps.

    ``every_body_node_carries_slots`` adds the shortest round trip through each body node, which
    holds only for plans in which every body node carries ``memory`` whole slots (the slot-route
    planner's structure where capacities are tight). It is NOT a floor on every valid plan: TC1
    counts distinct routes and CC5 visits per stage, so a valid plan may leave a slow body node
    unvisited, or send single microbatches through it. Use it to rank placements, never to print."""
    slots = min(memory, m)
    rounds = math.ceil(m / slots)
    best = 0.0
    via: dict[int, float] = {}  # body node -> shortest round trip of any route through it
    for h in stage_nodes[0]:
        cands = candidates(stage_nodes, h, C, w, path_length, rules)
        if not cands:
            continue
        rt = cands[0].round_trip_s
        wf = w[h] * HOME_F
        best = max(best, (slots - 1) * (wf + gap_s) + rounds * rt + (rounds - 1) * gap_s,
                   m * (w[h] * HOME_TOTAL + 3 * gap_s) - gap_s)
        for c in cands:
            for n in c.nodes:
                via[n] = min(via.get(n, math.inf), c.round_trip_s)
    # Tight memory (every body slot is needed): every body node carries a slot, whose microbatches
    # each take at least the shortest round trip through that node.
    body = [n for g in stage_nodes[1:] for n in g]
    visits = len(stage_nodes[0]) * slots * (path_length - 1)
    if every_body_node_carries_slots and len(body) * memory == visits:
        best = max([best] + [rounds * via[n] + (rounds - 1) * gap_s for n in body if n in via])
    return best


def home_bound(stage_nodes: Sequence[Sequence[int]], C: np.ndarray, w: Sequence[float], memory: int, m: int,
               path_length: int, rules: Rules, gap_s: float, home: int, deterministic_time: float = 2.0,
               max_routes: int = 64) -> float:
    """A floor on any plan's iteration from one home alone (paper mode), tighter than
    :func:`lower_bound` where a home's own microbatches collide on its shortest routes.

    Relaxation: only this home's ``m`` microbatches exist (other homes' ops and body memory only
    add constraints), each picks any route among the home's ``k`` shortest (all of them when
    cheaper), and CP-SAT schedules them exactly under the simulator's rules (one op at a time per
    node plus the gap, link delays, a slot's next microbatch after the previous one's last
    backward), with every duration and link cost rounded *down* to the millisecond. Its proven
    bound B is a floor for plans that keep this home on those routes. A plan that puts one of the
    home's microbatches on a longer route R ends no earlier than ``rt(R) + (r - 1)(rt_min + gap)``
    (its slot runs at least ``r = m // slots`` microbatches back to back), so the floor is
    ``min(B, that)``; the candidate set grows until B is below that threshold (or ``max_routes``)."""
    from ortools.sat.python import cp_model

    slots = min(memory, m)
    r_min = m // slots
    cands = candidates(stage_nodes, home, C, w, path_length, rules)
    if not cands:
        return 0.0
    Cl = np.asarray(C).tolist()
    rt_min = cands[0].round_trip_s
    gap = int(math.floor(gap_s / UNIT_S + 1e-9))

    def ms(x: float) -> int:
        return int(math.floor(x / UNIT_S + 1e-9))

    def solve(sub: list[Candidate]) -> float:
        md = cp_model.CpModel()
        # Room for every microbatch one after another (a feasible schedule), so the horizon never
        # cuts off a schedule and the proven bound stays a floor.
        horizon = m * (ms(sub[-1].round_trip_s) + (2 * len(sub[0].nodes) + 4) * gap) + 1000
        node_iv: dict[int, list] = {}
        firsts, ends = [], []
        for j in range(m):
            pick = [md.NewBoolVar("") for _ in sub]
            md.AddExactlyOne(pick)
            home_st = {}
            for ph, f in (("F", HOME_F), ("L", LOSS), ("B", HOME_B)):
                s = md.NewIntVar(0, horizon, "")
                node_iv.setdefault(home, []).append(md.NewFixedSizeIntervalVar(s, ms(f * w[home]) + gap, ""))
                home_st[ph] = s
            for lit, c in zip(pick, sub):
                body_f, body_b = [], []
                for n in c.nodes:
                    for lst, f in ((body_f, BODY_F), (body_b, BODY_B)):
                        s = md.NewIntVar(0, horizon, "")
                        node_iv.setdefault(n, []).append(
                            md.NewOptionalFixedSizeIntervalVar(s, ms(f * w[n]) + gap, lit, ""))
                        lst.append((n, s, f))
                chain = [(home, home_st["F"], HOME_F)] + body_f + [(home, home_st["L"], LOSS)] + \
                    list(reversed(body_b)) + [(home, home_st["B"], HOME_B)]
                for (a, sa, fa), (b, sb, _) in zip(chain, chain[1:]):
                    md.Add(sb >= sa + ms(fa * w[a]) + (ms(Cl[a][b]) if a != b else 0)).OnlyEnforceIf(lit)
            e = md.NewIntVar(0, horizon, "")
            md.Add(e == home_st["B"] + ms(HOME_B * w[home]))
            firsts.append(home_st["F"])
            ends.append(e)
        for j in range(slots, m):  # the simulator's injection rule
            md.Add(firsts[j] >= ends[j - slots])
        for j in range(1, slots):  # the first wave's slots are interchangeable
            md.Add(firsts[j] >= firsts[j - 1])
        for ivs in node_iv.values():
            md.AddNoOverlap(ivs)
        mk = md.NewIntVar(0, horizon, "")
        md.AddMaxEquality(mk, ends)
        md.Minimize(mk)
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.max_deterministic_time = deterministic_time
        status = solver.Solve(md)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.UNKNOWN):
            return 0.0  # cannot happen (a serial schedule fits); never claim a floor from it
        return max(0.0, solver.BestObjectiveBound() * UNIT_S)  # proven, whether or not the search finished

    def longer(k: int) -> float:  # floor of any plan using a route outside the first k
        return math.inf if k >= len(cands) else cands[k].round_trip_s + (r_min - 1) * (rt_min + gap_s)

    k = sum(1 for c in cands if c.round_trip_s <= rt_min + 1e-9)
    best = 0.0
    for _ in range(4):
        k = min(k, max_routes, len(cands))
        b = solve(cands[:k])
        best = min(b, longer(k))
        if longer(k) >= b or k >= min(max_routes, len(cands)):
            break
        k = sum(1 for c in cands if c.round_trip_s + (r_min - 1) * (rt_min + gap_s) < b)
    return best


def tight_lower_bound(stage_nodes: Sequence[Sequence[int]], C: np.ndarray, w: Sequence[float], memory: int, m: int,
                      path_length: int, rules: Rules, gap_s: float, homes: int = 2,
                      deterministic_time: float = 2.0) -> float:
    """:func:`lower_bound`, raised by :func:`home_bound` of the ``homes`` homes with the longest
    shortest round trip (the max over any subset of homes is a floor; the rest rarely bind)."""
    best = lower_bound(stage_nodes, C, w, memory, m, path_length, rules, gap_s)
    rt = {h: (cs[0].round_trip_s if cs else 0.0)
          for h in stage_nodes[0] for cs in [candidates(stage_nodes, h, C, w, path_length, rules)[:1]]}
    for h in sorted(rt, key=lambda h: -rt[h])[:homes]:
        best = max(best, home_bound(stage_nodes, C, w, memory, m, path_length, rules, gap_s, h,
                                    deterministic_time=deterministic_time))
    return best


def choose_routes(stage_nodes: Sequence[Sequence[int]], C: np.ndarray, w: Sequence[float], memory: int, m: int,
                  path_length: int, cap: dict[int, int], gap_s: float, rules: Rules, slack_s: float = 0.0,
                  deterministic_time: float = 4.0, seed: int = 0,
                  max_per_home: int = 400) -> list[list[int]] | None:
    """Slot routes (home-major: ``slots`` lists of body nodes per home) or None if none was found.

    Only the ``max_per_home`` shortest candidates of each home enter the model (all of them when
    that is infeasible). ``slack_s``: how far above the best makespan bound the second pass may go
    to use fewer (body node, home) pairs."""
    from ortools.sat.python import cp_model

    homes = list(stage_nodes[0])
    S = len(stage_nodes)
    hops = path_length - 1
    slots = min(memory, m)
    rounds = math.ceil(m / slots)
    per_stage = len(homes) * slots * hops // (S - 1)
    stage_of = {n: s for s, g in enumerate(stage_nodes) for n in g}
    all_c = {h: candidates(stage_nodes, h, C, w, path_length, rules) for h in homes}
    gap = int(round(gap_s / UNIT_S))

    def build(limit: int | None, bound_ms: int | None):
        md = cp_model.CpModel()
        cand = {h: all_c[h][:limit] if limit else all_c[h] for h in homes}
        y, b = {}, {}
        for h in homes:
            for i, _ in enumerate(cand[h]):
                y[h, i] = md.NewIntVar(0, slots, "")
                b[h, i] = md.NewBoolVar("")
                md.Add(y[h, i] >= 1).OnlyEnforceIf(b[h, i])
                md.Add(y[h, i] == 0).OnlyEnforceIf(b[h, i].Not())
            md.Add(sum(y[h, i] for i in range(len(cand[h]))) == slots)
        load: dict[int, list] = {n: [] for g in stage_nodes[1:] for n in g}
        visits: dict[int, list] = {s: [] for s in range(1, S)}
        pair: dict[tuple[int, int], list] = {}
        for h in homes:
            for i, c in enumerate(cand[h]):
                for n in c.nodes:
                    load[n].append(y[h, i])
                    visits[stage_of[n]].append(y[h, i])
                    pair.setdefault((n, h), []).append(b[h, i])
        for n, terms in load.items():
            md.Add(sum(terms) <= cap[n])
        for s, terms in visits.items():
            md.Add(sum(terms) == per_stage)
        horizon = int(sum(rounds * cand[h][-1].round_trip_s / UNIT_S for h in homes)) + 10 ** 6
        M = md.NewIntVar(0, horizon, "")
        for h in homes:
            wf = int(round((w[h] * HOME_F + gap_s) / UNIT_S))
            n_c = len(cand[h])
            suffix = [None] * (n_c + 1)
            suffix[n_c] = 0
            for i in reversed(range(n_c)):  # slots on routes at least as long as candidate i
                v = md.NewIntVar(0, slots, "")
                md.Add(v == y[h, i] + (suffix[i + 1] if i + 1 < n_c else 0))
                suffix[i] = v
            for i, c in enumerate(cand[h]):
                base = int(round(rounds * c.round_trip_s / UNIT_S)) + (rounds - 1) * gap
                md.Add(M >= base + wf * (suffix[i] - 1)).OnlyEnforceIf(b[h, i])
        if bound_ms is None:
            md.Minimize(M)
        else:
            md.Add(M <= bound_ms)
            z = []
            for terms in pair.values():
                v = md.NewBoolVar("")
                md.AddMaxEquality(v, terms)
                z.append(v)
            md.Minimize(sum(z) * 10 ** 6 + M)  # fewest (node, home) pairs, then the bound
        return md, cand, y, M

    def solve(md):
        return _solve(md, deterministic_time, seed)

    limit: int | None = max_per_home
    md, cand, y, M = build(limit, None)
    sol = solve(md)
    if sol is None:
        limit = None
        md, cand, y, M = build(limit, None)
        sol = solve(md)
        if sol is None:
            return None
    best_ms = sol.Value(M)
    if slack_s >= 0:
        md2, cand2, y2, M2 = build(limit, best_ms + int(round(slack_s / UNIT_S)))
        sol2 = solve(md2)
        if sol2 is not None:
            sol, cand, y = sol2, cand2, y2
    out: list[list[int]] = []
    for h in homes:
        mine = []
        for i, c in enumerate(cand[h]):
            mine += [list(c.nodes)] * sol.Value(y[h, i])
        # Longest route first: the first slot leaves home first (the bound's ordering).
        mine.sort(key=lambda nodes: -round_trip(h, nodes, np.asarray(C).tolist(), w))
        out += mine
    return out


def schedule_routes(stage_nodes: Sequence[Sequence[int]], slot_routes: Sequence[Sequence[int]], C: np.ndarray,
                    w: Sequence[float], memory: int, m: int, path_length: int, gap_s: float,
                    deterministic_time: float = 4.0, seed: int = 0,
                    meta: dict | None = None, warm: dict | None = None,
                    warm_time: float | None = None) -> tuple[RoutePlan, float] | None:
    """The plan of these slot routes with the CP-SAT schedule as its node_order, and the solver's
    makespan (seconds), or None if no schedule was found in the budget.

    ``warm``: a dict the caller keeps for one planning run. The best schedule of each (placement,
    routes) is stored there; a later call on the same routes whose stored schedule is not proven
    optimal starts its search from it (a hint), so a short budget continues where the earlier
    search stopped (a proven-optimal one is solved afresh: quick, and the same answer as without
    the store), with ``warm_time`` deterministic seconds instead of ``deterministic_time`` where
    given. Deterministic: the dict's content follows from the calls made before."""
    from ortools.sat.python import cp_model

    homes = list(stage_nodes[0])
    slots = min(memory, m)
    stage_of = {n: s for s, g in enumerate(stage_nodes) for n in g}
    replica_of = {n: r for g in stage_nodes for r, n in enumerate(g)}
    Cl = np.asarray(C).tolist()
    gap = int(round(gap_s / UNIT_S))

    def ms(x: float) -> int:
        return int(round(x / UNIT_S))

    md = cp_model.CpModel()
    chains: dict[int, list[tuple[int, str, int]]] = {}
    routes = []
    for hr, h in enumerate(homes):
        for j in range(m):
            nodes = list(slot_routes[hr * slots + j % slots])
            mb = hr * m + j
            routes.append(make_route(mb, stage_nodes, hr, [(stage_of[n], replica_of[n]) for n in nodes]))
            ch = [(h, "F", ms(HOME_F * w[h]))] + [(n, "F", ms(BODY_F * w[n])) for n in nodes]
            ch += [(h, "L", ms(LOSS * w[h]))] + [(n, "B", ms(BODY_B * w[n])) for n in reversed(nodes)]
            ch += [(h, "B", ms(HOME_B * w[h]))]
            chains[mb] = ch
    horizon = sum(sum(d + gap for _, _, d in ch) + sum(ms(Cl[a][b]) for (a, _, _), (b, _, _) in zip(ch, ch[1:]))
                  for ch in chains.values())
    starts: dict[tuple[int, int], cp_model.IntVar] = {}
    per_node: dict[int, list] = {}
    ends = {}
    for mb, ch in chains.items():
        prev_end, prev_node = None, None
        for k, (n, _, d) in enumerate(ch):
            s = md.NewIntVar(0, horizon, "")
            starts[mb, k] = s
            per_node.setdefault(n, []).append(md.NewFixedSizeIntervalVar(s, d + gap, ""))
            if prev_end is not None:
                md.Add(s >= prev_end + (ms(Cl[prev_node][n]) if n != prev_node else 0))
            prev_end, prev_node = s + d, n
        ends[mb] = prev_end
    for hr in range(len(homes)):
        for j in range(slots, m):  # the simulator's injection rule
            md.Add(starts[hr * m + j, 0] >= ends[hr * m + j - slots])
        for j in range(1, min(slots, m)):  # first wave leaves in id order: removes label symmetry
            md.Add(starts[hr * m + j, 0] >= starts[hr * m + j - 1, 0])
    for ivs in per_node.values():
        md.AddNoOverlap(ivs)
    # Body memory: a node that several homes visit holds at most `memory` live activations (from
    # its forward's start to its backward's end). One home alone never exceeds its slots.
    visit_iv: dict[int, list] = {}
    for mb, ch in chains.items():
        k_l = next(k for k, (_, ph, _) in enumerate(ch) if ph == "L")
        for k in range(1, k_l):
            kb = 2 * k_l - k
            n = ch[k][0]
            size = md.NewIntVar(0, horizon, "")
            visit_iv.setdefault(n, []).append(
                md.NewIntervalVar(starts[mb, k], size, starts[mb, kb] + ch[kb][2], ""))
    homes_at: dict[int, set] = {}
    for mb, ch in chains.items():
        for n, _, _ in ch[1:]:
            homes_at.setdefault(n, set()).add(ch[0][0])
    for n, ivs in visit_iv.items():
        if len(homes_at[n]) > 1 and len(ivs) > memory:
            md.AddCumulative(ivs, [1] * len(ivs), memory)
    mk = md.NewIntVar(0, horizon, "")
    for e in ends.values():
        md.Add(mk >= e)
    md.Minimize(mk)
    key = (tuple(tuple(g) for g in stage_nodes), tuple(tuple(r) for r in slot_routes), m, memory, gap)
    prev = warm.get(key) if warm is not None else None
    if prev is not None and not prev[2]:  # continue from the earlier (not proven optimal) schedule
        for sk, v in starts.items():
            md.AddHint(v, prev[0][sk])
        if warm_time is not None:
            deterministic_time = warm_time
    solver = _solve(md, deterministic_time, seed)
    if solver is None:
        return None
    values = {sk: solver.Value(v) for sk, v in starts.items()}
    obj = solver.Value(mk)
    if warm is not None and (prev is None or obj <= prev[1]):
        warm[key] = (values, obj, solver.response_proto.status == cp_model.OPTIMAL)
    return _schedule_plan(stage_nodes, routes, path_length, memory, chains, values, meta), obj * UNIT_S


def _schedule_plan(stage_nodes, routes, path_length: int, memory: int, chains, values, meta) -> RoutePlan:
    """The plan of :func:`schedule_routes` from a schedule's op start times (``values[mb, k]``)."""
    timed: dict[int, list[tuple[int, int, str]]] = {}
    for mb, ch in chains.items():
        home = ch[0][0]
        for k, (n, ph, _) in enumerate(ch):
            if ph == "L":
                continue
            # node_order lists a node's first forward and last backward of a microbatch.
            if n == home and ((ph == "F" and k != 0) or (ph == "B" and k != len(ch) - 1)):
                continue
            timed.setdefault(n, []).append((values[mb, k], mb, ph))
    node_order = {n: [(mb, ph) for _, mb, ph in sorted(v)] for n, v in timed.items()}
    return RoutePlan(stage_nodes=[list(g) for g in stage_nodes], routes=routes, path_length=path_length,
                     layout="ring", memory=memory, node_order=node_order, meta=dict(meta or {}))



def solve_joint(stage_nodes: Sequence[Sequence[int]], C: np.ndarray, w: Sequence[float], memory: int, m: int,
                path_length: int, cap: dict[int, int], gap_s: float, rules: Rules, per_home: int = 16, per_order: int = 1,
                extra_routes: Sequence[Sequence[int]] = (), hint: Sequence[Sequence[int]] | None = None,
                deterministic_time: float = 8.0, seed: int = 0) -> list[list[int]] | None:
    """Routes and schedule in one CP-SAT model; returns the slot routes (home-major) or None.

    Each slot picks one of its home's ``per_home`` shortest candidate routes (plus
    ``extra_routes`` of that home, e.g. a known feasible plan's, so the model is never empty);
    the ops of every microbatch are intervals whose node and link delays follow the pick.
    ``hint`` (slot routes) seeds the search. The caller schedules the chosen routes again with
    :func:`schedule_routes` (a smaller model) and keeps whichever replays faster."""
    from ortools.sat.python import cp_model

    homes, S, hops, slots, rounds, stage_of = _shape(stage_nodes, memory, m, path_length)
    Cl = np.asarray(C).tolist()
    gap = int(round(gap_s / UNIT_S))

    def ms(x: float) -> int:
        return int(round(x / UNIT_S))

    cand: dict[int, list[tuple[int, ...]]] = {}
    for h in homes:
        allc = candidates(stage_nodes, h, C, w, path_length, rules)
        lst = [c.nodes for c in allc[:per_home]]
        # Plus the best replicas of every stage order, so CC5 and TC1 can always be met.
        seen_order: dict[tuple[int, ...], int] = {}
        for c in allc:
            o = tuple(stage_of[n] for n in c.nodes)
            if seen_order.get(o, 0) < per_order and c.nodes not in lst:
                lst.append(c.nodes)
                seen_order[o] = seen_order.get(o, 0) + 1
        for hr in range(len(homes)):
            for r in list(extra_routes[hr * slots:(hr + 1) * slots]) + list(
                    (hint or [])[hr * slots:(hr + 1) * slots]):
                if homes[hr] == h and tuple(r) not in lst:
                    lst.append(tuple(r))
        cand[h] = lst
    md = cp_model.CpModel()
    pick: dict[tuple[int, int, int], cp_model.IntVar] = {}
    for hr, h in enumerate(homes):
        for j in range(slots):
            for c in range(len(cand[h])):
                pick[hr, j, c] = md.NewBoolVar("")
            md.AddExactlyOne(pick[hr, j, c] for c in range(len(cand[h])))
            if j:  # slots of a home are interchangeable: picks in candidate order
                md.Add(sum(c * pick[hr, j - 1, c] for c in range(len(cand[h]))) <=
                       sum(c * pick[hr, j, c] for c in range(len(cand[h]))))
    per_stage = len(homes) * slots * hops // (S - 1)
    for s in range(1, S):
        md.Add(sum(v for (hr, j, c), v in pick.items() for n in cand[homes[hr]][c] if stage_of[n] == s) == per_stage)
    x: dict[tuple[int, int, int, int], cp_model.IntVar] = {}
    for hr, h in enumerate(homes):
        for j in range(slots):
            for k in range(hops):
                nodes_k = sorted({cand[h][c][k] for c in range(len(cand[h]))})
                for n in nodes_k:
                    v = md.NewBoolVar("")
                    md.Add(v == sum(pick[hr, j, c] for c in range(len(cand[h])) if cand[h][c][k] == n))
                    x[hr, j, k, n] = v
    for n in [n for g in stage_nodes[1:] for n in g]:
        md.Add(sum(v for (hr, j, k, nn), v in x.items() if nn == n) <= cap[n])
    horizon = int(rounds * len(homes) * slots * max(c.round_trip_s for h in homes
                                                     for c in candidates(stage_nodes, h, C, w, path_length,
                                                                         rules)[:1]) / UNIT_S) + 10 ** 6
    node_iv: dict[int, list] = {}
    ends = []
    for hr, h in enumerate(homes):
        for j in range(slots):
            prev_end = None
            for r in range(rounds):
                if j + r * slots >= m:
                    break
                pos_nodes: list[list[int]] = []  # per chain position: the possible nodes
                seq = [("home", "F")] + [(k, "F") for k in range(hops)] + [("home", "L")] + \
                      [(k, "B") for k in reversed(range(hops))] + [("home", "B")]
                st = []
                for p, (k, ph) in enumerate(seq):
                    s = md.NewIntVar(0, horizon, "")
                    st.append(s)
                    if k == "home":
                        d = ms({"F": HOME_F, "L": LOSS, "B": HOME_B}[ph] * w[h])
                        node_iv.setdefault(h, []).append(md.NewFixedSizeIntervalVar(s, d + gap, ""))
                        pos_nodes.append([h])
                    else:
                        f = BODY_F if ph == "F" else BODY_B
                        nodes_k = sorted({cand[h][c][k] for c in range(len(cand[h]))})
                        for n in nodes_k:
                            node_iv.setdefault(n, []).append(md.NewOptionalFixedSizeIntervalVar(
                                s, ms(f * w[n]) + gap, x[hr, j, k, n], ""))
                        pos_nodes.append(nodes_k)
                if prev_end is not None:
                    md.Add(st[0] >= prev_end)  # the simulator's injection rule
                # Durations and link delays follow the pick.
                for c, route in enumerate(cand[h]):
                    nodes = [h] + list(route) + [h] + list(reversed(route)) + [h]
                    lit = pick[hr, j, c]
                    for p in range(len(seq) - 1):
                        a, b = nodes[p], nodes[p + 1]
                        k, ph = seq[p]
                        d = ms(({"F": HOME_F, "L": LOSS, "B": HOME_B}[ph] if k == "home" else
                                (BODY_F if ph == "F" else BODY_B)) * w[a])
                        md.Add(st[p + 1] >= st[p] + d + (ms(Cl[a][b]) if a != b else 0)).OnlyEnforceIf(lit)
                end = md.NewIntVar(0, horizon, "")
                md.Add(end == st[-1] + ms(HOME_B * w[h]))
                ends.append(end)
                prev_end = end
    for ivs in node_iv.values():
        md.AddNoOverlap(ivs)
    mk = md.NewIntVar(0, horizon, "")
    md.AddMaxEquality(mk, ends)
    md.Minimize(mk)
    if hint is not None:
        for hr, h in enumerate(homes):
            chosen = sorted(cand[h].index(tuple(r)) for r in hint[hr * slots:(hr + 1) * slots])
            for j in range(slots):
                for c in range(len(cand[h])):
                    md.AddHint(pick[hr, j, c], int(c == chosen[j]))
    solver = _solve(md, deterministic_time, seed)
    if solver is None:
        return None
    out = []
    for hr, h in enumerate(homes):
        for j in range(slots):
            c = next(c for c in range(len(cand[h])) if solver.Value(pick[hr, j, c]))
            out.append(list(cand[h][c]))
    return out



def choose_one_route_per_home(stage_nodes: Sequence[Sequence[int]], C: np.ndarray, w: Sequence[float], memory: int,
                              m: int, path_length: int, cap: dict[int, int], gap_s: float, rules: Rules,
                              max_nodes: int = 400_000, shared: int = 0) -> list[list[int]] | None:
    """Every slot of a home on one route (SkipPipe's own structure): a home's microbatches then
    arrive at its body nodes spaced by the home itself, and with tight capacities no two homes
    share a body node. Depth-first branch and bound over homes (hardest first), minimising the
    collision-free makespan bound, then the sum of the homes' bounds; ``max_nodes`` counts
    candidates tried (deterministic). Slot routes home-major, or None when no such plan exists.

    ``shared``: how many (body node, home) pairs may go beyond ``cap // slots`` homes per node. TC1
    counts distinct routes, so a node with memory 3 may carry up to 3 homes' one route each; the
    schedule must then keep its live activations within memory (:func:`schedule_routes` does).
    Sharing lets a plan leave a slow body node unvisited (CC5 counts visits per stage, not per
    node), at the price of collisions between the homes that share."""
    homes, S, hops, slots, rounds, stage_of = _shape(stage_nodes, memory, m, path_length)
    per_stage = len(homes) * slots * hops // (S - 1)
    if per_stage % slots:
        return None
    uses = {n: cap[n] // slots for g in stage_nodes[1:] for n in g}  # homes a body node can carry
    routes_left = {n: cap[n] for n in uses}  # TC1: distinct routes (one per home here)
    extra = [shared]

    def bound(h: int, rt: float) -> float:
        return (slots - 1) * (w[h] * HOME_F + gap_s) + (rounds - 1) * gap_s + rounds * rt

    cand = {}
    for h in homes:
        best: dict[frozenset, Candidate] = {}
        for c in candidates(stage_nodes, h, C, w, path_length, rules):
            best.setdefault(frozenset(c.nodes), c)  # shortest order of each node set
        cand[h] = sorted(((bound(h, c.round_trip_s), c) for c in best.values()), key=lambda x: (x[0], x[1].nodes))
    order = sorted(homes, key=lambda h: -cand[h][0][0] if cand[h] else 0)
    rest_min = [sum(cand[h][0][0] for h in order[k:]) for k in range(len(order))] + [0.0]
    need = {s: per_stage // slots for s in range(1, S)}
    # The search below is the plain depth-first branch and bound (same visiting order, same node
    # count, same answer), written with flat per-candidate tuples and local counters: it is the
    # planner's hottest Python loop (the spare-node step runs it for every swap).
    flat = {h: [(b, c, c.nodes, tuple(stage_of[n] for n in c.nodes)) for b, c in cand[h]] for h in homes}
    best_key = [math.inf, math.inf]
    best_sol: list = [None]
    count = [0]
    chosen: list[Candidate] = []
    n_homes = len(order)

    def dfs(k: int, mx: float, total: float) -> None:
        if count[0] >= max_nodes:
            return
        count[0] += 1
        if k == n_homes:
            if mx < best_key[0] or (mx == best_key[0] and total < best_key[1]):
                best_key[0], best_key[1] = mx, total
                best_sol[0] = list(chosen)
            return
        rest = rest_min[k + 1]
        for b, c, nodes, stages in flat[order[k]]:
            count[0] += 1
            if count[0] >= max_nodes:
                return
            nmx = mx if mx > b else b
            k0, k1 = best_key
            if nmx > k0 or (nmx == k0 and total + b + rest >= k1):
                if b >= k0:
                    break  # sorted: every later candidate is at least as long
                continue
            ok = True
            for n in nodes:
                if routes_left[n] == 0:
                    ok = False
                    break
            if ok:
                for st in stages:
                    if need[st] == 0:
                        ok = False
                        break
            if not ok:
                continue
            n_over = 0
            for n in nodes:
                if uses[n] <= 0:
                    n_over += 1
            if n_over > extra[0]:
                continue
            extra[0] -= n_over
            for n in nodes:
                uses[n] -= 1
                routes_left[n] -= 1
            for st in stages:
                need[st] -= 1
            chosen.append(c)
            dfs(k + 1, nmx, total + b)
            chosen.pop()
            extra[0] += n_over
            for n in nodes:
                uses[n] += 1
                routes_left[n] += 1
            for st in stages:
                need[st] += 1

    dfs(0, 0.0, 0.0)
    if best_sol[0] is None:
        return None
    by_home = dict(zip(order, best_sol[0]))
    return [list(by_home[h].nodes) for h in homes for _ in range(slots)]


__all__ = ["Candidate", "round_trip", "candidates", "count_candidates", "lower_bound", "home_bound",
           "tight_lower_bound", "choose_routes", "schedule_routes", "solve_joint", "choose_one_route_per_home"]
