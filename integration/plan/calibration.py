"""Simulator calibration from a measured run: what the w-factor model misses, fitted once, then applied.

The paper-mode / full-mode simulator prices ops as factors of one forward time ``w`` per node and
lets each node start its ready ops in FIFO order. A routed run on shared CPUs differs in three
ways that a per-op trace of ONE run (the full pipeline) shows:

* compute under contention: every rank's ops take what they take while the other ranks also
  compute (2 cores, 8 processes); the probe's concurrent w and the 1.5x / 0.25x factors do not
  capture it, so measured per-(rank, phase) medians replace them;
* message overhead: a send builds its message on the compute thread (header + copy), so the node
  stays busy after each op that sends: the median send op becomes the node's ``gap_s``;
* order: the runtime executes the program compiled by ``integration/runtime/program.py`` (a
  unit-cost list schedule, or the plan's own ``node_order``), not FIFO; the prediction follows the
  compiled per-rank order.

The fit uses the full pipeline's trace only; predictions for the skip plans are out of sample.
Paper mode and the simulator's defaults are untouched (the calibrated model passes parameters).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from .cluster import Cluster
from .routeplan import RoutePlan
from .simulator import SimResult, simulate

# One trace entry: (op kind, microbatch, part, peer, start s, end s), as benchmarks/wan_bench.py records.
TraceOp = tuple[str, int, Any, Any, float, float]
SEND_KINDS = ("send_act", "send_grad", "send_labels")


def _phase(kind: str, part: str | None) -> str | None:
    if kind == "fwd":
        return "L" if part == "head" else "F"
    if kind == "bwd":
        return "L" if part == "head" else "B"
    return None


def runtime_order(plan: RoutePlan) -> dict[int, list[tuple[int, str]]]:
    """The per-node F/B order the runtime executes for ``plan`` (its compiled program)."""
    from ..runtime.program import compile_plan
    prog = compile_plan(plan)
    out: dict[int, list[tuple[int, str]]] = {}
    for node in plan.nodes:
        seq = []
        for op in prog.for_rank(node):
            ph = _phase(op.kind, op.part)
            if ph in ("F", "B"):
                seq.append((op.mb, ph))
        out[node] = seq
    return out


@dataclass
class CalibratedModel:
    """Measured op seconds per (node, phase), message overhead, and the runtime's op order."""

    op_seconds: dict[tuple[int, str], float] = field(default_factory=dict)
    send_overhead_s: float = 0.0
    allreduce_latency: bool = True
    fitted_on: str = "full"

    @classmethod
    def fit(cls, traces: Mapping[str, Mapping[int, Sequence[TraceOp]]], plans: Mapping[str, RoutePlan],
            cluster: Cluster, probe: Any = None, on: str = "full", allreduce_latency: bool = True) -> "CalibratedModel":
        """Fit from ``traces[on]`` (rank -> ops of one iteration)."""
        per: dict[tuple[int, str], list[float]] = defaultdict(list)
        sends: list[float] = []
        for rank, ops in traces[on].items():
            by_mb: dict[tuple[int, str], float] = defaultdict(float)
            for kind, mb, part, _peer, a, b in ops:
                ph = _phase(kind, part)
                if ph is not None:
                    by_mb[(mb, ph)] += b - a  # L = head forward + loss backward: one op in the simulator
                elif kind in SEND_KINDS:
                    sends.append(b - a)
            for (mb, ph), d in by_mb.items():
                per[(rank, ph)].append(d)
        op_seconds = {k: statistics.median(v) for k, v in per.items()}
        return cls(op_seconds, statistics.median(sends) if sends else 0.0, allreduce_latency, on)

    def simulate(self, plan: RoutePlan, cluster: Cluster) -> SimResult:
        """Full mode (link contention + all-reduce) with the fitted parameters and the runtime's order."""
        ordered = replace(plan, node_order=plan.node_order or runtime_order(plan))
        return simulate(ordered, cluster, mode="full", gap_s=self.send_overhead_s, honour_order=True,
                        op_seconds=self.op_seconds, allreduce_latency=self.allreduce_latency, memory=10 ** 6)

    def describe(self) -> str:
        by_phase: dict[str, list[float]] = defaultdict(list)
        for (_n, ph), v in self.op_seconds.items():
            by_phase[ph].append(v)
        parts = ", ".join(f"{ph} {1e3 * min(v):.1f}-{1e3 * max(v):.1f} ms" for ph, v in sorted(by_phase.items()))
        return (f"fitted on the {self.fitted_on} pipeline's trace: op times {parts}; message overhead "
                f"{1e3 * self.send_overhead_s:.2f} ms per op; runtime op order; all-reduce latency term "
                f"{'on' if self.allreduce_latency else 'off'}")
