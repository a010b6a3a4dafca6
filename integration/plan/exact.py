"""Exact routes + schedule for clusters whose links all cost the same (one data centre, one region).

When every link costs the same, routing cannot win time on the links; only collisions (two
microbatches wanting one node) and the order each node serves its work decide the iteration time.
That is a scheduling problem small enough for a constraint solver, so here it is solved as one
(OR-tools CP-SAT) instead of searched with the simulator in the loop:

* **hop layers**: body nodes, sorted by (stage, replica), are cut into ``hops`` equal layers and a
  node only serves hop position k of its layer. All microbatches of a home leave it one forward
  apart, so a node that serves one hop position sees its visitors arrive spaced by that interval
  instead of piled up; the sorted layering keeps every route increasing (swaps stay allowed).
  Where each node carries exactly one route of every slot, that is required too, which spreads a
  home's first and last microbatches over different nodes.
* **model**: per slot route a CC3/CC4-valid stage order and one node per hop (TC1: at most the
  node's capacity of routes; CC5: every body stage carries the same number of routes); per
  microbatch its nine ops (F home, F per hop, L, B per hop, B home) as intervals joined by the link
  cost; one op at a time per node with the busy gap after each; home memory as a cumulative; the
  next microbatch of a slot starts after the previous one's last backward (the simulator's
  injection rule). Objective: the last backward on any home (paper mode's iteration time).
* **determinism**: one search worker and a *deterministic* time limit, so every rank of a training
  job that plans for itself gets the same plan on any machine.

The per-node order of the solver's schedule becomes ``plan.node_order``; the planner replays it in
the simulator and keeps whichever of this plan and its own search is faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .costmodel import BODY_B, LOSS
from .orders import all_orders
from .routeplan import RoutePlan, make_route
from .rules import Rules

UNIT_S = 1e-3  # the solver works in integer milliseconds


@dataclass
class ExactResult:
    """The solver's plan, its own makespan (seconds, at millisecond resolution) and how it ended."""

    plan: RoutePlan
    makespan_s: float
    status: str
    solver_s: float


def uniform_link_cost(C: np.ndarray, nodes: Sequence[int], rel_tol: float = 1e-6) -> float | None:
    """The common cost of every link between ``nodes``, or None when links differ."""
    idx = list(nodes)
    sub = np.asarray(C)[np.ix_(idx, idx)]
    off = sub[~np.eye(len(idx), dtype=bool)]
    if off.size == 0:
        return None
    lo, hi = float(off.min()), float(off.max())
    return hi if hi - lo <= rel_tol * max(hi, 1e-12) else None


def applicable(stage_nodes: Sequence[Sequence[int]], C: np.ndarray, memory: int, m: int, path_length: int,
               cap: dict[int, int], max_body_nodes: int = 40) -> str | None:
    """None when :func:`solve_uniform` can model this layout, else why not (for the planner's log)."""
    body = [n for g in stage_nodes[1:] for n in g]
    hops = path_length - 1
    slots = min(memory, m)
    if uniform_link_cost(C, [n for g in stage_nodes for n in g]) is None:
        return "links differ"
    if len(body) > max_body_nodes:
        return f"{len(body)} body nodes > {max_body_nodes}"
    if hops < 1 or len(body) % hops:
        return f"{len(body)} body nodes do not split into {hops} hop layers"
    if m % slots:
        return f"{m} microbatches per home do not fill {slots} slots evenly (CC5 counts microbatches)"
    n_routes = len(stage_nodes[0]) * slots
    if (n_routes * hops) % (len(stage_nodes) - 1):
        return "route visits do not divide evenly over the body stages (CC5)"
    per_layer = len(body) // hops
    layers = [body[i * per_layer:(i + 1) * per_layer] for i in range(hops)]
    if any(sum(cap[n] for n in layer) < n_routes for layer in layers):
        return "a hop layer has fewer route slots than routes"
    return None


def solve_uniform(stage_nodes: Sequence[Sequence[int]], C: np.ndarray, w: Sequence[float], memory: int, m: int,
                  path_length: int, cap: dict[int, int], gap_s: float, rules: Rules,
                  deterministic_time: float = 6.0, meta: dict | None = None) -> ExactResult | None:
    """Solve routes + schedule with CP-SAT (see the module docstring); None when no solution was found.

    Call :func:`applicable` first. ``deterministic_time`` is CP-SAT's deterministic budget (about a
    second of one core each on this machine class)."""
    from ortools.sat.python import cp_model

    stage_nodes = [list(g) for g in stage_nodes]
    homes = stage_nodes[0]
    body = [n for g in stage_nodes[1:] for n in g]
    stage_of = {n: s for s, g in enumerate(stage_nodes) for n in g}
    replica_of = {n: r for g in stage_nodes for r, n in enumerate(g)}
    hops = path_length - 1
    slots = min(memory, m)
    per_layer = len(body) // hops
    layer_nodes = [body[k * per_layer:(k + 1) * per_layer] for k in range(hops)]
    link = int(round(uniform_link_cost(C, homes + body) / UNIT_S))
    gap = int(round(gap_s / UNIT_S))
    dur = {n: int(round(w[n] / UNIT_S)) for n in homes + body}            # forward
    dur_b = {n: int(round(BODY_B * w[n] / UNIT_S)) for n in homes + body}    # backward
    one_per_slot = all(cap[n] == slots for n in body)

    md = cp_model.CpModel()
    routes = [(h, j) for h in range(len(homes)) for j in range(slots)]
    orders = all_orders(len(stage_nodes), hops, rules)
    x: dict[tuple[int, int, int], cp_model.IntVar] = {}
    for rt in routes:
        pick = [md.NewBoolVar("") for _ in orders]
        md.AddExactlyOne(pick)
        for k in range(hops):
            for n in layer_nodes[k]:
                x[rt, k, n] = md.NewBoolVar("")
            md.AddExactlyOne(x[rt, k, n] for n in layer_nodes[k])
            for s in range(1, len(stage_nodes)):
                md.Add(sum(x[rt, k, n] for n in layer_nodes[k] if stage_of[n] == s) ==
                       sum(p for p, o in zip(pick, orders) if o[k] == s))
    for k in range(hops):
        for n in layer_nodes[k]:
            uses = [x[rt, k, n] for rt in routes]
            md.Add(sum(uses) <= cap[n])
            if one_per_slot:
                for j in range(slots):
                    md.Add(sum(x[rt, k, n] for rt in routes if rt[1] == j) == 1)
    per_stage = len(routes) * hops // (len(stage_nodes) - 1)
    for s in range(1, len(stage_nodes)):
        md.Add(sum(v for (rt, k, n), v in x.items() if stage_of[n] == s) == per_stage)

    horizon = sum(int(2.75 * dur[h]) + 2 * gap for h in homes) * m + sum(
        int(2.5 * dur[n]) + 2 * gap + 2 * link for n in body) * m
    home_ops: dict[int, list] = {h: [] for h in range(len(homes))}
    home_live: dict[int, list] = {h: [] for h in range(len(homes))}
    node_ops: dict[int, list] = {n: [] for n in body}
    starts: dict[tuple, cp_model.IntVar] = {}
    ends = []

    def var() -> cp_model.IntVar:
        return md.NewIntVar(0, horizon, "")

    for h, home in enumerate(homes):
        dF, dL, dB = dur[home], int(round(LOSS * w[home] / UNIT_S)), dur_b[home]
        for j in range(m):
            rt = (h, j % slots)
            mb = (h, j)
            f0 = starts[mb, "F", -1] = var()
            home_ops[h].append(md.NewFixedSizeIntervalVar(f0, dF + gap, ""))
            prev = f0 + dF
            for k in range(hops):
                s = starts[mb, "F", k] = var()
                md.Add(s >= prev + link)
                for n in layer_nodes[k]:
                    node_ops[n].append(md.NewOptionalFixedSizeIntervalVar(s, dur[n] + gap, x[rt, k, n], ""))
                prev = s + sum(dur[n] * x[rt, k, n] for n in layer_nodes[k])
            lo = starts[mb, "L"] = var()
            md.Add(lo >= prev + link)
            home_ops[h].append(md.NewFixedSizeIntervalVar(lo, dL + gap, ""))
            prev = lo + dL
            for k in reversed(range(hops)):
                s = starts[mb, "B", k] = var()
                md.Add(s >= prev + link)
                for n in layer_nodes[k]:
                    node_ops[n].append(md.NewOptionalFixedSizeIntervalVar(s, dur_b[n] + gap, x[rt, k, n], ""))
                prev = s + sum(dur_b[n] * x[rt, k, n] for n in layer_nodes[k])
            b0 = starts[mb, "B", -1] = var()
            md.Add(b0 >= prev + link)
            home_ops[h].append(md.NewFixedSizeIntervalVar(b0, dB + gap, ""))
            end = var()
            md.Add(end == b0 + dB)
            ends.append(end)
            home_live[h].append(md.NewIntervalVar(f0, var(), end, ""))
            if j >= slots:  # the simulator's injection rule: same slot, after the previous one's end
                md.Add(f0 >= starts[(h, j - slots), "B", -1] + dB)
    for h in range(len(homes)):
        md.AddNoOverlap(home_ops[h])
        md.AddCumulative(home_live[h], [1] * m, min(memory, m))
        for j in range(1, m):  # microbatch ids leave home in order: removes label symmetry
            md.Add(starts[(h, j), "F", -1] >= starts[(h, j - 1), "F", -1])
    for n in body:
        md.AddNoOverlap(node_ops[n])
    makespan = var()
    md.AddMaxEquality(makespan, ends)
    md.Minimize(makespan)

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_deterministic_time = deterministic_time
    solver.parameters.random_seed = 0
    status = solver.Solve(md)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None

    route_nodes = {rt: [next(n for n in layer_nodes[k] if solver.Value(x[rt, k, n])) for k in range(hops)]
                   for rt in routes}
    plan_routes = []
    for h in range(len(homes)):
        for j in range(m):
            nodes = route_nodes[(h, j % slots)]
            plan_routes.append(make_route(h * m + j, stage_nodes, h,
                                          [(stage_of[n], replica_of[n]) for n in nodes]))
    timed: dict[int, list[tuple[int, int, str]]] = {}
    for h, home in enumerate(homes):
        for j in range(m):
            mb = (h, j)
            gid = h * m + j
            nodes = route_nodes[(h, j % slots)]
            timed.setdefault(home, []).append((solver.Value(starts[mb, "F", -1]), gid, "F"))
            timed[home].append((solver.Value(starts[mb, "B", -1]), gid, "B"))
            for k, n in enumerate(nodes):
                timed.setdefault(n, []).append((solver.Value(starts[mb, "F", k]), gid, "F"))
                timed[n].append((solver.Value(starts[mb, "B", k]), gid, "B"))
    node_order = {n: [(mb, ph) for _, mb, ph in sorted(ops)] for n, ops in timed.items()}
    plan = RoutePlan(stage_nodes=stage_nodes, routes=plan_routes, path_length=path_length, layout="ring",
                     memory=memory, node_order=node_order, meta=dict(meta or {}))
    return ExactResult(plan=plan, makespan_s=solver.Value(makespan) * UNIT_S, status=solver.StatusName(status),
                       solver_s=solver.WallTime())


def solver_available() -> bool:
    """Whether OR-tools can be imported (it is a dependency; this guards broken installs)."""
    try:
        import ortools.sat.python.cp_model  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["ExactResult", "applicable", "solve_uniform", "uniform_link_cost", "solver_available"]
