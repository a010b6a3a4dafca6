"""Simulator calibration from a measured run: replay the runtime's own programs with measured op costs.

The event simulator (``integration/plan/simulator.py``) prices ops as factors of one forward time
``w`` per node and starts a transfer the moment its op ends. A per-op trace of a routed run on
emulated links (``benchmarks/wan_bench.py``) shows what that misses:

* program order: each rank executes the program compiled by ``integration/runtime/program.py``
  strictly in order, and a receive blocks, so an op waits for every receive ahead of it in its
  rank's program, not only for its own data. (The trace first showed this for sends queued behind
  the next microbatch's receive; the compiler now issues a send right after the compute op that
  made its data, and the replay follows whatever order the compiler gives);
* compute under contention: ranks share 2 cores, so the real op times are not ``w`` times the
  1.5x / 0.25x factors; measured medians per (rank, op kind, part) replace them;
* message overhead: building a message (header + copy) and posting a receive cost CPU time on the
  compute thread: per message kind, the median send op and the fastest receive op (one whose message
  had arrived: no waiting) are charged per message. One number for all kinds was wrong for megatron:
  its tiny batch receives (0.2-0.4 ms) set the minimum, against ~5 ms for an activation;
* the backend's program: megatron's (``compile_plan(carry_batch=True)``) sends the home's data batch
  to every node of the route ahead of the activation; the replay runs the program the backend runs;
* the iteration tail: after the programs the backends call collectives (loss and grad-norm
  all-reduces over the world, data-parallel gradient all-reduces), each paying 2(k-1) x the group's
  largest latency on the emulated network, then the optimizer step. The fit takes the list of
  collectives each rank called after its program (group, bytes) and the time from the last one to
  the iteration end; the replay prices those collectives on the cluster. Without it, a one-column
  grid (no data-parallel groups) had no tail at all in the replay (0.49 s measured).

:class:`CalibratedModel` replays every rank's compiled program: compute and sends take their fitted
time, a receive waits for its message (sent at the sender's program position, serialised on the
directed link at its bandwidth, plus the link's latency), then the fitted tail (or, for a model
without one, each stage group's gradient all-reduce by full mode's ring formula). Fitted on the
full pipeline's trace only (every timed iteration: one alone is noisy under load); predictions for
other plans are out of sample. The simulator's paper
and full modes are unchanged.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .cluster import Cluster
from .routeplan import RoutePlan
from .simulator import Op as SimOp
from .simulator import SimResult, SimulationError

# One trace entry: (op kind, microbatch, part, peer, start s, end s), as benchmarks/wan_bench.py records.
TraceOp = tuple[str, int, Any, Any, float, float]
COMPUTE = ("load", "fwd", "bwd")


def _phase(kind: str, part: str | None) -> str:
    """The simulator's phase of a compute op (for charts): F, L (head + loss) or B."""
    if part in ("head", "last") or kind == "load":
        return "L"
    return "F" if kind == "fwd" else "B"


@dataclass
class CalibratedModel:
    """Measured compute seconds per (rank, kind, part), per-message overheads per message kind, and the
    backend's iteration tail (the collectives after the program, then the optimizer step).

    ``send_s`` / ``recv_s``: seconds per message on the compute thread, one number for every kind or a
    dict by kind (``"act"``, ``"grad"``, ``"batch"``, ``"labels"``). ``carry_batch``: the backend's
    program hands the home's data batch to every node of the route (megatron,
    ``compile_plan(carry_batch=True)``); the replay must run that program, not DeepSpeed's.
    ``message_bytes``: bytes per message kind (default: the workload's activation bytes).
    ``tail``: per rank, the collectives it calls after its last program op, in order, as
    (group ranks, bytes); ``None`` prices the stage groups' gradient all-reduce instead (full mode's
    formula). ``post_s``: per rank, seconds from its last collective to its iteration end.
    ``rendezvous``: a message leaves only once its receive is posted (gloo's p2p; see
    :meth:`_replay_programs`). ``max_inflight``: the program compiler's, as the job runs it.
    """

    compute_s: dict[tuple[int, str, Any], float] = field(default_factory=dict)
    send_s: float | dict[str, float] = 0.0
    recv_s: float | dict[str, float] = 0.0
    allreduce_latency: bool = True
    fitted_on: str = "full"
    carry_batch: bool = False
    message_bytes: dict[str, int] = field(default_factory=dict)
    tail: dict[int, list[tuple[tuple[int, ...], int]]] | None = None
    post_s: dict[int, float] = field(default_factory=dict)
    rendezvous: bool = False
    max_inflight: int | None = None

    @classmethod
    def fit(cls, traces: Mapping[str, Any], on: str = "full", allreduce_latency: bool = True,
            carry_batch: bool = False, message_bytes: Mapping[str, int] | None = None) -> "CalibratedModel":
        """Fit from ``traces[on]``: rank -> ops of one iteration, or a list of those (several iterations).

        Compute and send costs are medians over all iterations. A receive includes its wait, so its
        overhead per kind is the fastest receive of that kind (one whose message had arrived), taken
        per iteration and then the median over iterations (robust to one odd fast receive). Entries
        of kind ``"allreduce"`` (``part`` = bytes, ``peer`` = the group's ranks) after a rank's last
        program op form its tail; an ``"end"`` entry marks the rank's iteration end (``post_s``)."""
        given = traces[on]
        iterations = list(given) if isinstance(given, (list, tuple)) else [given]
        if not iterations:
            raise ValueError(f"CalibratedModel.fit: traces[{on!r}] holds no iteration")
        per: dict[tuple[int, str, Any], list[float]] = defaultdict(list)
        sends: dict[str, list[float]] = defaultdict(list)
        fastest_recv: dict[str, list[float]] = defaultdict(list)
        post: dict[int, list[float]] = defaultdict(list)
        tail: dict[int, list[tuple[tuple[int, ...], int]]] | None = None
        for it in iterations:
            recvs: dict[str, list[float]] = defaultdict(list)
            it_tail: dict[int, list[tuple[tuple[int, ...], int]]] = {}
            for rank, ops in it.items():
                rank = int(rank)
                program = [o for o in ops if o[0] not in ("allreduce", "end")]
                last_prog = program[-1][5] if program else 0.0
                it_tail[rank] = [(tuple(int(x) for x in peer), int(part)) for kind, _mb, part, peer, a, _b in ops
                                 if kind == "allreduce" and a >= last_prog]
                last = max([o[5] for o in ops if o[0] != "end"], default=0.0)
                post[rank] += [o[4] - last for o in ops if o[0] == "end"]
                for kind, _mb, part, _peer, a, b in program:
                    if kind in COMPUTE:
                        per[(rank, kind, part)].append(b - a)
                    elif kind.startswith("send_"):
                        sends[kind[5:]].append(b - a)
                    elif kind.startswith("recv_"):
                        recvs[kind[5:]].append(b - a)
                    else:
                        raise ValueError(f"CalibratedModel.fit: unknown op kind {kind!r} in rank {rank}'s trace")
            for k, v in recvs.items():
                fastest_recv[k].append(min(v))
            if any(it_tail.values()):
                tail = it_tail  # the same collectives every iteration; the last one's are kept
        compute = {k: statistics.median(v) for k, v in per.items()}
        send = {k: statistics.median(v) for k, v in sends.items()}
        recv = {k: statistics.median(v) for k, v in fastest_recv.items()}
        return cls(compute, send, recv, allreduce_latency, on, carry_batch, dict(message_bytes or {}), tail,
                   {r: statistics.median(v) for r, v in post.items() if v})

    def _compute(self, rank: int, kind: str, part: Any) -> float:
        if (rank, kind, part) in self.compute_s:
            return self.compute_s[(rank, kind, part)]
        same = [v for (r, k, p), v in self.compute_s.items() if k == kind and p == part]
        return statistics.median(same) if same else 0.0  # a rank the fit never saw doing this op

    @staticmethod
    def _overhead(table: float | Mapping[str, float], what: str) -> float:
        if not isinstance(table, Mapping):
            return float(table)
        if what in table:
            return table[what]
        return statistics.median(table.values()) if table else 0.0  # a kind the fit never saw

    def _collective_s(self, group: Sequence[int], nbytes: int, lat: np.ndarray, bw: np.ndarray) -> float:
        """A ring all-reduce over ``group``: 2(k-1)/k x bytes over its slowest link, plus (with
        ``allreduce_latency``) 2(k-1) x its largest latency, as the emulation's delay layer adds."""
        k = len(group)
        if k < 2:
            return 0.0
        g = np.ix_(list(group), list(group))
        t = 2 * (k - 1) / k * nbytes / bw[g][~np.eye(k, dtype=bool)].min()
        return t + (2 * (k - 1) * lat[g].max() if self.allreduce_latency else 0.0)

    def simulate(self, plan: RoutePlan, cluster: Cluster, message_bytes: int | None = None) -> SimResult:
        """Replay ``plan``'s compiled programs on ``cluster`` (latency, bandwidth, stage params).
        ``message_bytes`` overrides the size of activation and gradient messages."""
        lat, bw = cluster.latency_matrix(), cluster.bandwidth_matrix()
        act_bytes = cluster.workload.activation_bytes if message_bytes is None else message_bytes
        sizes = {"act": act_bytes, "grad": act_bytes, **self.message_bytes}
        if message_bytes is not None:
            sizes.update(act=message_bytes, grad=message_bytes)
        now, ops = self._replay_programs(plan, lambda a, b, what: sizes.get(what, act_bytes) / bw[a][b],
                                         lambda a, b, what: lat[a][b])
        compute_end = max(now.values()) if now else 0.0
        allreduce: dict[int, float] = {}
        if self.tail is None:
            total = 0.0
            for s, group in enumerate(plan.stage_nodes):
                allreduce[s] = self._collective_s(group, cluster.workload.stage_param_bytes(s), lat, bw) \
                    if len(group) > 1 else 0.0
                total = max(total, max(now.get(n, 0.0) for n in group) + allreduce[s])
            return SimResult(iteration_s=total, compute_end_s=compute_end, mode="replay", ops=ops,
                             allreduce_s=allreduce)
        total = self._replay_tail(now, lat, bw, allreduce)
        return SimResult(iteration_s=total, compute_end_s=compute_end, mode="replay", ops=ops, allreduce_s=allreduce)

    def replay_links(self, plan: RoutePlan, link_s: np.ndarray, priced: tuple[str, ...] = ("act", "grad")
                     ) -> SimResult:
        """Replay ``plan``'s programs with a measured time per message and directed link
        (``link_s[a][b]`` seconds from the message's departure to the end of its receive, for the
        message kinds in ``priced``; the others, labels and megatron's batch, only their overheads)
        and no iteration tail: the programs only (what a running job's estimates can price,
        ``integration/plan/measured.py``)."""
        now, ops = self._replay_programs(plan, lambda a, b, what: 0.0,
                                         lambda a, b, what: link_s[a][b] if what in priced else 0.0)
        end = max(now.values()) if now else 0.0
        return SimResult(iteration_s=end, compute_end_s=end, mode="replay", ops=ops)

    def _replay_programs(self, plan: RoutePlan, occupy_s, latency_s) -> tuple[dict[int, float], list[SimOp]]:
        """Every rank's compiled program in order: compute and sends take their fitted time, a receive
        blocks until its message arrives. A message occupies its directed link ``occupy_s(a, b, kind)``
        seconds (one at a time), then takes ``latency_s(a, b, kind)``. Eager (default): it leaves when the
        send op ends. ``rendezvous``: it leaves only once the receive is posted too (gloo moves a
        payload when the receiver asks for it), so a receiver takes its messages one at a time.
        Returns each rank's end and the compute ops."""
        from ..runtime.program import compile_plan
        prog = compile_plan(plan, self.max_inflight, carry_batch=self.carry_batch)
        ranks = sorted(prog.ops)
        pc = {r: 0 for r in ranks}
        now = {r: 0.0 for r in ranks}
        arrival: dict[tuple[int, int, str, int], float] = {}  # eager: arrival; rendezvous: send start
        link_free: dict[tuple[int, int], float] = defaultdict(float)
        ops: list[SimOp] = []
        progressed = True
        while progressed:
            progressed = False
            for r in ranks:
                seq = prog.ops[r]
                while pc[r] < len(seq):
                    op = seq[pc[r]]
                    t = now[r]
                    if op.kind in COMPUTE:
                        end = t + self._compute(r, op.kind, op.part)
                        if op.kind != "load":
                            ops.append(SimOp(r, op.mb, _phase(op.kind, op.part), t, end))
                    elif op.kind.startswith("send"):
                        what = op.kind[5:]
                        end = t + self._overhead(self.send_s, what)
                        if self.rendezvous:
                            arrival[(r, op.peer, what, op.mb)] = t
                        else:
                            start = max(end, link_free[(r, op.peer)])
                            link_free[(r, op.peer)] = start + occupy_s(r, op.peer, what)
                            arrival[(r, op.peer, what, op.mb)] = link_free[(r, op.peer)] + latency_s(r, op.peer, what)
                    else:
                        what = op.kind[5:]
                        key = (op.peer, r, what, op.mb)
                        if key not in arrival:
                            break  # blocked until the sender's program reaches the send
                        if self.rendezvous:
                            # Only this rank receives on the link, in program order: the link is free
                            # once its previous receive ended.
                            depart = max(t, arrival[key])
                            got = depart + occupy_s(op.peer, r, what) + latency_s(op.peer, r, what)
                        else:
                            got = max(t, arrival[key])
                        end = got + self._overhead(self.recv_s, what)
                    now[r] = end
                    pc[r] += 1
                    progressed = True
        stuck = [r for r in ranks if pc[r] < len(prog.ops[r])]
        if stuck:
            raise SimulationError(f"calibrated replay: ranks {stuck[:10]} wait forever (the programs deadlock)")
        return now, ops

    def _replay_tail(self, now: dict[int, float], lat: np.ndarray, bw: np.ndarray,
                     allreduce: dict[int, float]) -> float:
        """The fitted tail after the programs: each rank's collectives in order (the n-th call on a group
        starts when all its members reach their n-th call on it), then each rank's ``post_s``. Fills
        ``allreduce`` (collective index -> seconds, rank 0's calls first) and returns the iteration end."""
        tail = {r: list(self.tail.get(r, [])) for r in now}
        pos = {r: 0 for r in now}
        calls: dict[int, dict[tuple[int, ...], int]] = {r: defaultdict(int) for r in now}
        ready: dict[tuple[tuple[int, ...], int], dict[int, float]] = defaultdict(dict)
        progressed = True
        while progressed:
            progressed = False
            for r in now:
                while pos[r] < len(tail[r]):
                    group, nbytes = tail[r][pos[r]]
                    key = (group, calls[r][group])
                    ready[key][r] = now[r]
                    members = [m for m in group if m in now]
                    if len(ready[key]) < len(members):
                        break  # waits for the other members of the group
                    t = max(ready[key].values()) + self._collective_s(group, nbytes, lat, bw)
                    for m in members:
                        now[m] = t
                        calls[m][group] += 1
                        pos[m] += 1
                    allreduce.setdefault(len(allreduce), t - max(ready[key].values()))
                    progressed = True
        stuck = [r for r in now if pos[r] < len(tail[r])]
        if stuck:
            raise SimulationError(f"calibrated replay: ranks {stuck[:10]} wait forever in the tail's collectives "
                                  f"(the fitted tail does not match across ranks)")
        return max(now[r] + self.post_s.get(r, 0.0) for r in now) if now else 0.0

    def describe(self) -> str:
        by: dict[str, list[float]] = defaultdict(list)
        for (_r, kind, part), v in self.compute_s.items():
            if kind != "load":
                by[f"{kind} {part}"].append(v)
        parts = ", ".join(f"{k} {1e3 * min(v):.1f}-{1e3 * max(v):.1f} ms" for k, v in sorted(by.items()))

        def ms(table: float | Mapping[str, float]) -> str:
            if not isinstance(table, Mapping):
                return f"{1e3 * table:.2f} ms"
            return ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in sorted(table.items()))
        if self.tail is None:
            tail = "tail: the stage groups' gradient all-reduce (full mode's formula)"
        else:
            calls = self.tail.get(0, [])
            tail = (f"tail: rank 0 calls {len(calls)} collectives after its program "
                    f"(groups of {sorted({len(g) for g, _ in calls})} ranks), then "
                    f"{1e3 * statistics.median(self.post_s.values()) if self.post_s else 0.0:.1f} ms (median rank)")
        return (f"replay of the compiled programs{' (carry_batch: megatron)' if self.carry_batch else ''}, fitted "
                f"on the {self.fitted_on} pipeline's trace: {parts}; message overhead send {ms(self.send_s)}; "
                f"receive {ms(self.recv_s)}; message bytes {dict(sorted(self.message_bytes.items())) or 'activation'};"
                f" {tail}; all-reduce latency term {'on' if self.allreduce_latency else 'off'}")
