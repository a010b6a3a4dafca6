"""Compile a RoutePlan into one per-rank program of ops, all drawn from ONE global order.

Why a global order: every transfer is a (send at A, receive at B) pair. If every rank executes
its ops in the order they appear in a single global list, and sends never block (isend), then no
route can deadlock: the earliest unfinished op always has both of its participants waiting on it.
The same argument matches the k-th send A->B with the k-th receive at B, so nothing relies on
p2p tags (NCCL ignores them).

Sends leave as soon as their data exists: a rank's program is its projection of the global order
with every send hoisted to directly after the compute op that produced its data (past the
receives the global order put in between). On a slow link a receive can block for a whole
transfer; a send queued behind it would wait for that unrelated arrival. Hoisting keeps the
argument: only receives block, a rank's receives and compute ops keep their global order, and a
send moves only earlier, so when the earliest blocked receive (in the global order) waits, its
send, which precedes in the global order whatever its rank is blocked on, has been issued. A
rank's sends keep their relative order (each follows its own compute op, and compute ops are in
order), so the k-th send A->B still meets the k-th receive at B.

The global order comes from a small list-scheduling simulation of the iteration with the
simulator's op costs (integration/plan/costmodel.py: body forward 1, backward 1.5, head + loss
0.25, in units of a stage forward), backward work first (it frees activations), and at most
``max_inflight`` microbatches in flight per home node. If the plan carries a per-node
``node_order`` (the planner's schedule), each node takes its work in exactly that order instead,
and a home node admits microbatches as its order says.

Pure Python: no torch import, so the planner and tests can inspect programs cheaply.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from ..plan.costmodel import op_cost  # the simulator's cost model: one source of op costs
from ..plan.routeplan import RoutePlan

# Compute parts of a model on a node.
PART_EMBED = "embed"  # ring home: token embedding (start of the route)
PART_HEAD = "head"    # ring home: final norm + LM head + loss (end of the route)
PART_FIRST = "first"  # linear: stage 0 (embedding + its blocks)
PART_BODY = "body"    # a body stage's blocks
PART_LAST = "last"    # linear: the last stage (blocks + head + loss)

LOSS_PARTS = (PART_HEAD, PART_LAST)

# Op kinds.
LOAD = "load"
FWD = "fwd"
BWD = "bwd"
SEND_ACT = "send_act"
RECV_ACT = "recv_act"
SEND_GRAD = "send_grad"
RECV_GRAD = "recv_grad"
SEND_LABELS = "send_labels"
RECV_LABELS = "recv_labels"
SEND_BATCH = "send_batch"  # carry_batch: the home's whole data batch to another node of the route
RECV_BATCH = "recv_batch"

@dataclass(frozen=True)
class Op:
    """One instruction of a rank's program. ``seq`` is its position in the global order (a rank's
    sends may run ahead of it, see the module docstring)."""

    kind: str
    mb: int
    seq: int
    part: str | None = None  # compute ops: which part of the model (embed/head/first/body/last)
    peer: int | None = None  # comm ops: the other rank

    def __str__(self) -> str:
        extra = f" {self.part}" if self.part else ""
        peer = f" <-> {self.peer}" if self.peer is not None else ""
        return f"#{self.seq} {self.kind}({self.mb}{extra}){peer}"


@dataclass
class Program:
    """All ranks' op lists for one iteration plus what every rank needs to know about it."""

    plan: RoutePlan
    ops: dict[int, list[Op]]
    stage_visits: list[int]
    carry_batch: bool = False  # compiled for a backend that hands every stage the batch (megatron)

    def for_rank(self, rank: int) -> list[Op]:
        return self.ops.get(rank, [])


@dataclass
class _Task:
    """A compute step of one microbatch on one node in the simulation."""

    mb: int
    node: int
    part: str
    backward: bool
    index: int  # position along the microbatch's forward+backward chain


def _chain(plan: RoutePlan, route) -> list[tuple[int, str, bool]]:
    """The (node, part, is_backward) compute steps of one microbatch, in dependency order."""
    fwd: list[tuple[int, str]]
    if plan.layout == "ring":
        fwd = [(route.home_node, PART_EMBED)] + [(h.node, PART_BODY) for h in route.hops] + \
              [(route.home_node, PART_HEAD)]
    else:
        hops = list(route.hops)
        fwd = [(route.home_node, PART_FIRST)] + [(h.node, PART_BODY) for h in hops[:-1]] + \
              [(hops[-1].node, PART_LAST)]
    steps = [(n, p, False) for n, p in fwd]
    # The loss part's backward directly follows its forward; the rest retraces the route.
    steps += [(n, p, True) for n, p in reversed(fwd)]
    return steps




def compile_plan(plan: RoutePlan, max_inflight: int | None = None, carry_batch: bool = False) -> Program:
    """Compile ``plan`` into per-rank programs sharing one deadlock-free global order.

    ``max_inflight`` bounds microbatches in flight per home node (default: the number of
    compute steps on a route, enough to fill the pipeline like 1F1B's warm-up).
    ``carry_batch``: instead of sending labels to the loss node (linear layout), the home sends its
    whole data batch to every other node of the route, once per node, in the order the route visits
    them (megatron hands every stage the batch: masks and position ids are used on every stage).
    """
    routes = sorted(plan.routes, key=lambda r: r.mb)
    chains = {r.mb: _chain(plan, r) for r in routes}
    route_of = {r.mb: r for r in routes}
    if max_inflight is None:
        max_inflight = max((len(r.hops) + 1 for r in routes), default=1)
    pending_by_home: dict[int, list[int]] = defaultdict(list)
    for r in routes:
        pending_by_home[r.home_node].append(r.mb)
    inflight: dict[int, int] = defaultdict(int)
    order_pos: dict[int, int] = defaultdict(int)
    node_order = plan.node_order

    ops: dict[int, list[Op]] = defaultdict(list)
    # Where a rank's next send goes: right after its last compute op or send (before later receives).
    send_at: dict[int, int] = defaultdict(int)
    seq = 0

    def emit(rank: int, kind: str, mb: int, part: str | None = None, peer: int | None = None) -> None:
        nonlocal seq
        op = Op(kind, mb, seq, part, peer)
        seq += 1
        ops[rank].append(op)
        send_at[rank] = len(ops[rank])

    def emit_transfer(kind_send: str, kind_recv: str, mb: int, src: int, dst: int) -> None:
        # One global position for both sides of the pair keeps the matching order identical.
        nonlocal seq
        s_op = Op(kind_send, mb, seq, None, dst)
        r_op = Op(kind_recv, mb, seq, None, src)
        seq += 1
        ops[src].insert(send_at[src], s_op)  # sends are emitted when their compute op ends: hoist
        send_at[src] += 1
        ops[dst].append(r_op)

    # Event simulation. ready[node] holds runnable tasks; busy_until[node] the node clock.
    ready: dict[int, list[tuple]] = defaultdict(list)
    busy_until: dict[int, float] = defaultdict(float)
    events: list[tuple[float, int, int, int]] = []  # (finish time, tiebreak, mb, chain index)
    tick = 0

    def make_ready(mb: int, idx: int, t: float) -> None:
        node, part, bwd = chains[mb][idx]
        # Priority: backward before forward, then older microbatch first.
        ready[node].append((t, 0 if bwd else 1, mb, idx))

    def inject(home: int, t: float) -> None:
        # A home with a planned node_order takes its microbatches when the order says so.
        limit = float("inf") if node_order is not None and home in node_order else max_inflight
        while pending_by_home[home] and inflight[home] < limit:
            mb = pending_by_home[home].pop(0)
            inflight[home] += 1
            make_ready(mb, 0, t)

    for home in sorted(pending_by_home):
        inject(home, 0.0)

    def pick(node: int, now: float):
        cands = [c for c in ready[node] if c[0] <= now]
        if not cands:
            return None
        if node_order is not None and node in node_order:
            want = node_order[node][order_pos[node]] if order_pos[node] < len(node_order[node]) else None
            for c in cands:
                _, _, mb, idx = c
                _, _, bwd = chains[mb][idx]
                if want is not None and (mb, "B" if bwd else "F") == want:
                    return c
            # The head/loss step on a ring home is part of the same visit as the embed; only the
            # first forward and the last backward of a microbatch on a node appear in node_order.
            for c in cands:
                _, _, mb, idx = c
                if not _is_ordered_step(chains[mb], idx):
                    return c
            return None
        return min(cands, key=lambda c: (c[1], c[2], c[3]))

    def start_all(now: float) -> None:
        nonlocal tick
        for node in sorted(ready):
            if busy_until[node] > now or not ready[node]:
                continue
            c = pick(node, now)
            if c is None:
                continue
            ready[node].remove(c)
            _, _, mb, idx = c
            n, part, bwd = chains[mb][idx]
            if node_order is not None and node in node_order and _is_ordered_step(chains[mb], idx):
                order_pos[node] += 1
            cost = op_cost(part, bwd)
            if idx == 0:
                emit(n, LOAD, mb)  # data is loaded right before the microbatch enters the pipeline
            emit(n, BWD if bwd else FWD, mb, part)
            busy_until[n] = now + cost
            tick += 1
            heapq.heappush(events, (now + cost, tick, mb, idx))

    now = 0.0
    start_all(now)
    while events:
        now, _, mb, idx = heapq.heappop(events)
        chain = chains[mb]
        node, part, bwd = chain[idx]
        route = route_of[mb]
        if not bwd and idx == 0 and carry_batch:
            for dst in dict.fromkeys(n for n, _, _ in chain if n != route.home_node):
                emit_transfer(SEND_BATCH, RECV_BATCH, mb, route.home_node, dst)
        elif not bwd and idx == 0 and plan.layout == "linear":
            emit_transfer(SEND_LABELS, RECV_LABELS, mb, route.home_node, route.hops[-1].node)
        if idx + 1 < len(chain):
            nxt_node = chain[idx + 1][0]
            if nxt_node != node:
                kinds = (SEND_GRAD, RECV_GRAD) if chain[idx + 1][2] else (SEND_ACT, RECV_ACT)
                emit_transfer(kinds[0], kinds[1], mb, node, nxt_node)
            make_ready(mb, idx + 1, now)
        else:
            inflight[route.home_node] -= 1
            inject(route.home_node, now)
        # Start everything that can start at this instant (all events at `now` first).
        if not events or events[0][0] > now:
            start_all(now)
        if not events and any(ready.values()):
            # Only a node_order that cannot be followed leaves work stranded.
            stuck = {n: [(c[2], "B" if chains[c[2]][c[3]][2] else "F") for c in v] for n, v in ready.items() if v}
            raise ValueError(f"plan.node_order cannot be followed: nodes {sorted(stuck)} wait for work that "
                             f"never becomes ready (pending: {stuck})")
    return Program(plan=plan, ops=dict(ops), stage_visits=plan.stage_visits(), carry_batch=carry_batch)


def plan_of(plan: RoutePlan | Program) -> RoutePlan:
    """The plan itself, or the plan a :class:`Program` was compiled from."""
    return plan.plan if isinstance(plan, Program) else plan


def as_program(plan: RoutePlan | Program, max_inflight: int | None = None, carry_batch: bool = False) -> Program:
    """A :class:`Program` as given (the main job compiles once, in its preflight or on a resample),
    or ``plan`` compiled here (user code hands plans). A program compiled for the other kind of
    backend (``carry_batch`` differs) is an error, not a silent recompile."""
    if not isinstance(plan, Program):
        return compile_plan(plan, max_inflight, carry_batch=carry_batch)
    if plan.carry_batch != carry_batch:
        raise ValueError(f"this backend runs programs compiled with carry_batch={carry_batch}, got one compiled "
                         f"with carry_batch={plan.carry_batch}; compile with "
                         f"integration/config.py:compile_job_plan (or hand the plan itself)")
    return plan


def _is_ordered_step(chain: list[tuple[int, str, bool]], idx: int) -> bool:
    """Whether chain step ``idx`` is a node visit listed in node_order: a node's first forward
    or its last backward for that microbatch (the ring home's head steps are not)."""
    node, _, bwd = chain[idx]
    same = [i for i, (n, _, b) in enumerate(chain) if n == node and b == bwd]
    return idx == (same[0] if not bwd else same[-1])


def rank_summary(program: Program, ranks: Iterable[int] | None = None) -> str:
    """Readable listing of the programs (for --dry-run and debugging)."""
    lines = []
    for rank in sorted(ranks if ranks is not None else program.ops):
        lines.append(f"rank {rank}: " + ", ".join(str(op) for op in program.for_rank(rank)))
    return "\n".join(lines)
