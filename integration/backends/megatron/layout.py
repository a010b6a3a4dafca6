"""Map megatron's rank grid onto RoutePlan nodes, and refuse plans that do not fit it.

megatron-core orders ranks ``tp-cp-ep-dp-pp`` by default (tensor fastest, pipeline slowest):
global rank = t + T*(r + D*s) for pipeline stage s, data replica r, tensor rank t. The grid is
read from ``parallel_state`` (all-gathered), not recomputed, so another order also works.

A plan node is a whole tensor-parallel group: **plan node id = the global rank of its
tensor-rank-0 member** (``stage_nodes[s][r]`` = rank of (s, r, t=0)). Every TP peer runs the
same program as its node, with each peer node translated to the member of the same tensor rank,
so TP peers exchange activations pairwise (t <-> t) and their TP collectives stay in step.
With T = 1 the node id is the rank itself and ``stage_nodes == grid_stage_nodes(S, D)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist

from ...plan.routeplan import RoutePlan
from ...plan.rules import Rules, check_fits_grid
from ...runtime.program import Op


@dataclass(frozen=True)
class MegatronGrid:
    """Who is who in a megatron job: (stage, replica, tensor rank) <-> global rank."""

    rank_of: dict[tuple[int, int, int], int]  # (pp stage, dp replica, tp rank) -> global rank
    num_stages: int
    replicas: int
    tensor: int

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

    @property
    def stage_nodes(self) -> list[list[int]]:
        """The plan's ``stage_nodes`` for this job: tensor-rank-0 ranks, [stage][replica]."""
        return [[self.rank_of[(s, r, 0)] for r in range(self.replicas)] for s in range(self.num_stages)]

    def coords(self, rank: int) -> tuple[int, int, int]:
        for c, r in self.rank_of.items():
            if r == rank:
                return c
        raise KeyError(f"rank {rank} is not in the megatron grid")

    def node_of(self, rank: int) -> int:
        """Plan node id of ``rank`` (its TP group's tensor-rank-0 member)."""
        s, r, _ = self.coords(rank)
        return self.rank_of[(s, r, 0)]

    def peer_rank(self, node: int, tensor_rank: int) -> int:
        """The member of plan node ``node`` with tensor rank ``tensor_rank``."""
        s, r, _ = self.coords(node)
        return self.rank_of[(s, r, tensor_rank)]

    def ops_for_rank(self, ops_of_node: list[Op], rank: int) -> list[Op]:
        """Translate a node's program to one of its TP members (peers -> same tensor rank)."""
        t = self.coords(rank)[2]
        if t == 0:
            return list(ops_of_node)
        return [dataclasses.replace(op, peer=self.peer_rank(op.peer, t)) if op.peer is not None else op
                for op in ops_of_node]


def check_plan_fits(plan: RoutePlan, grid: MegatronGrid, num_microbatches: int, rules: Rules | None = None) -> None:
    """Refuse a plan that does not fit the megatron layout, with a message naming the mismatch."""
    check_fits_grid(plan, grid.stage_nodes, num_microbatches, rules, "megatron",
                    f"stage s, replica r -> global rank of tensor rank 0; TP={grid.tensor}, DP={grid.replicas}; "
                    f"build the plan on integration.backends.megatron.MegatronGrid.stage_nodes",
                    "the schedule is called with num_microbatches")

