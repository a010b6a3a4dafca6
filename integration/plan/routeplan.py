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

from .textfile import read_bounded_text

PLAN_FORMAT_VERSION = 1
LAYOUTS = ("ring", "linear")
# Loader bounds: past them a file is refused with a message instead of exhausting memory.
MAX_STAGES = 1024
MAX_NODES = 100_000
MAX_MICROBATCHES = 1_000_000
MAX_ID = 10 ** 9
MAX_TEXT = 256 * 1024 * 1024


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
        if not visits:
            return visits
        visits[0] = len(self.routes)
        for route in self.routes:
            for hop in route.hops:
                if 0 <= hop.stage < len(visits):  # other stages are rule violations (rules.validate)
                    visits[hop.stage] += 1
        return visits

    def node_visits(self) -> dict[int, int]:
        """Microbatches served by each node (home nodes count their own microbatches)."""
        counts = {n: 0 for n in self.nodes}
        for route in self.routes:
            counts[route.home_node] = counts.get(route.home_node, 0) + 1
            for hop in route.hops:
                counts[hop.node] = counts.get(hop.node, 0) + 1
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
        """Build a plan from its JSON form; any other shape is one :class:`PlanFormatError` naming the field."""
        def need(obj: Any, key: str, where: str) -> Any:
            if not isinstance(obj, dict):
                raise PlanFormatError(f"plan: field '{where.rstrip('.') or 'plan'}' must be an object")
            if key not in obj:
                raise PlanFormatError(f"plan: missing field '{where}{key}'")
            return obj[key]

        def integer(v: Any, where: str, lo: int = 0) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= MAX_ID:
                raise PlanFormatError(f"plan: field '{where}' must be an integer in {lo}..{MAX_ID} (got {_short(v)})")
            return v

        def listed(v: Any, where: str, limit: int) -> list:
            if not isinstance(v, list):
                raise PlanFormatError(f"plan: field '{where}' must be a list (got {type(v).__name__})")
            if len(v) > limit:
                raise PlanFormatError(f"plan: field '{where}' has {len(v)} entries > {limit}; not a plan this build runs")
            return v

        if not isinstance(data, dict):
            raise PlanFormatError(f"plan: the file must hold a JSON object with 'format': 'routeplan' (got "
                                  f"{type(data).__name__})")
        if data.get("format") != "routeplan":
            raise PlanFormatError("plan: field 'format' must be 'routeplan' (is this a RoutePlan JSON file?)")
        version = need(data, "version", "")
        if version != PLAN_FORMAT_VERSION or isinstance(version, bool):
            raise PlanFormatError(
                f"plan: field 'version' is {_short(version)}; this build reads version {PLAN_FORMAT_VERSION}"
            )
        layout = need(data, "layout", "")
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise PlanFormatError(f"plan: field 'layout' is {_short(layout)}; use one of {LAYOUTS}")
        stage_nodes = [[integer(n, f"stage_nodes[{s}][{r}]") for r, n in
                        enumerate(listed(g, f"stage_nodes[{s}]", MAX_NODES))]
                       for s, g in enumerate(listed(need(data, "stage_nodes", ""), "stage_nodes", MAX_STAGES))]
        routes = []
        for i, mb in enumerate(listed(need(data, "microbatches", ""), "microbatches", MAX_MICROBATCHES)):
            w = f"microbatches[{i}]."
            home = need(mb, "home", w)
            hops = tuple(
                Hop(integer(need(h, "stage", f"{w}hops[{j}]."), f"{w}hops[{j}].stage"),
                    integer(need(h, "replica", f"{w}hops[{j}]."), f"{w}hops[{j}].replica"),
                    integer(need(h, "node", f"{w}hops[{j}]."), f"{w}hops[{j}].node"))
                for j, h in enumerate(listed(need(mb, "hops", w), f"{w}hops", MAX_STAGES))
            )
            routes.append(MicrobatchRoute(integer(need(mb, "id", w), f"{w}id"),
                                          integer(need(home, "replica", f"{w}home."), f"{w}home.replica"),
                                          integer(need(home, "node", f"{w}home."), f"{w}home.node"), hops))
        node_order = None
        raw_order = data.get("node_order")
        if raw_order is not None:
            if not isinstance(raw_order, dict):
                raise PlanFormatError("plan: field 'node_order' must map node ids to [[microbatch, 'F'|'B'], ...]")
            node_order = {}
            for n, order in raw_order.items():
                where = f"node_order[{str(n)[:40]}]"
                try:
                    node = int(n)
                except (TypeError, ValueError):
                    raise PlanFormatError(f"plan: field '{where}': node ids are integers") from None
                items = []
                for k, item in enumerate(listed(order, where, 2 * MAX_MICROBATCHES)):
                    if not (isinstance(item, list) and len(item) == 2 and item[1] in ("F", "B")):
                        raise PlanFormatError(f"plan: field '{where}[{k}]' must be [microbatch id, 'F' or 'B']")
                    items.append((integer(item[0], f"{where}[{k}][0]"), item[1]))
                node_order[node] = items
        memory = data.get("memory")
        if memory is not None:
            memory = integer(memory, "memory", lo=1)
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanFormatError("plan: field 'meta' must be an object (or omitted)")
        return cls(stage_nodes=stage_nodes, routes=routes,
                   path_length=integer(need(data, "path_length", ""), "path_length", lo=1),
                   layout=layout, memory=memory, node_order=node_order, meta=dict(meta))

    @classmethod
    def from_json(cls, text: str) -> "RoutePlan":
        if len(text) > MAX_TEXT:
            raise PlanFormatError(f"plan: {len(text)} characters > {MAX_TEXT}; not a plan file")
        try:
            data = json.loads(text)
        except RecursionError:
            raise PlanFormatError("plan: nested too deeply to be a RoutePlan") from None
        except ValueError as exc:
            raise PlanFormatError(f"plan: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except RecursionError:
            raise PlanFormatError("plan: nested too deeply to be a RoutePlan") from None

    @classmethod
    def load(cls, path: str | Path) -> "RoutePlan":
        return cls.from_json(read_bounded_text(path, MAX_TEXT, PlanFormatError, "plan file"))


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


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


def route_slots(memory: int, microbatches_per_home: int) -> int | None:
    """Distinct routes per home under TC1 (``min(memory, m)``), or ``None`` when the home's ``m``
    microbatches cannot use them equally (CC5 needs every slot used the same number of times)."""
    slots = min(memory, microbatches_per_home)
    return None if microbatches_per_home % slots else slots
