"""Framework-free planning: RoutePlan, the SkipPipe rules, plan builders (no torch import)."""

from .builders import (build_plan, checkfree_plus, checkfree_plus_order, full_pipeline, oblivious_skip,
                       path_length_for_ratio)
from .routeplan import (PLAN_FORMAT_VERSION, Hop, MicrobatchRoute, PlanFormatError, RoutePlan, grid_stage_nodes,
                        make_route)
from .rules import PlanValidationError, Rules, Violation, check, validate

__all__ = [
    "PLAN_FORMAT_VERSION", "Hop", "MicrobatchRoute", "PlanFormatError", "RoutePlan", "grid_stage_nodes",
    "make_route", "Rules", "Violation", "PlanValidationError", "validate", "check", "build_plan",
    "full_pipeline", "checkfree_plus", "checkfree_plus_order", "oblivious_skip", "path_length_for_ratio",
]
