"""Body-stage orders allowed by the swap and jump rules (CC3/CC4), shared by every planner module.

Kept apart from :mod:`.planner` so that the solvers (:mod:`.exact`, :mod:`.linked`) and the
search planner all import it without importing each other.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

from .rules import Rules


def order_ok(body: Sequence[int], rules: Rules) -> bool:
    """Whether a body-stage order keeps CC3 (swap limits) and CC4 (jump limit)."""
    f, swaps, total = 0, 0, 0
    for s in body:
        if s < f:
            if f - s > rules.max_swap_distance:
                return False
            swaps += 1
            total += f - s
        else:
            if s - f - 1 > rules.max_jump:
                return False
            f = s
    return swaps <= rules.max_swaps and total <= rules.max_swap_total


_ORDERS: dict[tuple, list[tuple[int, ...]]] = {}


def valid_orders(stages: Sequence[int], rules: Rules = Rules()) -> list[tuple[int, ...]]:
    """Orders of a stage set allowed by CC3/CC4: the sorted order with up to ``max_swaps`` disjoint
    swaps of neighbouring consecutive stages (a distance-1 swap each)."""
    key = (tuple(sorted(stages)), rules.max_swaps, rules.max_swap_distance, rules.max_swap_total, rules.max_jump)
    if key in _ORDERS:
        return _ORDERS[key]
    base = list(key[0])
    cand = [i for i in range(len(base) - 1) if base[i + 1] == base[i] + 1]
    out = []
    for k in range(0, rules.max_swaps + 1):
        for pos in combinations(cand, k):
            if any(b - a < 2 for a, b in zip(pos, pos[1:])):
                continue
            o = list(base)
            for i in pos:
                o[i], o[i + 1] = o[i + 1], o[i]
            if order_ok(o, rules):
                out.append(tuple(o))
    _ORDERS[key] = out
    return out


def all_orders(num_stages: int, hops: int, rules: Rules) -> list[tuple[int, ...]]:
    """Every CC3/CC4-valid body order of ``hops`` distinct stages out of 1..num_stages-1."""
    out: list[tuple[int, ...]] = []
    for st in combinations(range(1, num_stages), hops):
        out.extend(valid_orders(st, rules))
    return out


__all__ = ["order_ok", "valid_orders", "all_orders"]
