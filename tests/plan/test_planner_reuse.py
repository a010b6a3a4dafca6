"""Planner work reuse: warm-started CP-SAT schedules, memoised candidates, deterministic plans."""

import pytest

from integration.plan.cluster import load_cluster
from integration.plan.linked import candidates, choose_one_route_per_home, schedule_routes
from integration.plan.planner import plan_routes
from integration.plan.rules import Rules, validate


def _setting():
    c = load_cluster("skippipe-20")
    sn = [[18, 0, 13, 7, 9], [8, 10, 3], [12, 15, 11], [5, 4, 14], [2, 16, 17], [19, 1, 6]]
    cap = {n: 3 for g in sn[1:] for n in g}
    routes = choose_one_route_per_home(sn, c.cost_matrix(), c.stage_times(), 3, 6, 4, cap, 0.1, Rules(), shared=1,
                                        max_nodes=100_000)
    return c, sn, routes


def test_warm_started_schedule_is_no_worse_and_deterministic():
    c, sn, routes = _setting()
    C, w = c.cost_matrix(), c.stage_times()
    runs = []
    for _ in range(2):
        warm: dict = {}
        first = schedule_routes(sn, routes, C, w, 3, 6, 4, 0.1, deterministic_time=0.1, warm=warm)
        assert first is not None and len(warm) == 1
        second = schedule_routes(sn, routes, C, w, 3, 6, 4, 0.1, deterministic_time=5.0, seed=1, warm=warm,
                                 warm_time=0.1)
        assert second is not None and validate(second[0], Rules(memory=3)) == []
        assert second[1] <= first[1] + 1e-9  # continues from the stored schedule
        runs.append((first[0].to_json(), second[0].to_json(), second[1]))
    assert runs[0] == runs[1]


def test_candidates_memo_returns_fresh_equal_lists():
    c, sn, _ = _setting()
    a = candidates(sn, 18, c.cost_matrix(), c.stage_times(), 4, Rules())
    a.clear()  # a caller's list: the memo keeps its own
    b = candidates(sn, 18, c.cost_matrix(), c.stage_times(), 4, Rules())
    assert b and b == candidates(sn, 18, c.cost_matrix(), c.stage_times(), 4, Rules())
    assert all(x.round_trip_s <= y.round_trip_s for x, y in zip(b, b[1:]))


@pytest.mark.slow
def test_placement_search_plan_is_the_same_when_planned_again():
    # Every rank plans for itself: a second plan in the same process (memo warm) is the same plan.
    c = load_cluster("skippipe-20")
    a = plan_routes(c, stage_sizes=[5, 3, 3, 3, 3, 3], seed=1)
    b = plan_routes(c, stage_sizes=[5, 3, 3, 3, 3, 3], seed=1)
    assert a.stage_nodes == b.stage_nodes and a.plan.to_json() == b.plan.to_json()
