"""Placement: which nodes hold which stage, and the spec's placement score.

Score (DT-FM, spec section 3A) = worst intra-stage link (data-parallel cost)
  + 2 x the cheapest closed tour over the stages, whose edge weight between two stages is the
  bottleneck of the best bipartite matching between their node sets (pipeline cost).

``anneal_placement`` is our heuristic: region-clustered starts plus seeded simulated annealing on
node swaps between stages, with the tour recomputed exactly (Held-Karp) after each move.
``genetic_placement`` re-implements the baseline idea (population of node permutations cut into
stage blocks, order crossover, swap mutation, local search) on a smaller budget than the paper's
200 x 8000 so it can run in the benchmark.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .routeplan import route_slots


class LayoutError(ValueError):
    """A stage layout that cannot satisfy the rules; the message names the constraint and the fix."""


def derive_stage_sizes(num_nodes: int, num_stages: int, path_length: int, memory: int,
                       microbatches_per_home: int) -> list[int]:
    """Stage sizes from the sizing rule |P0|*(L-1) = |Ps|*(S-1).

    Takes the most home nodes H such that CC5 can hold (H*slots*(L-1) divisible by S-1) and every
    body stage has room for its routes (|Ps| * memory >= visits); nodes left over are spread over
    the body stages as spare replicas. Exact for the paper's sizes (20 -> [5,3,3,3,3,3]).
    """
    check_params(num_stages, path_length, memory, microbatches_per_home)
    S, L = num_stages, path_length
    slots = min(memory, microbatches_per_home)
    for H in range(num_nodes - (S - 1), 0, -1):
        total = H * slots * (L - 1)
        if total % (S - 1):
            continue
        per = math.ceil(total // (S - 1) / memory)
        body = max(1, per)
        if H + body * (S - 1) <= num_nodes:
            spare = num_nodes - H - body * (S - 1)
            return [H] + [body + (1 if i < spare % (S - 1) else 0) + spare // (S - 1) for i in range(S - 1)]
    raise LayoutError(f"layout: {num_nodes} nodes cannot hold S={num_stages} stages with L={path_length}, "
                      f"memory={memory}: every body stage needs replicas for its routes; add nodes, raise "
                      f"memory or lower S")


def check_params(num_stages: int, path_length: int, memory: int, microbatches_per_home: int) -> None:
    """Raise :class:`LayoutError` for impossible S, L, memory, m."""
    if num_stages < 2:
        raise LayoutError(f"num_stages: S={num_stages}; a pipeline needs at least 2 stages (home + 1 body)")
    if not 2 <= path_length <= num_stages:
        raise LayoutError(f"path_length: L={path_length} but S={num_stages}; L counts stage 0 and must be in "
                          f"2..S (L > S would visit a stage twice)")
    if memory < 1:
        raise LayoutError(f"memory: {memory}; a node must hold at least 1 microbatch (use memory >= 1)")
    if microbatches_per_home < 1:
        raise LayoutError(f"microbatches_per_home: {microbatches_per_home}; use >= 1")
    if route_slots(memory, microbatches_per_home) is None:
        raise LayoutError(f"memory: {memory} route slots per home cannot share {microbatches_per_home} microbatches "
                          f"equally (TC1 + CC5); use microbatches_per_home a multiple of memory "
                          f"(e.g. {memory * math.ceil(microbatches_per_home / memory)}) or memory >= "
                          f"microbatches_per_home")


def check_layout(num_nodes: int, stage_sizes: Sequence[int], path_length: int, memory: int,
                 microbatches_per_home: int) -> None:
    """Raise :class:`LayoutError` when CC5 or TC1 cannot hold on these stage sizes."""
    S = len(stage_sizes)
    check_params(S, path_length, memory, microbatches_per_home)
    if any(s < 1 for s in stage_sizes):
        raise LayoutError(f"stage_sizes: {list(stage_sizes)}; every stage needs at least 1 node")
    if sum(stage_sizes) != num_nodes:
        raise LayoutError(f"stage_sizes: {list(stage_sizes)} add up to {sum(stage_sizes)} but the cluster has "
                          f"{num_nodes} nodes; make them add up, or omit stage_sizes to derive them from "
                          f"|P0|*(L-1) = |Ps|*(S-1)")
    H = stage_sizes[0]
    slots = min(memory, microbatches_per_home)
    total = H * slots * (path_length - 1)
    if total % (S - 1):
        raise LayoutError(f"CC5 (equal visits): {H} homes x {slots} route slots x {path_length - 1} hops = {total} "
                          f"visits cannot split equally over {S - 1} body stages; change the home count, memory "
                          f"or path_length (sizing rule |P0|*(L-1) = |Ps|*(S-1))")
    per = total // (S - 1)
    for s in range(1, S):
        if stage_sizes[s] * memory < per:
            raise LayoutError(f"TC1 (memory): stage {s} must serve {per} routes but has {stage_sizes[s]} nodes x "
                              f"memory {memory} = {stage_sizes[s] * memory}; raise memory, give stage {s} more "
                              f"nodes or use fewer home nodes")
    if slots > memory:
        raise LayoutError(f"TC1 (memory): {slots} slots > memory {memory}")


# ----------------------------------------------------------------------------- score
def bottleneck_matching(C: np.ndarray, A: Sequence[int], B: Sequence[int]) -> float:
    """Smallest t such that the smaller of A, B can be matched into the other using links <= t
    (links are taken in both directions: max(C[a][b], C[b][a]))."""
    if len(A) > len(B):
        A, B = B, A
    M = np.maximum(C[np.ix_(A, B)], C[np.ix_(B, A)].T)
    lb = M.min(axis=1).max()  # every row must get some edge
    for t in np.unique(M[M >= lb]):
        if _perfect(M <= t):
            return float(t)
    return float(M.max())


def _perfect(adj: np.ndarray) -> bool:
    """Kuhn's augmenting paths: does every row get a distinct column?"""
    rows, cols = adj.shape
    return _perfect_lists([np.flatnonzero(adj[i]).tolist() for i in range(rows)], cols)


def _perfect_lists(nbrs: list[list[int]], cols: int) -> bool:
    """:func:`_perfect` on per-row lists of allowed columns (no numpy: the incremental scorer's hot path)."""
    rows = len(nbrs)
    match = [-1] * cols

    def aug(i: int, seen: list[bool]) -> bool:
        for j in nbrs[i]:
            if not seen[j]:
                seen[j] = True
                if match[j] < 0 or aug(match[j], seen):
                    match[j] = i
                    return True
        return False

    return all(aug(i, [False] * cols) for i in range(rows))


def intra_stage_cost(C: np.ndarray, group: Sequence[int]) -> float:
    if len(group) < 2:
        return 0.0
    sub = C[np.ix_(group, group)]
    return float(sub.max())


def tour_cost(W: np.ndarray) -> tuple[float, list[int]]:
    """Cheapest closed tour through all stages (Held-Karp; exact), starting at stage 0."""
    S = len(W)
    if S == 1:
        return 0.0, [0]
    if S == 2:
        return float(2 * W[0, 1]), [0, 1]
    full = 1 << (S - 1)
    dp = [[math.inf] * S for _ in range(full)]
    par = [[-1] * S for _ in range(full)]
    for j in range(1, S):
        dp[1 << (j - 1)][j] = W[0, j]
    Wl = W.tolist()
    for mask in range(1, full):
        row = dp[mask]
        for j in range(1, S):
            v = row[j]
            if v == math.inf:
                continue
            for k in range(1, S):
                bit = 1 << (k - 1)
                if mask & bit:
                    continue
                nv = v + Wl[j][k]
                if nv < dp[mask | bit][k]:
                    dp[mask | bit][k] = nv
                    par[mask | bit][k] = j
    best, last = min((dp[full - 1][j] + Wl[j][0], j) for j in range(1, S))
    path, mask = [], full - 1
    while last > 0:
        path.append(last)
        prev = par[mask][last]
        mask ^= 1 << (last - 1)
        last = prev
    return float(best), [0] + path[::-1]


@dataclass
class PlacementScore:
    """The spec's score and its parts."""

    total: float
    data_parallel: float
    pipeline: float
    tour: list[int]


def placement_score(C: np.ndarray, stage_nodes: Sequence[Sequence[int]]) -> PlacementScore:
    """Worst intra-stage link + 2 x closed tour of bottleneck matchings (spec section 3A)."""
    S = len(stage_nodes)
    dp = max(intra_stage_cost(C, g) for g in stage_nodes)
    W = np.zeros((S, S))
    for i in range(S):
        for j in range(i + 1, S):
            W[i, j] = W[j, i] = bottleneck_matching(C, stage_nodes[i], stage_nodes[j])
    tour, order = tour_cost(W)
    return PlacementScore(dp + 2 * tour, dp, 2 * tour, order)


def relabel_by_tour(stage_nodes: Sequence[Sequence[int]], C: np.ndarray) -> list[list[int]]:
    """Renumber the body groups along the cheapest tour (stage 0 stays the home group).

    Only groups of equal size are interchangeable, so groups are reordered within each size class."""
    sc = placement_score(C, stage_nodes)
    order = sc.tour
    sizes = [len(g) for g in stage_nodes]
    if len(set(sizes[1:])) > 1:
        return [list(g) for g in stage_nodes]
    return [list(stage_nodes[0])] + [list(stage_nodes[i]) for i in order[1:]]


# ----------------------------------------------------------------------------- heuristics
def _cut(perm: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    out, k = [], 0
    for s in sizes:
        out.append(list(perm[k:k + s]))
        k += s
    return out


def _region_orders(C: np.ndarray, rng: random.Random, n_starts: int) -> list[list[int]]:
    """Node orders that keep close nodes adjacent: nearest-neighbour chains from random starts."""
    N = len(C)
    D = np.maximum(C, C.T)
    out = []
    for _ in range(n_starts):
        cur = rng.randrange(N)
        left = set(range(N)) - {cur}
        order = [cur]
        while left:
            nxt = min(left, key=lambda j: (D[cur, j], rng.random()))
            order.append(nxt)
            left.remove(nxt)
            cur = nxt
        out.append(order)
    return out


def _interleaved(order: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Deal a region-clustered order round-robin over the stages so each stage spans the regions."""
    groups: list[list[int]] = [[] for _ in sizes]
    s = 0
    for n in order:
        while len(groups[s]) >= sizes[s]:
            s = (s + 1) % len(sizes)
        groups[s].append(n)
        s = (s + 1) % len(sizes)
    return groups


@dataclass
class PlacementResult:
    stage_nodes: list[list[int]]
    score: PlacementScore
    evaluations: int
    runtime_s: float
    method: str


class _Scorer:
    """Incremental score for swap moves: caches the stage-pair bottleneck matrix and intra costs."""

    def __init__(self, C: np.ndarray, groups: list[list[int]]):
        self.D = np.maximum(C, C.T).tolist()
        self.C = C
        self.groups = groups
        S = len(groups)
        self.intra = [self._intra(g) for g in groups]
        self.W = np.zeros((S, S))
        for i in range(S):
            for j in range(i + 1, S):
                self.W[i, j] = self.W[j, i] = self._bottleneck(groups[i], groups[j])

    def _intra(self, g: list[int]) -> float:
        return max((self.C[a, b] for a in g for b in g if a != b), default=0.0)

    def _bottleneck(self, A: list[int], B: list[int]) -> float:
        if len(A) > len(B):
            A, B = B, A
        D = self.D
        rows = [[D[a][b] for b in B] for a in A]
        lb = max(min(r) for r in rows)
        for t in sorted({v for r in rows for v in r if v >= lb}):
            if _perfect_lists([[j for j, v in enumerate(r) if v <= t] for r in rows], len(B)):
                return t
        return max(max(r) for r in rows)

    def update(self, a: int, b: int) -> None:
        for s in (a, b):
            self.intra[s] = self._intra(self.groups[s])
            for j in range(len(self.groups)):
                if j != s:
                    self.W[s, j] = self.W[j, s] = self._bottleneck(self.groups[s], self.groups[j])

    def value(self) -> tuple[float, float]:
        """(spec score, annealing objective). The objective adds a small sum of all intra-stage
        costs so moves that improve a non-worst stage are not invisible on the max plateau."""
        tour, _ = tour_cost(self.W)
        total = max(self.intra) + 2 * tour
        return total, total + 0.05 * sum(self.intra)


def anneal_placement(C: np.ndarray, stage_sizes: Sequence[int], seed: int = 0, time_budget_s: float = 2.0,
                     max_evals: int = 50000) -> PlacementResult:
    """Region-clustered starts + simulated annealing on swaps of two nodes in different stages."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    N = len(C)
    if sum(stage_sizes) != N:
        raise LayoutError(f"stage_sizes: add up to {sum(stage_sizes)} but the cluster has {N} nodes")
    starts = [_cut(o, stage_sizes) for o in _region_orders(C, rng, 3)]
    starts += [_interleaved(o, stage_sizes) for o in _region_orders(C, rng, 3)]
    evals = 0
    best, best_v = None, None
    for g in starts:
        v = _Scorer(C, [list(x) for x in g]).value()
        evals += 1
        if best_v is None or v[1] < best_v[1]:
            best, best_v = g, v
    sc = _Scorer(C, [list(x) for x in best])
    cur = sc.groups
    cur_v = best_v
    best_total = best_v[0]
    best = [list(x) for x in cur]
    T0 = max(0.05, 0.05 * cur_v[1])
    S = len(stage_sizes)
    while evals < max_evals:
        # Cool on whichever budget runs out first; with an unbounded time budget the run is
        # deterministic for a seed.
        frac = max(evals / max_evals, (time.perf_counter() - t0) / time_budget_s)
        if frac >= 1:
            break
        T = T0 * (1 - frac) ** 2 + 1e-4
        a, b = rng.sample(range(S), 2)
        i, j = rng.randrange(len(cur[a])), rng.randrange(len(cur[b]))
        old_intra, old_W = list(sc.intra), sc.W.copy()
        cur[a][i], cur[b][j] = cur[b][j], cur[a][i]
        sc.update(a, b)
        v = sc.value()
        evals += 1
        d = v[1] - cur_v[1]
        if d <= 0 or rng.random() < math.exp(-d / T):
            cur_v = v
            if v[0] < best_total - 1e-12:
                best, best_total = [list(x) for x in cur], v[0]
        else:
            cur[a][i], cur[b][j] = cur[b][j], cur[a][i]
            sc.intra, sc.W = old_intra, old_W
    return PlacementResult(best, placement_score(C, best), evals, time.perf_counter() - t0, "anneal")


def genetic_placement(C: np.ndarray, stage_sizes: Sequence[int], seed: int = 0, population: int = 40,
                      trials: int = 2000, time_budget_s: float | None = None) -> PlacementResult:
    """The DT-FM baseline idea on a smaller budget: permutations cut into stage blocks, tournament
    selection, order crossover, swap mutation and a short first-improvement local search."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    N = len(C)

    def score(p: list[int]) -> float:
        return placement_score(C, _cut(p, stage_sizes)).total

    pop = []
    for _ in range(population):
        p = list(range(N))
        rng.shuffle(p)
        pop.append((score(p), p))
    evals = population
    while evals < trials and (time_budget_s is None or time.perf_counter() - t0 < time_budget_s):
        pa = min(rng.sample(pop, 3))[1]
        pb = min(rng.sample(pop, 3))[1]
        i, j = sorted(rng.sample(range(N), 2))
        mid = pa[i:j]
        rest = [x for x in pb if x not in set(mid)]
        child = rest[:i] + mid + rest[i:]
        if rng.random() < 0.3:
            x, y = rng.sample(range(N), 2)
            child[x], child[y] = child[y], child[x]
        sc = score(child)
        evals += 1
        for _ in range(3):  # local search: a few random swaps, keep improvements
            x, y = rng.sample(range(N), 2)
            child[x], child[y] = child[y], child[x]
            s2 = score(child)
            evals += 1
            if s2 < sc:
                sc = s2
            else:
                child[x], child[y] = child[y], child[x]
        worst = max(range(len(pop)), key=lambda k: pop[k][0])
        if sc < pop[worst][0]:
            pop[worst] = (sc, child)
    best = min(pop)[1]
    groups = _cut(best, stage_sizes)
    return PlacementResult(groups, placement_score(C, groups), evals, time.perf_counter() - t0, "genetic")


def ring_placement(C: np.ndarray, w: Sequence[float], stage_sizes: Sequence[int], hops: int, seed: int = 0,
                   iters: int = 20000) -> list[list[int]] | None:
    """Placement for one route per home: cut the nodes into ``H`` rings of one home and ``hops``
    body nodes, minimising the longest ring's round trip (then the sum), by seeded annealing on
    node swaps between rings; then label each ring's body nodes with stages so its visiting order
    is increasing and every body stage gets the same count (round-robin stage blocks).

    Applies when the sizes are exactly that: N = H (hops + 1) and every body stage holds
    H hops / (S - 1) nodes; None otherwise. Deterministic for a seed (counted iterations)."""
    S = len(stage_sizes)
    H = stage_sizes[0]
    N = len(C)
    if S < 2 or hops < 1 or hops > S - 1 or N != H * (hops + 1) or (H * hops) % (S - 1) or \
            any(g != H * hops // (S - 1) for g in stage_sizes[1:]):
        return None
    D = (np.asarray(C) + np.asarray(C).T).tolist()
    wf = [float(x) for x in w]
    from itertools import permutations

    memo: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {}

    def ring(g: Sequence[int]) -> tuple[float, tuple[int, ...]]:
        # Same ring (same node order) as before: the same answer (annealing at low temperature
        # proposes the same few swaps again and again).
        k = tuple(g)
        r = memo.get(k)
        if r is None:
            r = memo[k] = _ring(g)
        return r

    def _ring(g: Sequence[int]) -> tuple[float, tuple[int, ...]]:
        # Best cycle through the ring's nodes, as (cost, order starting at the home g[0]).
        home, body = g[0], g[1:]
        if len(body) == 3:  # L = 4: the same sums, term by term, without the generic loop
            best = (math.inf, ())
            Dh, wh = D[home], wf[home] * 2.75
            x, y, z = body
            for o in ((x, y, z), (x, z, y), (y, x, z), (y, z, x), (z, x, y), (z, y, x)):
                a, b, d = o
                c = Dh[a] + D[a][b] + D[b][d] + D[d][home] + wh + (wf[a] + wf[b] + wf[d]) * 2.5
                if c < best[0]:
                    best = (c, o)
            return best
        best = (math.inf, ())
        for o in permutations(body):
            seq = (home, *o, home)
            c = sum(D[a][b] for a, b in zip(seq, seq[1:])) + w[home] * 2.75 + sum(w[n] for n in o) * 2.5
            if c < best[0]:
                best = (c, o)
        return best

    # Counted work: each move re-solves two rings over every order of their body nodes.
    iters = max(1, min(iters, 400_000 // (2 * math.factorial(hops))))
    rng = random.Random(seed)
    perm = list(range(N))
    rng.shuffle(perm)
    rings = [perm[i * (hops + 1):(i + 1) * (hops + 1)] for i in range(H)]
    cost = [ring(g)[0] for g in rings]

    def key(cs: list[float]) -> tuple[float, float]:
        return max(cs), sum(cs)

    cur = key(cost)
    best_rings, best_key = [list(g) for g in rings], cur
    T0 = 0.02 * cur[0]
    for it in range(iters):
        T = T0 * (1 - it / iters) ** 2 + 1e-9
        i, j = rng.sample(range(H), 2)
        a, b = rng.randrange(hops + 1), rng.randrange(hops + 1)
        rings[i][a], rings[j][b] = rings[j][b], rings[i][a]
        ci, cj = ring(rings[i])[0], ring(rings[j])[0]
        old = cost[i], cost[j]
        cost[i], cost[j] = ci, cj
        new = key(cost)
        d = (new[0] - cur[0]) + 0.1 * (new[1] - cur[1]) / H
        if d <= 0 or rng.random() < math.exp(-d / T):
            cur = new
            if new < best_key:
                best_rings, best_key = [list(g) for g in rings], new
        else:
            rings[i][a], rings[j][b] = rings[j][b], rings[i][a]
            cost[i], cost[j] = old
    stage_nodes: list[list[int]] = [[] for _ in range(S)]
    for i, g in enumerate(best_rings):
        order = ring(g)[1]
        stages = sorted((i * hops + t) % (S - 1) + 1 for t in range(hops))
        stage_nodes[0].append(g[0])
        for st, n in zip(stages, order):
            stage_nodes[st].append(n)
    return stage_nodes


def column_placement(num_nodes: int, stage_sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive ranks per stage (the training job's grid)."""
    return _cut(list(range(num_nodes)), stage_sizes)


__all__ = ["LayoutError", "derive_stage_sizes", "check_params", "check_layout", "bottleneck_matching",
           "placement_score", "PlacementScore", "PlacementResult", "anneal_placement", "genetic_placement",
           "column_placement", "relabel_by_tour", "tour_cost", "ring_placement"]
