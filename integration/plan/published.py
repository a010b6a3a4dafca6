"""SkipPipe's published 20-node plans as RoutePlans, to replay them in our simulator.

Their committed paths are forward next-hop maps from a home (stage-0) node; the return home is
implicit. Collision-aware and no-TC2 plans give each home node one path per route slot (all 6
microbatches of a home on its one path when only one is listed), admitted ``memory`` at a time.
Their full-pipeline baseline runs 3 columns x 9 microbatches through the partition and leaves
two home nodes idle (``full_pipeline_27``); ours runs every home, 6 microbatches each, with the
body replicas shared by column (``builders.full_pipeline``).
"""

from __future__ import annotations

from typing import Any

from .builders import full_pipeline
from .cluster import load_committed_setting
from .routeplan import RoutePlan, make_route

PUBLISHED = ("skippipe_collision_aware", "skippipe_no_tc2", "random_paths")
MICROBATCHES_PER_HOME = 6
PATH_LENGTH = 4


def _setting(setting: dict[str, Any] | None) -> dict[str, Any]:
    return setting if setting is not None else load_committed_setting()


def published_plan(name: str, setting: dict[str, Any] | None = None) -> RoutePlan:
    """Their committed paths ``name`` (one of :data:`PUBLISHED`) on their partition."""
    d = _setting(setting)
    if name not in d["published_paths"]:
        raise KeyError(f"published plan {name!r}: use one of {sorted(d['published_paths'])}")
    sn = [list(g) for g in d["partition"]]
    where = {n: (s, r) for s, g in enumerate(sn) for r, n in enumerate(g)}
    by_home: dict[int, list[list[int]]] = {}
    raw = d["published_paths"][name]
    for key in sorted(raw, key=int):
        nxt = {int(a): int(b) for a, b in raw[key].items()}
        home = next(n for n in nxt if where[n][0] == 0)
        nodes, cur = [], home
        while cur in nxt and len(nodes) < len(sn):
            cur = nxt[cur]
            nodes.append(cur)
        by_home.setdefault(home, []).append(nodes)
    m = MICROBATCHES_PER_HOME
    routes = []
    for hr, home in enumerate(sn[0]):
        paths = by_home.get(home, [])
        for j in range(m if paths else 0):
            # Microbatch j rides route slot j % slots, like the simulator's injection rule.
            routes.append(make_route(hr * m + j, sn, hr, [where[n] for n in paths[j % len(paths)]]))
    return RoutePlan(stage_nodes=sn, routes=routes, path_length=PATH_LENGTH, memory=int(d["memory"]),
                     meta={"builder": f"published:{name}"})


def full_pipeline_27(setting: dict[str, Any] | None = None) -> RoutePlan:
    """Their baseline: 3 columns (home replicas 0-2) x 9 microbatches along the partition's columns."""
    d = _setting(setting)
    cols = min(len(g) for g in d["partition"])
    sn = [list(g[:cols]) for g in d["partition"]]
    plan = full_pipeline(sn, 9)
    plan.memory = int(d["memory"])
    plan.meta["builder"] = "published:full_pipeline_27"
    return plan


def full_pipeline_30(setting: dict[str, Any] | None = None) -> RoutePlan:
    """Our baseline on their partition: every home, 6 microbatches, body replica = home replica mod 3."""
    d = _setting(setting)
    plan = full_pipeline([list(g) for g in d["partition"]], MICROBATCHES_PER_HOME)
    plan.memory = int(d["memory"])
    return plan


__all__ = ["PUBLISHED", "published_plan", "full_pipeline_27", "full_pipeline_30"]
