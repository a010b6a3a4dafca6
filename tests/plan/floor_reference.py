"""An independent exact reference for ``linked.home_bound``: branch and bound over active schedules.

Written without CP-SAT and without rounding, so it checks the bound's model (the simulator's rules
for one home) and the solver's optimality claim on instances small enough to enumerate.

One home, ``m`` microbatches in ``slots`` slots (slot s runs microbatches s, s + slots, ... back to
back: the simulator's injection rule). A microbatch's chain is F home, F on each hop, L home, B on
each hop in reverse, B home; an op of duration p occupies its node for p + gap; the next op of the
chain may start p + C[a][b] after it starts (the send). Every slot (a job) picks one route per
microbatch among ``routes``. For each choice the schedule is found by Giffler-Thompson branching
(every active schedule is generated; one of them is optimal for the makespan, which is regular),
pruned by the best makespan found so far.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

from integration.plan.costmodel import BODY_B, BODY_F, HOME_B, HOME_F, LOSS


def _chain(home: int, nodes: Sequence[int], w: Sequence[float], C) -> list[tuple[int, float, float]]:
    """(node, duration, delay to the next op's earliest start after this op's start) per op."""
    seq = [(home, HOME_F * w[home])] + [(n, BODY_F * w[n]) for n in nodes] + [(home, LOSS * w[home])]
    seq += [(n, BODY_B * w[n]) for n in reversed(nodes)] + [(home, HOME_B * w[home])]
    out = []
    for k, (n, p) in enumerate(seq):
        nxt = seq[k + 1][0] if k + 1 < len(seq) else None
        out.append((n, p, p + (C[n][nxt] if nxt is not None and nxt != n else 0.0)))
    return out


def best_schedule(jobs: list[list[tuple[int, float, float]]], gap: float, incumbent: float = math.inf) -> float:
    """Optimal makespan (end of the last op, gap excluded) of chains ``jobs`` on shared nodes, or
    ``incumbent`` if nothing beats it."""
    best = [incumbent]
    tail = [[0.0] * (len(j) + 1) for j in jobs]  # shortest remaining time from op k to the job's end
    for i, j in enumerate(jobs):
        for k in range(len(j) - 1, -1, -1):
            tail[i][k] = j[k][2] + tail[i][k + 1] if k + 1 < len(j) else j[k][1]

    def rec(ptr: list[int], est: list[float], free: dict[int, float]) -> None:
        if max(est[i] + tail[i][ptr[i]] for i in range(len(jobs)) if ptr[i] < len(jobs[i])) >= best[0] - 1e-12:
            return
        live = [i for i in range(len(jobs)) if ptr[i] < len(jobs[i])]
        # Giffler-Thompson: the op that can complete first fixes the node; branch on its conflicts.
        ec = {i: max(est[i], free.get(jobs[i][ptr[i]][0], 0.0)) + jobs[i][ptr[i]][1] + gap for i in live}
        i_star = min(live, key=lambda i: ec[i])
        node = jobs[i_star][ptr[i_star]][0]
        conflict = [i for i in live if jobs[i][ptr[i]][0] == node and
                    max(est[i], free.get(node, 0.0)) < ec[i_star] - 1e-12]
        for i in conflict:
            n, p, delay = jobs[i][ptr[i]]
            s = max(est[i], free.get(node, 0.0))
            if ptr[i] + 1 == len(jobs[i]):
                end = s + p
                if all(ptr[k] == len(jobs[k]) for k in live if k != i):
                    best[0] = min(best[0], max(end, *(est[k] for k in range(len(jobs)) if k != i)))
                    continue
            old = (ptr[i], est[i], free.get(node))
            ptr[i] += 1
            est[i] = s + (delay if ptr[i] < len(jobs[i]) else p)
            free[node] = s + p + gap
            rec(ptr, est, free)
            ptr[i], est[i] = old[0], old[1]
            if old[2] is None:
                del free[node]
            else:
                free[node] = old[2]

    ptr = [0] * len(jobs)
    est = [0.0] * len(jobs)
    rec(ptr, est, {})
    return best[0]


def exact_home_optimum(home: int, routes: Sequence[Sequence[int]], C, w, m: int, slots: int,
                       gap: float) -> float:
    """Optimal paper-mode end of one home's ``m`` microbatches, each on any of ``routes``."""
    per_slot = [len(range(s, m, slots)) for s in range(slots)]
    best = math.inf
    choices = [list(itertools.product(range(len(routes)), repeat=k)) for k in per_slot]
    # Slots with the same count are interchangeable: pick their route tuples in sorted order.
    for combo in itertools.product(*choices):
        if any(per_slot[a] == per_slot[a + 1] and combo[a] > combo[a + 1] for a in range(slots - 1)):
            continue
        jobs = []
        for picks in combo:
            chain: list[tuple[int, float, float]] = []
            for r in picks:
                c = _chain(home, routes[r], w, C)
                if chain:  # the slot's next microbatch enters after the previous one's last backward
                    n, p, _ = chain[-1]
                    chain[-1] = (n, p, p)
                chain += c
            jobs.append(chain)
        best = best_schedule(jobs, gap, best)
    return best
