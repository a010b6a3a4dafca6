"""Audit of the floors printed beside plans (docs/planner.md, "Floor on SkipPipe's partition").

References independent of the code under test: the validator's own CC3/CC4 check for the route
set, and an exact branch and bound without CP-SAT or rounding (``floor_reference``) for
``linked.home_bound``."""

from itertools import permutations

import pytest

from integration.plan.cluster import load_cluster
from integration.plan.linked import candidates, home_bound
from integration.plan.orders import all_orders
from integration.plan.routeplan import RoutePlan, make_route
from integration.plan.rules import Rules, validate
from tests.plan.floor_reference import exact_home_optimum


def test_route_enumeration_is_every_route_the_validator_accepts():
    """The floor ranges over all_orders; the validator must accept exactly those (S = 6, L = 4)."""
    sn = [[0], [1], [2], [3], [4], [5]]
    accepted = []
    for body in permutations(range(1, 6), 3):
        plan = RoutePlan(stage_nodes=sn, routes=[make_route(0, sn, 0, [(s, 0) for s in body])], path_length=4,
                         layout="ring", memory=None)
        if not [v for v in validate(plan, Rules(equal_visits=False)) if v.rule in ("CC2", "CC3", "CC4")]:
            accepted.append(body)
    assert sorted(accepted) == sorted(all_orders(6, 3, Rules()))


@pytest.mark.parametrize("m,memory,k", [(4, 2, 3), (6, 3, 6)])
def test_home_bound_matches_an_exact_branch_and_bound(m, memory, k):
    """Home 11 (Australia) on their partition: the unrounded optimum over its k shortest routes,
    found without CP-SAT, is at most a few ms above home_bound (which rounds every time down) and
    never below it; with the threshold for longer routes it gives the same floor."""
    c = load_cluster("skippipe-20")
    C, w = c.cost_matrix(), list(c.stage_times())
    sn = [list(g) for g in c.partition]
    cs = candidates(sn, 11, C, w, 4, Rules())
    slots = min(memory, m)
    exact = exact_home_optimum(11, [x.nodes for x in cs[:k]], C.tolist(), w, m, slots, 0.1)
    longer = cs[k].round_trip_s + (m // slots - 1) * (cs[0].round_trip_s + 0.1)
    floor = min(exact, longer)
    hb = home_bound(sn, C, w, memory, m, 4, Rules(), 0.1, 11)
    assert hb <= floor + 1e-9
    assert floor - hb <= 0.02
    if (m, memory) == (6, 3):
        assert floor == pytest.approx(32.9838, abs=1e-3)  # = our plan's simulated time on their partition


def test_a_valid_plan_may_leave_a_slow_body_node_unvisited():
    """Why lower_bound's every-body-node term is not printed: with Australia in a body stage, one
    route per home and one body node shared by two homes, a valid plan never visits it and ends
    below that term, but not below the printed (sound) bound."""
    from integration.plan.linked import choose_one_route_per_home, lower_bound, schedule_routes, tight_lower_bound
    from integration.plan.simulator import simulate
    c = load_cluster("skippipe-20")
    C, w = c.cost_matrix(), c.stage_times()
    sn = [[18, 0, 13, 7, 9], [8, 10, 3], [12, 15, 11], [5, 4, 14], [2, 16, 17], [19, 1, 6]]
    cap = {n: 3 for g in sn[1:] for n in g}
    routes = choose_one_route_per_home(sn, C, w, 3, 6, 4, cap, 0.1, Rules(), shared=1)
    assert 11 not in {n for r in routes for n in r}
    plan, _ = schedule_routes(sn, routes, C, w, 3, 6, 4, 0.1, deterministic_time=1.0)
    assert validate(plan, Rules(memory=3)) == []
    t = simulate(plan, c).iteration_s
    assert t < lower_bound(sn, C, w, 3, 6, 4, Rules(), 0.1, every_body_node_carries_slots=True)
    assert t >= tight_lower_bound(sn, C, w, 3, 6, 4, Rules(), 0.1, homes=1, deterministic_time=1.0) - 1e-9
