"""A pipeline job's rank grid: (stage, data replica, tensor rank) <-> global rank, and plan nodes.

A plan node is a whole tensor-parallel group: **plan node id = the global rank of its tensor-rank-0
member** (``stage_nodes[s][r]`` = rank of (s, r, t=0)). Every TP peer runs the same program as its
node, with each peer node translated to the member of the same tensor rank, so TP peers exchange
activations pairwise (t <-> t) and their TP collectives stay in step. With T = 1 the node id is the
rank itself. Both backends use it: megatron reads it from ``parallel_state``
(integration/backends/megatron/layout.py), DeepSpeed from its topology
(integration/backends/deepspeed/engine.py:node_grid).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .program import Op


@dataclass(frozen=True)
class ParallelGrid:
    """Who is who in a job: (stage, replica, tensor rank) <-> global rank."""

    rank_of: dict[tuple[int, int, int], int]  # (pp stage, dp replica, tp rank) -> global rank
    num_stages: int
    replicas: int
    tensor: int

    @property
    def stage_nodes(self) -> list[list[int]]:
        """The plan's ``stage_nodes`` for this job: tensor-rank-0 ranks, [stage][replica]."""
        return [[self.rank_of[(s, r, 0)] for r in range(self.replicas)] for s in range(self.num_stages)]

    def coords(self, rank: int) -> tuple[int, int, int]:
        for c, r in self.rank_of.items():
            if r == rank:
                return c
        raise KeyError(f"rank {rank} is not in the grid")

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
