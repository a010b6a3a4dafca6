"""Plans users need without a planner: full pipeline, CheckFree+ swaps, network-oblivious skipping.

Every builder returns a RoutePlan that passes :func:`integration.plan.rules.validate` with the
default rules, or raises ``ValueError`` naming the parameter that makes that impossible.
Microbatch ids are numbered home replica by home replica: home replica r owns ids
``r*m .. r*m + m - 1`` (m = ``microbatches_per_home``), matching data addressed by
(step, home replica, index).
"""

from __future__ import annotations

import random
from typing import Sequence

from .routeplan import RoutePlan, make_route, route_slots


def _check_common(stage_nodes: Sequence[Sequence[int]], microbatches_per_home: int) -> None:
    if len(stage_nodes) < 2:
        raise ValueError(f"parallel.stages: a pipeline needs at least 2 stages, got {len(stage_nodes)}")
    if any(len(s) == 0 for s in stage_nodes):
        raise ValueError("stage_nodes: every stage needs at least one node")
    if microbatches_per_home < 1:
        raise ValueError(f"microbatches_per_home must be >= 1, got {microbatches_per_home}")


def _column(stage_nodes: Sequence[Sequence[int]], stage: int, home_replica: int) -> int:
    """Replica of ``stage`` on the home replica's column (wraps when stages have fewer replicas)."""
    return home_replica % len(stage_nodes[stage])


def full_pipeline(stage_nodes: Sequence[Sequence[int]], microbatches_per_home: int,
                  layout: str = "ring") -> RoutePlan:
    """Every microbatch visits every body stage in order, on its home replica's column (DT-FM)."""
    _check_common(stage_nodes, microbatches_per_home)
    S = len(stage_nodes)
    routes = []
    for r in range(len(stage_nodes[0])):
        for j in range(microbatches_per_home):
            hops = [(s, _column(stage_nodes, s, r)) for s in range(1, S)]
            routes.append(make_route(r * microbatches_per_home + j, stage_nodes, r, hops))
    return RoutePlan(stage_nodes=[list(s) for s in stage_nodes], routes=routes, path_length=S,
                     layout=layout, meta={"builder": "full"})


def checkfree_plus_order(num_body_stages: int, swapped: bool) -> list[int]:
    """Body-stage order of the CheckFree+ pattern for any number of body stages L >= 4.

    Swapped microbatches run S2, S1, S3, ..., S_{L-2}, S_L, S_{L-1} (the first two and the last two
    body stages exchanged); the others run 1..L in order.
    """
    L = num_body_stages
    if L < 4:
        raise ValueError(f"CheckFree+ swaps need at least 4 body stages (transformer stages), got {L}")
    order = list(range(1, L + 1))
    if swapped:
        order[0], order[1] = order[1], order[0]
        order[-2], order[-1] = order[-1], order[-2]
    return order


def checkfree_plus(stage_nodes: Sequence[Sequence[int]], microbatches_per_home: int) -> RoutePlan:
    """CheckFree+ out-of-order pattern: odd microbatches (per home) swap the edge stage pairs.

    Needs the ring layout (the head lives on the home stage, so the last body stage can move), an
    even microbatch count per home and at least 4 body stages.
    """
    _check_common(stage_nodes, microbatches_per_home)
    if microbatches_per_home % 2:
        raise ValueError(f"train.microbatches: CheckFree+ needs an even microbatch count per home replica "
                         f"(half in order, half swapped), got {microbatches_per_home}")
    L = len(stage_nodes) - 1
    routes = []
    for r in range(len(stage_nodes[0])):
        for j in range(microbatches_per_home):
            order = checkfree_plus_order(L, swapped=(j % 2 == 1))
            routes.append(make_route(r * microbatches_per_home + j, stage_nodes, r,
                                     [(s, _column(stage_nodes, s, r)) for s in order]))
    return RoutePlan(stage_nodes=[list(s) for s in stage_nodes], routes=routes, path_length=len(stage_nodes),
                     layout="ring", meta={"builder": "checkfree_plus"})


def path_length_for_ratio(num_stages: int, skip_ratio: float) -> int:
    """L = round(S * (1 - k)), at least 2 (home plus one body stage)."""
    if not 0.0 <= skip_ratio < 1.0:
        raise ValueError(f"routing.skip_ratio must be in [0, 1), got {skip_ratio}")
    return max(2, min(num_stages, round(num_stages * (1.0 - skip_ratio))))


def oblivious_skip(stage_nodes: Sequence[Sequence[int]], microbatches_per_home: int, path_length: int,
                   seed: int = 0, swap_prob: float = 0.0, memory: int | None = None,
                   layout: str = "ring", max_jump: int = 4) -> RoutePlan:
    """Network-oblivious skipping: random routes of ``path_length`` stages satisfying CC1-CC5 and TC1.

    With ``memory`` set, each home replica uses ``memory`` distinct route slots and microbatch j
    takes slot j % memory (so every node serves at most ``memory`` distinct routes, as in SkipPipe);
    otherwise every microbatch gets its own route. Body stages are chosen so that every body
    stage gets the same number of visits (CC5); replicas are load-balanced. ``swap_prob`` swaps
    adjacent consecutive stages (distance 1) at most twice per route. Seeded and reproducible.
    """
    _check_common(stage_nodes, microbatches_per_home)
    S = len(stage_nodes)
    B = S - 1
    hops_per_route = path_length - 1
    if not 2 <= path_length <= S:
        raise ValueError(f"routing.path_length must be in 2..{S} (stages incl. home), got {path_length}")
    homes = len(stage_nodes[0])
    if memory is not None:
        if memory < 1:
            raise ValueError(f"routing.memory must be >= 1, got {memory}")
        slots = route_slots(memory, microbatches_per_home)
        if slots is None:
            raise ValueError(f"train.microbatches: {microbatches_per_home} microbatches per home are not a "
                             f"multiple of memory={memory} route slots; use a multiple so every slot is used "
                             f"equally (CC5)")
    else:
        slots = microbatches_per_home
    n_routes = homes * slots
    if layout == "linear":
        # The last stage is always visited; balance the other body stages.
        free, fixed = list(range(1, B)), [B]
        per_route = hops_per_route - 1
    else:
        free, fixed = list(range(1, B + 1)), []
        per_route = hops_per_route
    if per_route < 0 or (layout == "linear" and path_length < 2):
        raise ValueError("routing.path_length too short for the linear layout (it must reach the last stage)")
    if free and (n_routes * per_route) % len(free):
        raise ValueError(
            f"routing: CC5 (equal visits) cannot hold: {n_routes} routes x {per_route} free hops are not "
            f"divisible by {len(free)} skippable stages; change train.microbatches, routing.memory or "
            f"routing.path_length")
    rng = random.Random(seed)
    target = (n_routes * per_route) // len(free) if free else 0
    # Greedy on the largest remaining counts keeps CC5 balanced; with CC4 binding (S > 6) a route may
    # have to take a less-needed stage, so an unlucky draw is retried with the next random state.
    for _attempt in range(50):
        slot_stages = _balanced_stage_sets(free, fixed, per_route, n_routes, target, max_jump, rng)
        if slot_stages is not None:
            break
    else:
        raise ValueError(f"routing: no CC5-balanced stage sets within the CC4 jump limit ({max_jump}) for "
                         f"S={S}, L={path_length}; use a longer routing.path_length")
    replica_load = {s: [0] * len(stage_nodes[s]) for s in range(1, S)}
    slot_routes: list[list[tuple[int, int]]] = []
    for chosen in slot_stages:
        order = _random_swaps(chosen, rng, swap_prob, layout, max_jump)
        hops = []
        for s in order:
            loads = replica_load[s]
            best = min(loads)
            rep = rng.choice([i for i, v in enumerate(loads) if v == best])
            loads[rep] += 1
            hops.append((s, rep))
        slot_routes.append(hops)
    routes = []
    for r in range(homes):
        for j in range(microbatches_per_home):
            hops = slot_routes[r * slots + (j % slots)]
            routes.append(make_route(r * microbatches_per_home + j, stage_nodes, r, hops))
    return RoutePlan(stage_nodes=[list(s) for s in stage_nodes], routes=routes, path_length=path_length,
                     layout=layout, memory=memory,
                     meta={"builder": "oblivious_skip", "seed": seed, "swap_prob": swap_prob})


def _balanced_stage_sets(free: list[int], fixed: list[int], per_route: int, n_routes: int, target: int,
                         max_jump: int, rng: random.Random) -> list[list[int]] | None:
    """Stage sets (ascending) for every route: CC4-feasible, each free stage used ``target`` times."""
    remaining = {s: target for s in free}
    out = []
    for _ in range(n_routes):
        chosen = _best_jump_feasible(free, fixed, per_route, remaining, max_jump, rng)
        if chosen is None:
            return None
        for s in chosen:
            remaining[s] -= 1
        out.append(chosen + fixed)
    return out if all(v == 0 for v in remaining.values()) else None


def _best_jump_feasible(free: list[int], fixed: list[int], k: int, remaining: dict[int, int], max_jump: int,
                        rng: random.Random) -> list[int] | None:
    """The k free stages with the largest remaining counts (random tie-break) whose ascending walk from
    stage 0 (and on to the fixed last stage) never skips more than ``max_jump`` stages. A small DP over
    (last chosen stage, count); stages with nothing remaining are avoided but allowed when needed."""
    value = {s: (remaining[s] if remaining[s] > 0 else -len(free) * 10) + rng.random() * 1e-3 for s in free}
    end = fixed[0] if fixed else None
    if k == 0:
        return [] if end is None or end - 1 <= max_jump else None
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}
    for i, s in enumerate(free):
        if s - 1 <= max_jump:
            best[(i, 1)] = (value[s], [s])
    for c in range(2, k + 1):
        for i, s in enumerate(free):
            cands = [(v + value[s], path + [s]) for (j, cc), (v, path) in best.items()
                     if cc == c - 1 and j < i and s - free[j] - 1 <= max_jump]
            if cands:
                best[(i, c)] = max(cands, key=lambda t: t[0])
    finals = [(v, path) for (i, c), (v, path) in best.items()
              if c == k and (end is None or end - free[i] - 1 <= max_jump)]
    return max(finals, key=lambda t: t[0])[1] if finals else None


def _jumps_ok(order: list[int], max_jump: int) -> bool:
    f = 0
    for s in order:
        if s > f:
            if s - f - 1 > max_jump:
                return False
            f = s
    return True


def _random_swaps(order: list[int], rng: random.Random, prob: float, layout: str, max_jump: int = 4) -> list[int]:
    """Swap neighbours that are consecutive stages (distance-1 swaps), at most twice, never reusing one,
    and never when the swap would make a forward jump exceed ``max_jump`` (CC4)."""
    out = list(order)
    if prob <= 0:
        return out
    limit = len(out) - 1 if layout == "ring" else len(out) - 2  # linear: the loss stage stays last
    i, swaps = 0, 0
    while i < limit and swaps < 2:
        if out[i + 1] == out[i] + 1 and rng.random() < prob:
            trial = out[:i] + [out[i + 1], out[i]] + out[i + 2:]
            if _jumps_ok(trial, max_jump):
                out = trial
                swaps += 1
                i += 2  # a stage takes part in at most one swap, so each swap has distance 1
                continue
        i += 1
    return out


def build_plan(kind: str, stage_nodes: Sequence[Sequence[int]], microbatches_per_home: int, *,
               layout: str = "ring", path_length: int | None = None, skip_ratio: float | None = None,
               seed: int = 0, swap_prob: float = 0.0, memory: int | None = None) -> RoutePlan:
    """One entry point for the config: ``kind`` in full | checkfree_plus | skip."""
    if kind == "full":
        return full_pipeline(stage_nodes, microbatches_per_home, layout)
    if kind == "checkfree_plus":
        if layout != "ring":
            raise ValueError("routing=checkfree_plus needs model.layout=ring (the last body stage must be movable)")
        return checkfree_plus(stage_nodes, microbatches_per_home)
    if kind == "skip":
        S = len(stage_nodes)
        if path_length is None:
            if skip_ratio is None:
                raise ValueError("routing=skip needs routing.skip_ratio or routing.path_length")
            path_length = path_length_for_ratio(S, skip_ratio)
        return oblivious_skip(stage_nodes, microbatches_per_home, path_length, seed=seed, swap_prob=swap_prob,
                              memory=memory, layout=layout)
    raise ValueError(f"routing.kind: unknown {kind!r}; use full, checkfree_plus, skip or planned")
