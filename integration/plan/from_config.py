"""Build the iteration's RoutePlan from the main job's ``routing`` config group (no torch)."""

from __future__ import annotations

from typing import Any, Sequence

from .builders import build_plan, path_length_for_ratio
from .routeplan import PlanFormatError, RoutePlan


def plan_from_config(routing: Any, stage_nodes: Sequence[Sequence[int]], microbatches_per_home: int, layout: str,
                     cluster: Any = None, step: int = 0) -> RoutePlan:
    """The plan for ``step`` (plans are redrawn every ``routing.resample_every`` steps when set)."""
    kind = routing.kind
    if kind == "file":
        path = routing.get("path")
        if not path or not isinstance(path, str):
            raise PlanFormatError("routing.path: routing=file needs the plan file, e.g. routing.path=out/plan.json "
                                  "(write one with python -m integration.plan plan --out out)")
        plan = RoutePlan.load(path)
        if plan.layout != layout:
            raise ValueError(f"routing.path: the plan file is for layout {plan.layout!r} but model.layout is "
                             f"{layout!r}")
        return plan
    if kind == "planned":
        from .planner import plan_for_training  # the planner is only imported when asked for

        S = len(stage_nodes)
        L = routing.get("path_length") or path_length_for_ratio(S, float(routing.skip_ratio))
        if layout != "ring":
            raise ValueError("routing=planned plans home-stage rings: set model.layout=ring")
        name_or_path = cluster.get("path") or cluster.name
        return plan_for_training(name_or_path, [list(s) for s in stage_nodes], int(L), routing.get("memory"),
                                 microbatches_per_home, int(routing.get("seed", 0)))
    seed = int(routing.get("seed", 0))
    every = int(routing.get("resample_every", 0) or 0)
    if every > 0:
        seed += step // every
    return build_plan(kind, stage_nodes, microbatches_per_home, layout=layout,
                      path_length=routing.get("path_length"), skip_ratio=routing.get("skip_ratio"), seed=seed,
                      swap_prob=float(routing.get("swap_prob", 0.0)), memory=routing.get("memory"))
