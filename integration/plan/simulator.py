"""Event simulator: predicted time of one training iteration for any RoutePlan on a cluster.

Per microbatch the ops are: F on the home node (w), F on each hop (w of that node), L (head + loss,
w/4) back on the home node, then B on each hop in reverse (1.5 w) and B on the home node (1.5 w);
the factors come from :mod:`.costmodel`, which the runtime's program compiler uses too.
Each node runs one op at a time and stays busy ``gap_s`` (0.1 s, inside the spec's 0.09-0.13 s) after
each op. Sending an activation or gradient from a to b takes C[a][b].

Modes
* ``paper``: the spec's section 4 rules: no link contention, no all-reduce; the iteration ends with
  the last backward on a home node.
* ``full``: each directed link carries one transfer at a time (the bytes/bandwidth part occupies the
  link, latency and overhead do not), and after its replicas finish, every stage group runs a ring
  all-reduce of its gradients: 2(n-1)/n * bytes / (worst bandwidth in the group) + 2(n-1) * (worst
  latency). The iteration ends when the last stage group finishes its all-reduce.

Admission: a forward on a node holding ``memory`` live activations is not admitted; it is retried
``retry_s`` (0.1 s) later. Each home node keeps ``min(memory, m)`` microbatches in flight; when one
finishes, the next microbatch of the same route slot (id + slots) is injected.

Order: with ``plan.node_order`` (and ``honour_order``) each node runs its F/B ops strictly in that
order; the short L op runs as soon as it is ready because it has no entry in node_order and
unblocks the whole backward chain. Without an order a node picks among the ready ops by ``policy``:
``fifo`` (ready time, then arrival: the spec's rule), ``backward_first``, ``oldest_first``
(earlier injection round first) or ``priority`` (lowest ``priority[mb]`` first; the planner tunes it).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .cluster import Cluster, load_cluster
from .costmodel import BODY_B, BODY_F, BODY_TOTAL, HOME_B, HOME_F, HOME_TOTAL, LOSS
from .routeplan import RoutePlan

MODES = ("paper", "full")
POLICIES = ("fifo", "backward_first", "oldest_first")  # "priority" also exists: needs a priority map
DEFAULT_GAP_S = 0.1
DEFAULT_RETRY_S = 0.1


class SimulationError(RuntimeError):
    """The plan cannot run to completion (e.g. a node_order that deadlocks)."""


@dataclass(frozen=True)
class Op:
    """One executed op: ``phase`` is F (forward), L (head+loss on the home node) or B (backward)."""

    node: int
    mb: int
    phase: str
    start: float
    end: float


@dataclass
class SimResult:
    """Predicted iteration: total time, compute end, per-stage all-reduce time and the op timeline."""

    iteration_s: float
    compute_end_s: float
    mode: str
    ops: list[Op]
    allreduce_s: dict[int, float] = field(default_factory=dict)
    mb_end: dict[int, float] = field(default_factory=dict)

    def node_order(self) -> dict[int, list[tuple[int, str]]]:
        """The executed F/B order per node, in the RoutePlan.node_order form."""
        out: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for op in sorted(self.ops, key=lambda o: (o.start, o.end)):
            if op.phase != "L":
                out[op.node].append((op.mb, op.phase))
        return dict(out)

    def busy_s(self) -> dict[int, float]:
        """Compute seconds per node (gaps excluded)."""
        out: dict[int, float] = defaultdict(float)
        for op in self.ops:
            out[op.node] += op.end - op.start
        return dict(out)


def compute_lower_bound(plan: RoutePlan, stage_times: Sequence[float]) -> float:
    """No schedule can beat the busiest node's compute (F + B per visit, plus L at home)."""
    load: dict[int, float] = defaultdict(float)
    for r in plan.routes:
        load[r.home_node] += stage_times[r.home_node] * HOME_TOTAL
        for h in r.hops:
            load[h.node] += stage_times[h.node] * BODY_TOTAL
    return max(load.values()) if load else 0.0


def _chains(plan: RoutePlan, w: Sequence[float],
            op_seconds: dict[tuple[int, str], float] | None = None) -> dict[int, list[tuple[int, str, float]]]:
    out = {}
    for r in plan.routes:
        h = r.home_node
        hops = [x.node for x in r.hops]
        ch = [(h, "F", HOME_F * w[h])] + [(n, "F", BODY_F * w[n]) for n in hops] + [(h, "L", LOSS * w[h])]
        ch += [(n, "B", BODY_B * w[n]) for n in reversed(hops)] + [(h, "B", HOME_B * w[h])]
        if op_seconds is not None:  # measured per-node op times replace the w-factor model
            ch = [(n, ph, op_seconds.get((n, ph), d)) for n, ph, d in ch]
        out[r.mb] = ch
    return out


def simulate(plan: RoutePlan, cluster: Cluster | str | None = None, *, mode: str = "paper",
             cost: np.ndarray | None = None, stage_times: Sequence[float] | None = None,
             memory: int | Sequence[int] | None = None, gap_s: float = DEFAULT_GAP_S,
             retry_s: float = DEFAULT_RETRY_S, policy: str = "fifo", honour_order: bool = True,
             record: bool = True, priority: dict[int, float] | None = None,
             op_seconds: dict[tuple[int, str], float] | None = None,
             allreduce_latency: bool = True) -> SimResult:
    """Simulate one iteration of ``plan``.

    ``cost`` (N x N seconds) and ``stage_times`` (w per node) default to the cluster's; ``memory``
    defaults to the plan's, else each node's. ``full`` mode needs the cluster (bandwidths, params).
    Calibration (``integration/plan/calibration.py``; both off by default): ``op_seconds`` gives
    measured seconds per (node, phase F/L/B) instead of the w factors; ``allreduce_latency=False``
    drops the all-reduce's per-step latency term (bandwidth term kept).
    """
    if isinstance(cluster, str):
        cluster = load_cluster(cluster, num_nodes=max(plan.nodes) + 1)
    if mode not in MODES:
        raise ValueError(f"simulate.mode: {mode!r}; use one of {MODES}")
    if policy not in POLICIES and not (policy == "priority" and priority is not None):
        raise ValueError(f"simulate.policy: {policy!r}; use one of {POLICIES} (or 'priority' with a priority map)")
    if cluster is None and (cost is None or stage_times is None or mode == "full"):
        raise ValueError("simulate: give a cluster, or cost and stage_times for paper mode")
    C = np.asarray(cost if cost is not None else cluster.cost_matrix())
    w = list(stage_times if stage_times is not None else cluster.stage_times())
    n_nodes = len(w)
    bad = [n for n in plan.nodes if n >= n_nodes or n < 0]
    if bad:
        raise ValueError(f"simulate: plan uses node ids {bad[:5]} but the cluster has {n_nodes} nodes (0..{n_nodes - 1})")
    if memory is None:
        memory = plan.memory if plan.memory is not None else (list(cluster.memories()) if cluster else 10 ** 9)
    mem = [memory] * n_nodes if isinstance(memory, (int, np.integer)) else list(memory)
    Cl = C.tolist()
    ser = None
    if mode == "full":
        ser = (cluster.workload.activation_bytes / cluster.bandwidth_matrix()).tolist()
    link_free: dict[tuple[int, int], float] = {}

    chains = _chains(plan, w, op_seconds)
    order = plan.node_order if (honour_order and plan.node_order) else None
    ptr = defaultdict(int)
    # Home injection: per home, microbatches in id order; `slots` in flight.
    by_home: dict[int, list[int]] = defaultdict(list)
    for r in sorted(plan.routes, key=lambda r: r.mb):
        by_home[r.home_node].append(r.mb)
    slots = {h: max(1, min(mem[h], len(mbs))) for h, mbs in by_home.items()}
    rank = {}  # mb -> injection round, for oldest_first
    for h, mbs in by_home.items():
        for i, mb in enumerate(mbs):
            rank[mb] = i // slots[h]
    nxt_of = {}
    for h, mbs in by_home.items():
        for i, mb in enumerate(mbs):
            nxt_of[mb] = mbs[i + slots[h]] if i + slots[h] < len(mbs) else None

    inbox: dict[int, list[list]] = defaultdict(list)  # entries [ready, seq, mb, idx]
    heap: list[tuple[float, int, int]] = []
    seq = 0
    free_at = [0.0] * n_nodes
    live = [0] * n_nodes
    ops: list[Op] = []
    mb_end: dict[int, float] = {}
    remaining = sum(len(c) for c in chains.values())

    def arrive(node: int, t: float, mb: int, idx: int) -> None:
        nonlocal seq
        seq += 1
        inbox[node].append([t, seq, mb, idx])
        heapq.heappush(heap, (t, seq, node))

    for h, mbs in by_home.items():
        for mb in mbs[:slots[h]]:
            arrive(h, 0.0, mb, 0)

    eps = 1e-12
    while heap:
        t, _, n = heapq.heappop(heap)
        if free_at[n] > t + eps or not inbox[n]:
            continue
        box = inbox[n]
        pick = None
        if order is not None:
            ready_l = [e for e in box if e[0] <= t + eps and chains[e[2]][e[3]][1] == "L"]
            if ready_l:
                pick = min(ready_l)
            else:
                seq_n = order.get(n, [])
                if ptr[n] < len(seq_n):
                    want = seq_n[ptr[n]]
                    for e in box:
                        if e[0] <= t + eps and e[2] == want[0] and chains[e[2]][e[3]][1] == want[1]:
                            pick = e
                            break
                if pick is not None:
                    ptr[n] += 1
        else:
            ready = [e for e in box if e[0] <= t + eps]
            if policy == "fifo":
                ready.sort()
            elif policy == "backward_first":
                ready.sort(key=lambda e: (chains[e[2]][e[3]][1] == "F", e[0], e[1]))
            elif policy == "oldest_first":
                ready.sort(key=lambda e: (rank[e[2]], e[0], e[1]))
            else:
                ready.sort(key=lambda e: (priority[e[2]], e[0], e[1]))
            for e in ready:
                node, phase, _ = chains[e[2]][e[3]]
                if phase == "F" and live[n] >= mem[n]:
                    e[0] = t + retry_s  # the spec's retry: the forward asks again 0.1 s later
                    seq += 1
                    heapq.heappush(heap, (e[0], seq, n))
                    continue
                pick = e
                break
        if pick is None:
            continue
        box.remove(pick)
        _, _, mb, idx = pick
        node, phase, dur = chains[mb][idx]
        end = t + dur
        if record:
            ops.append(Op(n, mb, phase, t, end))
        remaining -= 1
        free_at[n] = end + gap_s
        seq += 1
        heapq.heappush(heap, (free_at[n], seq, n))
        if phase == "F":
            live[n] += 1
        elif phase == "B":
            live[n] -= 1
        if idx + 1 < len(chains[mb]):
            dest = chains[mb][idx + 1][0]
            if ser is None:
                arrive(dest, end + Cl[n][dest], mb, idx + 1)
            else:
                key = (n, dest)
                start = max(end, link_free.get(key, 0.0))
                link_free[key] = start + ser[n][dest]
                arrive(dest, start + Cl[n][dest], mb, idx + 1)
        else:
            mb_end[mb] = end
            nxt = nxt_of.get(mb)
            if nxt is not None:
                arrive(n, end, nxt, 0)
    if remaining:
        stuck = sorted({n for n, b in inbox.items() if b})
        raise SimulationError(f"simulate: {remaining} ops never ran (nodes {stuck[:10]} wait forever); the plan's "
                              f"node_order or memory limit deadlocks. Re-plan, or simulate with honour_order=False")
    compute_end = max(mb_end.values()) if mb_end else 0.0
    allreduce: dict[int, float] = {}
    total = compute_end
    if mode == "full":
        node_end: dict[int, float] = defaultdict(float)
        for op in ops:
            node_end[op.node] = max(node_end[op.node], op.end)
        lat = cluster.latency_matrix()
        bw = cluster.bandwidth_matrix()
        total = 0.0
        for s, group in enumerate(plan.stage_nodes):
            k = len(group)
            if k > 1:
                g = np.ix_(group, group)
                b = bw[g][~np.eye(k, dtype=bool)].min()
                l = lat[g].max()
                nbytes = cluster.workload.stage_param_bytes(s)
                allreduce[s] = 2 * (k - 1) / k * nbytes / b + (2 * (k - 1) * l if allreduce_latency else 0.0)
            else:
                allreduce[s] = 0.0
            total = max(total, max((node_end[n] for n in group), default=0.0) + allreduce[s])
    return SimResult(iteration_s=total, compute_end_s=compute_end, mode=mode, ops=ops, allreduce_s=allreduce,
                     mb_end=mb_end)
