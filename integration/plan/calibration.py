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
  compute thread: the median send op and the fastest receive op (one whose message had arrived:
  no waiting) are charged per message.

:class:`CalibratedModel` replays every rank's compiled program: compute and sends take their fitted
time, a receive waits for its message (sent at the sender's program position, serialised on the
directed link at its bandwidth, plus the link's latency), then each stage group all-reduces its
gradients (full mode's ring formula) and the iteration ends with the slowest group. Fitted on the
full pipeline's trace only; predictions for other plans are out of sample. The simulator's paper
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
    """Measured compute seconds per (rank, kind, part) and per-message overheads."""

    compute_s: dict[tuple[int, str, Any], float] = field(default_factory=dict)
    send_s: float = 0.0
    recv_s: float = 0.0
    allreduce_latency: bool = True
    fitted_on: str = "full"

    @classmethod
    def fit(cls, traces: Mapping[str, Mapping[int, Sequence[TraceOp]]], on: str = "full",
            allreduce_latency: bool = True) -> "CalibratedModel":
        """Fit from ``traces[on]`` (rank -> ops of one iteration)."""
        per: dict[tuple[int, str, Any], list[float]] = defaultdict(list)
        sends: list[float] = []
        recvs: list[float] = []
        for rank, ops in traces[on].items():
            for kind, _mb, part, _peer, a, b in ops:
                if kind in COMPUTE:
                    per[(int(rank), kind, part)].append(b - a)
                elif kind.startswith("send"):
                    sends.append(b - a)
                else:
                    recvs.append(b - a)  # includes waiting: only the fastest is pure overhead
        compute = {k: statistics.median(v) for k, v in per.items()}
        recv = min(recvs) if recvs else 0.0
        return cls(compute, statistics.median(sends) if sends else 0.0, recv, allreduce_latency, on)

    def _compute(self, rank: int, kind: str, part: Any) -> float:
        if (rank, kind, part) in self.compute_s:
            return self.compute_s[(rank, kind, part)]
        same = [v for (r, k, p), v in self.compute_s.items() if k == kind and p == part]
        return statistics.median(same) if same else 0.0  # a rank the fit never saw doing this op

    def simulate(self, plan: RoutePlan, cluster: Cluster, message_bytes: int | None = None) -> SimResult:
        """Replay ``plan``'s compiled programs on ``cluster`` (latency, bandwidth, stage params)."""
        from ..runtime.program import compile_plan
        prog = compile_plan(plan)
        lat, bw = cluster.latency_matrix(), cluster.bandwidth_matrix()
        nbytes = cluster.workload.activation_bytes if message_bytes is None else message_bytes
        ranks = sorted(prog.ops)
        pc = {r: 0 for r in ranks}
        now = {r: 0.0 for r in ranks}
        arrival: dict[tuple[int, int, str, int], float] = {}
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
                        end = t + self.send_s
                        what = op.kind[5:]
                        start = max(end, link_free[(r, op.peer)])
                        link_free[(r, op.peer)] = start + nbytes / bw[r][op.peer]
                        arrival[(r, op.peer, what, op.mb)] = link_free[(r, op.peer)] + lat[r][op.peer]
                    else:
                        key = (op.peer, r, op.kind[5:], op.mb)
                        if key not in arrival:
                            break  # blocked until the sender's program reaches the send
                        end = max(t, arrival[key]) + self.recv_s
                    now[r] = end
                    pc[r] += 1
                    progressed = True
        stuck = [r for r in ranks if pc[r] < len(prog.ops[r])]
        if stuck:
            raise SimulationError(f"calibrated replay: ranks {stuck[:10]} wait forever (the programs deadlock)")
        compute_end = max(now.values()) if now else 0.0
        allreduce: dict[int, float] = {}
        total = 0.0
        for s, group in enumerate(plan.stage_nodes):
            k = len(group)
            t_ar = 0.0
            if k > 1:
                g = np.ix_(group, group)
                b = bw[g][~np.eye(k, dtype=bool)].min()
                t_ar = 2 * (k - 1) / k * cluster.workload.stage_param_bytes(s) / b
                if self.allreduce_latency:
                    t_ar += 2 * (k - 1) * lat[g].max()
            allreduce[s] = t_ar
            total = max(total, max(now.get(n, 0.0) for n in group) + t_ar)
        return SimResult(iteration_s=total, compute_end_s=compute_end, mode="replay", ops=ops, allreduce_s=allreduce)

    def describe(self) -> str:
        by: dict[str, list[float]] = defaultdict(list)
        for (_r, kind, part), v in self.compute_s.items():
            if kind != "load":
                by[f"{kind} {part}"].append(v)
        parts = ", ".join(f"{k} {1e3 * min(v):.1f}-{1e3 * max(v):.1f} ms" for k, v in sorted(by.items()))
        return (f"replay of the compiled programs, fitted on the {self.fitted_on} pipeline's trace: {parts}; "
                f"message overhead send {1e3 * self.send_s:.2f} ms, receive {1e3 * self.recv_s:.2f} ms; "
                f"all-reduce latency term {'on' if self.allreduce_latency else 'off'}")
