"""The RoutePlan: which nodes each microbatch visits in one iteration.

A plan is plain data (no torch) so it can be produced offline by a planner or a user, diffed,
plotted, validated and shipped as JSON. Node ids are global ranks of the training job.

Terms (see ``shared/spec/skippipe.md``):

* stage 0 is the *home* stage. Every microbatch starts on a stage-0 node (its home) and, in the
  ``ring`` layout, comes back to the same node for the head and the loss.
* ``hops`` are the body stages a microbatch visits, in order, each as (stage, replica, node).
  The backward pass retraces the exact reverse route.
* in the ``linear`` layout the head and loss live on the last stage, so every route must end on
  stage S-1 (that stage can never be skipped); the home node still embeds and owns the labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

PLAN_FORMAT_VERSION = 1
LAYOUTS = ("ring", "linear")


class PlanFormatError(ValueError):
    """A plan file or dict that does not have the RoutePlan shape."""


@dataclass(frozen=True)
class Hop:
    """One visit of a microbatch: body ``stage``, its ``replica`` index, and the global ``node`` id."""

    stage: int
    replica: int
    node: int


@dataclass(frozen=True)
class MicrobatchRoute:
    """The route of microbatch ``mb``: its home (a stage-0 replica) and ordered forward hops."""

    mb: int
    home_replica: int
    home_node: int
    hops: tuple[Hop, ...]

    @property
    def body_stages(self) -> tuple[int, ...]:
        return tuple(h.stage for h in self.hops)

    @property
    def nodes(self) -> tuple[int, ...]:
        """Forward node sequence, home first (the ring return to home is implicit)."""
        return (self.home_node,) + tuple(h.node for h in self.hops)


@dataclass
class RoutePlan:
    """Routes of every microbatch of one iteration on a given stage -> node layout.

    ``stage_nodes[s][r]`` is the global node id of replica ``r`` of stage ``s``.
    ``path_length`` is L: stages on each route counting stage 0.
    ``node_order`` optionally gives, per node, the planned processing order as a list of
    ``(mb, "F" | "B")``; executors that honour it use it, others derive their own order.
    """

    stage_nodes: list[list[int]]
    routes: list[MicrobatchRoute]
    path_length: int
    layout: str = "ring"
    memory: int | None = None
    node_order: dict[int, list[tuple[int, str]]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- derived views
    @property
    def num_stages(self) -> int:
        return len(self.stage_nodes)

    @property
    def num_microbatches(self) -> int:
        return len(self.routes)

    @property
    def skip_ratio(self) -> float:
        """k = 1 - L/S as in the spec (0 for the full pipeline)."""
        return 1.0 - self.path_length / self.num_stages

    @property
    def nodes(self) -> list[int]:
        return sorted(n for stage in self.stage_nodes for n in stage)

    def node_stage(self) -> dict[int, tuple[int, int]]:
        """Map node id -> (stage, replica)."""
        return {n: (s, r) for s, reps in enumerate(self.stage_nodes) for r, n in enumerate(reps)}

    def stage_visits(self) -> list[int]:
        """Microbatches visiting each stage this iteration (stage 0 is visited by all)."""
        visits = [0] * self.num_stages
        visits[0] = len(self.routes)
        for route in self.routes:
            for hop in route.hops:
                visits[hop.stage] += 1
        return visits

    def node_visits(self) -> dict[int, int]:
        """Microbatches served by each node (home nodes count their own microbatches)."""
        counts = {n: 0 for n in self.nodes}
        for route in self.routes:
            counts[route.home_node] += 1
            for hop in route.hops:
                counts[hop.node] += 1
        return counts

    def achieved_skip_ratio(self) -> float:
        """Fraction of body-stage computations skipped over the whole iteration."""
        body = self.num_stages - 1
        if body == 0 or not self.routes:
            return 0.0
        visited = sum(len(r.hops) for r in self.routes)
        return 1.0 - visited / (body * len(self.routes))

    def routes_from(self, home_node: int) -> list[MicrobatchRoute]:
        return [r for r in self.routes if r.home_node == home_node]

    # ----------------------------------------------------------------- JSON form
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": "routeplan",
            "version": PLAN_FORMAT_VERSION,
            "layout": self.layout,
            "path_length": self.path_length,
            "memory": self.memory,
            "stage_nodes": [list(s) for s in self.stage_nodes],
            "microbatches": [
                {
                    "id": r.mb,
                    "home": {"replica": r.home_replica, "node": r.home_node},
                    "hops": [{"stage": h.stage, "replica": h.replica, "node": h.node} for h in r.hops],
                }
                for r in self.routes
            ],
            "meta": dict(self.meta),
        }
        if self.node_order is not None:
            out["node_order"] = {str(n): [[mb, ph] for mb, ph in order] for n, order in self.node_order.items()}
        return out

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutePlan":
        def need(obj: dict, key: str, where: str) -> Any:
            if key not in obj:
                raise PlanFormatError(f"plan: missing field '{where}{key}'")
            return obj[key]

        if data.get("format") != "routeplan":
            raise PlanFormatError("plan: field 'format' must be 'routeplan' (is this a RoutePlan JSON file?)")
        version = need(data, "version", "")
        if version != PLAN_FORMAT_VERSION:
            raise PlanFormatError(
                f"plan: field 'version' is {version!r}; this build reads version {PLAN_FORMAT_VERSION}"
            )
        layout = need(data, "layout", "")
        if layout not in LAYOUTS:
            raise PlanFormatError(f"plan: field 'layout' is {layout!r}; use one of {LAYOUTS}")
        stage_nodes = [[int(n) for n in s] for s in need(data, "stage_nodes", "")]
        routes = []
        for i, mb in enumerate(need(data, "microbatches", "")):
            home = need(mb, "home", f"microbatches[{i}].")
            hops = tuple(
                Hop(int(need(h, "stage", f"microbatches[{i}].hops[{j}].")),
                    int(need(h, "replica", f"microbatches[{i}].hops[{j}].")),
                    int(need(h, "node", f"microbatches[{i}].hops[{j}].")))
                for j, h in enumerate(need(mb, "hops", f"microbatches[{i}]."))
            )
            routes.append(MicrobatchRoute(int(need(mb, "id", f"microbatches[{i}].")),
                                          int(need(home, "replica", f"microbatches[{i}].home.")),
                                          int(need(home, "node", f"microbatches[{i}].home.")), hops))
        node_order = None
        if data.get("node_order") is not None:
            node_order = {int(n): [(int(mb), str(ph)) for mb, ph in order] for n, order in data["node_order"].items()}
        return cls(stage_nodes=stage_nodes, routes=routes, path_length=int(need(data, "path_length", "")),
                   layout=layout, memory=data.get("memory"), node_order=node_order, meta=dict(data.get("meta", {})))

    @classmethod
    def from_json(cls, text: str) -> "RoutePlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanFormatError(f"plan: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "RoutePlan":
        p = Path(path)
        if not p.is_file():
            raise PlanFormatError(f"plan file not found: {p}")
        return cls.from_json(p.read_text())


def make_route(mb: int, stage_nodes: Sequence[Sequence[int]], home_replica: int,
               hops: Iterable[tuple[int, int]]) -> MicrobatchRoute:
    """Build a route from (stage, replica) pairs, filling in global node ids from the layout."""
    return MicrobatchRoute(
        mb=mb,
        home_replica=home_replica,
        home_node=stage_nodes[0][home_replica],
        hops=tuple(Hop(s, r, stage_nodes[s][r]) for s, r in hops),
    )


def grid_stage_nodes(num_stages: int, replicas: int | Sequence[int]) -> list[list[int]]:
    """Stage -> node ids for consecutive ranks, stage-major: stage s replica r -> rank offset(s) + r.

    ``replicas`` is one count for all stages or a count per stage.
    """
    counts = [replicas] * num_stages if isinstance(replicas, int) else list(replicas)
    if len(counts) != num_stages:
        raise ValueError(f"replicas: {len(counts)} counts given for {num_stages} stages")
    out, nxt = [], 0
    for c in counts:
        out.append(list(range(nxt, nxt + c)))
        nxt += c
    return out
