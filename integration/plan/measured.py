"""Measured costs of a running job: a cost matrix per directed link and op seconds per node.

The executor records every op of an iteration (``ProgramExecutor.trace``: kind, microbatch, part,
peer, start, end on ``time.perf_counter``, one monotonic clock for every process of a machine).
From the traces of all ranks of a window of steps, :class:`MeasuredCosts` keeps running estimates
(an EWMA over windows, weight ``alpha`` for the newest):

* **link** ``C[a][b]``: a message's time on the link, from its departure to its arrival at the
  receiver (the receive op's end). The departure is the latest of the sender's send op start, the
  receiver's receive op start (the p2p transport, gloo, is a rendezvous: the payload moves only once
  the receive is posted) and the previous message's arrival on the same link (queueing behind it is
  that message's time, not this one's). The window's 0.75 quantile per link enters the EWMA (a
  rate-limited link passes one message at once after an idle gap and makes the next wait: the low
  samples are not its cost). Links no route uses stay unmeasured: when planning, the fastest
  measured link between the same two stages stands in for them (else the median measured link);
* **node compute**: the median seconds of each node's forward (F), head + loss (L) and backward (B)
  ops, the simulator's phases (:mod:`integration.plan.simulator`), also as w per node (the
  cost model's units: a body visit is 2.5 w, a home microbatch 2.75 w);
* **overhead**: the fastest receive op of the window (a message that had arrived: thread wake-up
  and copy), the per-op cost the simulator calls ``gap``.

:meth:`MeasuredCosts.predict` replays the job's own per-rank programs on these numbers
(:meth:`integration.plan.calibration.CalibratedModel.replay_links`): compute and send ops take
their measured median per (rank, op kind, model part), and a receive blocks until its message
arrives, a message leaving only once its receive is posted (gloo's rendezvous). So a node that
takes many routes takes their messages one after another: the event simulator's paper mode,
which starts every transfer the moment its op ends, priced a plan that piles every route onto one
replica as free (docs/replan.md, "How the replay was found (history)").

:meth:`MeasuredCosts.plan` asks the path planner for routes on the same grid, then improves the
best of its plan and the running plan by local search on that replay (move one hop to another
replica of its stage; a counted budget of replays). The planner's busy gap is fixed at the
paper's 0.1 s, so the measured times are scaled by 0.1 s / overhead for it (its choices depend
only on the ratios); the replay is unscaled.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

import numpy as np

from .cluster import Cluster, Node
from .costmodel import BODY_TOTAL, HOME_TOTAL
from .calibration import COMPUTE, CalibratedModel
from .routeplan import RoutePlan
from .rules import Rules, validate

# (kind, microbatch, part, peer, start s, end s): one op as ProgramExecutor.trace records it.
TraceOp = tuple[str, int, object, object, float, float]
LINK_KINDS = ("act", "grad")  # same size both ways; labels are smaller and not priced
LINK_QUANTILE = 0.75  # per link and window: this quantile of the messages' unqueued link times


def _phase(kind: str, part: object) -> str | None:
    if kind == "fwd":
        return "L" if part in ("head", "last") else "F"
    if kind == "bwd":
        return None if part == "head" else "B"  # the head's backward is folded into L (cost model)
    return None


def _quantile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    x = q * (len(v) - 1)
    lo = int(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (x - lo) * (v[hi] - v[lo])


def window_samples(traces: Mapping[int, Sequence[Sequence[TraceOp]]], quantile: float = LINK_QUANTILE
                   ) -> tuple[dict[tuple[int, int], float], dict[tuple[int, str], float], float | None]:
    """One window's link seconds (a quantile per link), op seconds per (node, phase) (medians), and
    the fastest receive.

    A message's link time is its arrival (the receive op's end) minus its departure, the latest of
    the send op's start, the receive op's start (the transport is a rendezvous: gloo moves the
    payload only once the receive is posted) and the arrival of the previous message on the same
    directed link (it waited behind that one). So neither a receiver that was busy elsewhere (the
    old rule, send start -> arrival, blamed that on the link it received from next) nor a queue on
    the link is counted twice. Per link the window's ``quantile`` (0.75) of these times: a
    rate-limited link lets a message through at once after an idle gap and makes the next ones
    wait, so the low samples are not its cost.

    ``traces[rank][i]`` is rank's trace of the window's i-th step (every rank the same steps)."""
    samples: dict[tuple[int, int], list[float]] = defaultdict(list)
    ops: dict[tuple[int, str], list[float]] = defaultdict(list)
    fastest: float | None = None
    last_arrival: dict[tuple[int, int], float] = {}
    steps = min((len(t) for t in traces.values()), default=0)
    for i in range(steps):
        sent: dict[tuple[int, int, str, int], float] = {}
        for rank, per_step in traces.items():
            for kind, mb, part, peer, a, b in per_step[i]:
                if kind.startswith("send_") and kind[5:] in LINK_KINDS:
                    sent[(rank, int(peer), kind[5:], mb)] = a
                phase = _phase(kind, part)
                if phase is not None:
                    ops[(rank, phase)].append(b - a)
        messages: list[tuple[float, float, float, tuple[int, int]]] = []  # (send start, recv start, end, link)
        for rank, per_step in traces.items():
            for kind, mb, part, peer, a, b in per_step[i]:
                if not (kind.startswith("recv_") and kind[5:] in LINK_KINDS):
                    continue
                fastest = b - a if fastest is None else min(fastest, b - a)
                t_send = sent.get((int(peer), rank, kind[5:], mb))
                if t_send is None or b <= t_send:
                    continue
                messages.append((t_send, a, b, (int(peer), rank)))
        for t_send, a, b, link in sorted(messages, key=lambda m: m[2]):  # arrival order per link
            depart = max(t_send, a, last_arrival.get(link, t_send))
            samples[link].append(max(b - depart, 0.0))
            last_arrival[link] = b
    links = {k: _quantile(v, quantile) for k, v in samples.items()}
    return links, {k: statistics.median(v) for k, v in ops.items()}, fastest


def window_program_costs(traces: Mapping[int, Sequence[Sequence[TraceOp]]]
                         ) -> tuple[dict[tuple[int, str, object], float], dict[str, float]]:
    """One window's medians for the program replay: seconds per (rank, compute op kind, part) and
    per send op of each message kind (the send's cost on the compute thread)."""
    compute: dict[tuple[int, str, object], list[float]] = defaultdict(list)
    sends: dict[str, list[float]] = defaultdict(list)
    for rank, per_step in traces.items():
        for step in per_step:
            for kind, _mb, part, _peer, a, b in step:
                if kind in COMPUTE:
                    compute[(rank, kind, part)].append(b - a)
                elif kind.startswith("send_"):
                    sends[kind[5:]].append(b - a)
    return ({k: statistics.median(v) for k, v in compute.items()},
            {k: statistics.median(v) for k, v in sends.items()})


@dataclass
class MeasuredCosts:
    """Running estimates (EWMA over windows) for ``n`` nodes; see the module docstring."""

    n: int
    alpha: float = 0.5
    link_s: dict[tuple[int, int], float] = field(default_factory=dict)
    op_s: dict[tuple[int, str], float] = field(default_factory=dict)
    overhead_s: float | None = None
    windows: int = 0
    compute_s: dict[tuple[int, str, object], float] = field(default_factory=dict)  # (rank, kind, part)
    send_s: dict[str, float] = field(default_factory=dict)  # message kind -> send op seconds
    max_inflight: int | None = None  # the program compiler's, as the job runs it
    carry_batch: bool = False  # the backend's programs send the home's batch along the route (megatron)
    replays: int = 0  # program replays run (the local search's counted budget)

    def update(self, traces: Mapping[int, Sequence[Sequence[TraceOp]]]) -> None:
        """Fold one window of every rank's traces into the estimates."""
        links, ops, fastest = window_samples(traces)
        compute, sends = window_program_costs(traces)
        for table, new in ((self.link_s, links), (self.op_s, ops), (self.compute_s, compute), (self.send_s, sends)):
            for k, v in new.items():
                table[k] = v if k not in table else self.alpha * v + (1 - self.alpha) * table[k]
        if fastest is not None:
            self.overhead_s = fastest if self.overhead_s is None else \
                self.alpha * fastest + (1 - self.alpha) * self.overhead_s
        self.windows += 1

    def cost_matrix(self, stage_nodes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """C (seconds), 0 on the diagonal. An unmeasured link takes the fastest measured link between
        the same two stages (``stage_nodes``: the plan's grid; the links of one stage pair play the
        same part in every route), else the median measured link. (The median of all links is
        mostly the cheap ones that carry one message after an idle gap: a route over unmeasured
        links would look cheaper than the same route over the measured links of its kind.)"""
        fill = statistics.median(self.link_s.values()) if self.link_s else 1e-3
        C = np.full((self.n, self.n), fill)
        if stage_nodes is not None:
            stage = {node: s for s, nodes in enumerate(stage_nodes) for node in nodes}
            kind: dict[tuple[int, int], list[float]] = defaultdict(list)
            for (a, b), v in self.link_s.items():
                if a in stage and b in stage:
                    kind[(stage[a], stage[b])].append(v)
            for a in range(self.n):
                for b in range(self.n):
                    got = kind.get((stage.get(a, -1), stage.get(b, -1)))
                    if got:
                        C[a, b] = min(got)
        for (a, b), v in self.link_s.items():
            C[a, b] = max(v, 1e-6)
        np.fill_diagonal(C, 0.0)
        return C

    def stage_times(self, plan: RoutePlan) -> list[float]:
        """w per node in the cost model's units (a node never measured: the median node)."""
        homes = set(plan.stage_nodes[0])
        w: dict[int, float] = {}
        for node in range(self.n):
            got = {ph: self.op_s[(node, ph)] for ph in "FLB" if (node, ph) in self.op_s}
            if got:
                w[node] = sum(got.values()) / (HOME_TOTAL if node in homes else BODY_TOTAL)
        fill = statistics.median(w.values()) if w else 1e-3
        return [max(w.get(node, fill), 1e-6) for node in range(self.n)]

    def gap_s(self) -> float:
        return max(self.overhead_s or 0.0, 1e-4)

    def replay_model(self) -> CalibratedModel:
        """The program replay on the estimates (receives: rendezvous; no tail: see ``predict``). A compute
        op without its own sample (estimates set by hand, e.g. from configured rates) takes its phase's."""
        from ..runtime.program import BWD, FWD, PART_BODY, PART_EMBED, PART_FIRST, PART_HEAD, PART_LAST
        compute = dict(self.compute_s)
        for (rank, phase), v in self.op_s.items():
            for kind in (FWD, BWD):
                for part in (PART_EMBED, PART_FIRST, PART_BODY, PART_HEAD, PART_LAST):
                    if _phase(kind, part) == phase:
                        compute.setdefault((rank, kind, part), v)
        return CalibratedModel(compute, send_s=dict(self.send_s), recv_s=0.0, tail={}, rendezvous=True,
                               max_inflight=self.max_inflight, carry_batch=self.carry_batch)

    def predict(self, plan: RoutePlan) -> float:
        """Seconds of one iteration of ``plan``'s programs on the measured costs: the replay of every
        rank's program (no all-reduce or optimizer step: the caller adds what it measured of those)."""
        return self._replayer(plan.stage_nodes)(plan)

    def _replayer(self, stage_nodes: Sequence[Sequence[int]]):
        """``predict`` for plans of one grid, with the model and cost matrix built once (the local
        search replays hundreds of plans on the same estimates)."""
        model, C = self.replay_model(), self.cost_matrix(stage_nodes)

        def replay(plan: RoutePlan) -> float:
            self.replays += 1
            return model.replay_links(plan, C, LINK_KINDS).iteration_s
        return replay

    def cluster(self, plan: RoutePlan, memory: int, scale: float) -> Cluster:
        """The measured network as a planner :class:`Cluster` (times multiplied by ``scale``)."""
        w = self.stage_times(plan)
        C = self.cost_matrix(plan.stage_nodes) * scale
        nodes = [Node(i, "measured", memory=memory, stage_time_s=w[i] * scale) for i in range(self.n)]
        return Cluster("measured", nodes, cost_s=tuple(tuple(float(x) for x in row) for row in C))

    def plan(self, current: RoutePlan, rules: Rules, microbatches_per_home: int, seed: int = 0,
             budget_s: float = 2.0) -> RoutePlan:
        """Routes for ``current``'s grid, path length and rules on the measured costs.

        Memory: the rules' or the plan's TC1 limit; a plan without one may keep every route's
        activations on a node (that is what it declared). A plan without stage swaps gets none."""
        from .planner import Effort, plan_routes  # the planner (OR-tools) only when asked

        memory = rules.memory or current.memory or len(current.routes)
        swaps = any(_has_swap(r.body_stages) for r in current.routes)
        use = Rules(**{**vars(rules), "memory": memory, "path_length": current.path_length,
                       **({} if swaps else {"max_swaps": 0})})
        effort = Effort(placement_evals=0, static_iters=2000, sim_evals=300, exact_dtime=0.0, linked_dtime=1.0)
        res = plan_routes(self.cluster(current, memory, 0.1 / self.gap_s()), stage_nodes=current.stage_nodes,
                          num_stages=current.num_stages, path_length=current.path_length, memory=memory,
                          microbatches_per_home=microbatches_per_home, seed=seed, time_budget_s=budget_s,
                          rules=use, effort=effort)
        proposal = res.plan
        proposal.layout = current.layout
        plan = self.refine([proposal, _unordered(proposal), current], use, seed=seed)
        plan.meta = {**plan.meta, "builder": "drift_replan"}
        return plan

    def refine(self, starts: Sequence[RoutePlan], rules: Rules, seed: int = 0, max_replays: int = 400
               ) -> RoutePlan:
        """The best of ``starts`` by the program replay, then first-improvement local search from it:
        move one hop of one route to another replica of its stage (the stage sequence, so CC2-CC4,
        stays; ``rules`` checks the rest, TC1 memory included), keep a move that shortens the
        replayed iteration, until no move does or ``max_replays`` replays were run. A moved plan has
        no ``node_order``: the program compiler orders it. Deterministic for a seed."""
        rng = np.random.default_rng(seed)
        replay = self._replayer(starts[0].stage_nodes)  # every start and move keeps the grid
        scored = [(replay(p), i, p) for i, p in enumerate(starts)]
        best_s, _, best = min(scored, key=lambda x: (x[0], x[1]))
        budget = max_replays - len(starts)
        improved = True
        while improved and budget > 0:
            improved = False
            moves = [(ri, hi, rep) for ri, r in enumerate(best.routes) for hi, h in enumerate(r.hops)
                     for rep in range(len(best.stage_nodes[h.stage])) if rep != h.replica]
            for k in rng.permutation(len(moves)):
                if budget <= 0:
                    break
                cand = _moved(best, *moves[k])
                if validate(cand, rules):
                    continue
                budget -= 1
                t = replay(cand)
                if t < best_s * (1 - 1e-9):
                    best_s, best, improved = t, cand, True
                    break
        return best

    def describe(self) -> dict:
        """Every measured link (slowest first), w per node and the overhead (for events)."""
        links = sorted(self.link_s.items(), key=lambda kv: -kv[1])
        w = {}
        for node in range(self.n):
            got = [self.op_s[(node, ph)] for ph in "FLB" if (node, ph) in self.op_s]
            if got:
                w[str(node)] = round(sum(got), 5)
        return {"links_s": {f"{a}->{b}": round(v, 5) for (a, b), v in links}, "compute_s_per_mb": w,
                "overhead_s": None if self.overhead_s is None else round(self.overhead_s, 5)}


def _unordered(plan: RoutePlan) -> RoutePlan:
    """``plan`` without its ``node_order`` (the program compiler then orders every node's work)."""
    return replace(plan, routes=list(plan.routes), node_order=None, meta=dict(plan.meta))


def _moved(plan: RoutePlan, route: int, hop: int, replica: int) -> RoutePlan:
    """``plan`` with hop ``hop`` of route ``route`` on replica ``replica`` of the same stage (no node order)."""
    r = plan.routes[route]
    h = r.hops[hop]
    hops = r.hops[:hop] + (replace(h, replica=replica, node=plan.stage_nodes[h.stage][replica]),) + r.hops[hop + 1:]
    routes = list(plan.routes)
    routes[route] = replace(r, hops=hops)
    return replace(plan, routes=routes, node_order=None, meta=dict(plan.meta))


def _has_swap(stages: Iterable[int]) -> bool:
    seq = list(stages)
    return any(b < a for a, b in zip(seq, seq[1:]))


def link_uses(plan: RoutePlan) -> dict[tuple[int, int], int]:
    """How many activations each directed link carries per iteration (home -> hops -> home)."""
    out: dict[tuple[int, int], int] = defaultdict(int)
    for r in plan.routes:
        nodes = [r.home_node, *(h.node for h in r.hops), r.home_node]
        for a, b in zip(nodes, nodes[1:]):
            out[(a, b)] += 1
    return dict(out)


__all__ = ["MeasuredCosts", "window_samples", "window_program_costs", "link_uses", "TraceOp"]
