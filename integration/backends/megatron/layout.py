"""Map megatron's rank grid onto RoutePlan nodes, and refuse plans that do not fit it.

megatron-core orders ranks ``tp-cp-ep-dp-pp`` by default (tensor fastest, pipeline slowest):
global rank = t + T*(r + D*s) for pipeline stage s, data replica r, tensor rank t. The grid is
read from ``parallel_state`` (all-gathered), not recomputed, so another order also works.

A plan node is a whole tensor-parallel group (integration/runtime/grid.py: the node id is the rank
of its tensor-rank-0 member). With T = 1 the node id is the rank itself and
``stage_nodes == grid_stage_nodes(S, D)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ...plan.routeplan import RoutePlan
from ...plan.rules import Rules, check_fits_grid
from ...runtime.grid import ParallelGrid


@dataclass(frozen=True)
class MegatronGrid(ParallelGrid):
    """The grid of a megatron job, read from ``parallel_state``."""

    @classmethod
    def from_parallel_state(cls) -> "MegatronGrid":
        """All-gather every rank's (pipeline, data, tensor) coordinates (collective over WORLD)."""
        from megatron.core import parallel_state as ps

        mine = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
                ps.get_tensor_model_parallel_rank())
        coords: list = [None] * dist.get_world_size()
        dist.all_gather_object(coords, mine)
        return cls({tuple(c): r for r, c in enumerate(coords)}, ps.get_pipeline_model_parallel_world_size(),
                   ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_world_size())


def check_plan_fits(plan: RoutePlan, grid: MegatronGrid, num_microbatches: int, rules: Rules | None = None) -> None:
    """Refuse a plan that does not fit the megatron layout, with a message naming the mismatch."""
    check_fits_grid(plan, grid.stage_nodes, num_microbatches, rules, "megatron",
                    f"stage s, replica r -> global rank of tensor rank 0; TP={grid.tensor}, DP={grid.replicas}; "
                    f"build the plan on integration.backends.megatron.MegatronGrid.stage_nodes",
                    "the schedule is called with num_microbatches")

