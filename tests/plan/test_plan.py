"""RoutePlan JSON form, the SkipPipe rules (each with a failing example) and the plan builders."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from integration.plan import (Hop, MicrobatchRoute, PlanFormatError, RoutePlan, Rules, checkfree_plus,
                              checkfree_plus_order, full_pipeline, grid_stage_nodes, make_route, oblivious_skip,
                              validate)
from integration.plan.builders import build_plan, path_length_for_ratio


def plan_of(orders, S, layout="ring", L=None, memory=None, node_order=None):
    """A one-replica plan whose microbatch i visits body stages orders[i]."""
    sn = grid_stage_nodes(S, 1)
    routes = [make_route(i, sn, 0, [(s, 0) for s in o]) for i, o in enumerate(orders)]
    return RoutePlan(stage_nodes=sn, routes=routes, path_length=L or (len(orders[0]) + 1), layout=layout,
                     memory=memory, node_order=node_order)


def rules_hit(plan, rules=None):
    return {(v.rule, v.microbatch) for v in validate(plan, rules)}


def test_json_round_trip_and_version():
    plan = oblivious_skip(grid_stage_nodes(6, [5, 3, 3, 3, 3, 3]), 6, 4, seed=3, memory=3, swap_prob=0.5)
    plan.node_order = {0: [(0, "F"), (0, "B")]}
    again = RoutePlan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert again.routes == plan.routes
    data = json.loads(plan.to_json())
    data["version"] = 99
    with pytest.raises(PlanFormatError, match="version"):
        RoutePlan.from_dict(data)
    del data["version"]
    with pytest.raises(PlanFormatError, match="'version'"):
        RoutePlan.from_dict(data)
    with pytest.raises(PlanFormatError, match="format"):
        RoutePlan.from_dict({"microbatches": []})


def test_cc1_home_and_stage_zero():
    sn = grid_stage_nodes(4, 1)
    bad_home = MicrobatchRoute(0, 0, 2, (Hop(1, 0, 1), Hop(2, 0, 2), Hop(3, 0, 3)))
    stage0_hop = MicrobatchRoute(1, 0, 0, (Hop(1, 0, 1), Hop(0, 0, 0), Hop(3, 0, 3)))
    wrong_node = MicrobatchRoute(2, 0, 0, (Hop(1, 0, 2), Hop(2, 0, 2), Hop(3, 0, 3)))
    plan = RoutePlan(sn, [bad_home, stage0_hop, wrong_node], path_length=4)
    hits = rules_hit(plan, Rules(equal_visits=False))
    assert ("CC1", 0) in hits and ("CC1", 1) in hits and ("CC1", 2) in hits
    msgs = [str(v) for v in validate(plan, Rules(equal_visits=False))]
    assert any("microbatch 1" in m and "stage 0 (home)" in m for m in msgs)


def test_cc2_length_and_repeats():
    plan = plan_of([[1, 2, 3], [1, 2], [1, 1, 3]], 4, L=4)
    hits = rules_hit(plan, Rules(equal_visits=False))
    assert ("CC2", 1) in hits  # too short
    assert ("CC2", 2) in hits  # stage 1 twice
    assert ("CC2", 0) not in hits


def test_cc3_swap_distance_and_count():
    # body order [3,1,2]: stage 1 after reaching 3 is a swap of distance 2
    plan = plan_of([[3, 1, 2]], 4)
    v = [x for x in validate(plan, Rules(equal_visits=False)) if x.rule == "CC3"]
    assert v and v[0].microbatch == 0 and "distance 2" in str(v[0])
    # three adjacent swaps in one route
    plan = plan_of([[2, 1, 4, 3, 6, 5]], 7)
    v = [x for x in validate(plan, Rules(equal_visits=False)) if x.rule == "CC3"]
    assert any("3 swaps" in str(x) for x in v)
    # two swaps are fine
    assert not [x for x in validate(plan_of([[2, 1, 3, 5, 4]], 6), Rules(equal_visits=False)) if x.rule == "CC3"]


def test_cc4_jump_limit():
    plan = plan_of([[6, 7]], 8, L=3)
    v = [x for x in validate(plan, Rules(equal_visits=False)) if x.rule == "CC4"]
    assert v and v[0].microbatch == 0 and "skips 5" in str(v[0])
    assert not [x for x in validate(plan_of([[5, 7]], 8, L=3), Rules(equal_visits=False)) if x.rule == "CC4"]


def test_cc5_equal_visits():
    plan = plan_of([[1, 2], [1, 3], [1, 2]], 4, L=3)
    v = [x for x in validate(plan) if x.rule == "CC5"]
    assert v and "stage 1: 3" in str(v[0])


def test_tc1_memory_and_node_order():
    plan = plan_of([[1, 2], [2, 3], [1, 3]], 4, L=3)
    assert not rules_hit(plan)
    v = [x for x in validate(plan, Rules(memory=2)) if x.rule == "TC1"]
    assert v and v[0].node == 0 and "3 distinct routes" in str(v[0])
    order = {0: [(0, "F"), (1, "F"), (2, "F"), (0, "B"), (1, "B"), (2, "B")]}
    plan.node_order = order
    v = [x for x in validate(plan, Rules(memory=2)) if x.rule == "TC1"]
    assert any("3 live activations" in str(x) for x in v)
    plan.node_order = {0: [(0, "B"), (0, "F")]}
    assert any(x.rule == "ORDER" for x in validate(plan))


def test_linear_layout_must_end_on_last_stage():
    plan = plan_of([[1, 2], [2, 3]], 4, layout="linear", L=3)
    v = [x for x in validate(plan) if x.rule == "LAYOUT"]
    assert [x.microbatch for x in v] == [0]


def test_full_pipeline_builder_uses_columns():
    plan = full_pipeline(grid_stage_nodes(4, 2), 3)
    assert not validate(plan)
    assert plan.num_microbatches == 6 and plan.stage_visits() == [6, 6, 6, 6]
    assert all(h.replica == r.home_replica for r in plan.routes for h in r.hops)
    assert plan.skip_ratio == 0 and plan.achieved_skip_ratio() == 0


@pytest.mark.parametrize("L", [4, 5, 6, 9])
def test_checkfree_plus_order_any_L(L):
    assert checkfree_plus_order(L, False) == list(range(1, L + 1))
    order = checkfree_plus_order(L, True)
    assert order[:2] == [2, 1] and order[-2:] == [L, L - 1] and order[2:-2] == list(range(3, L - 1))
    plan = checkfree_plus(grid_stage_nodes(L + 1, 2), 4)
    assert not validate(plan)
    assert [r.body_stages == tuple(order) for r in plan.routes] == [False, True] * 4


def test_checkfree_plus_errors():
    with pytest.raises(ValueError, match="at least 4 body stages"):
        checkfree_plus(grid_stage_nodes(4, 1), 4)
    with pytest.raises(ValueError, match="even microbatch count"):
        checkfree_plus(grid_stage_nodes(6, 1), 3)


@settings(max_examples=60, deadline=None)
@given(S=st.integers(3, 9), homes=st.integers(1, 4), body_reps=st.integers(1, 3), seed=st.integers(0, 10 ** 6),
       swap=st.sampled_from([0.0, 0.5, 1.0]), layout=st.sampled_from(["ring", "linear"]), data=st.data())
def test_oblivious_skip_satisfies_every_rule(S, homes, body_reps, seed, swap, layout, data):
    L = data.draw(st.integers(2 if layout == "ring" else 3, S))
    free = S - 1 if layout == "ring" else S - 2
    per_route = L - 1 if layout == "ring" else L - 2
    m = data.draw(st.integers(1, 6))
    sn = grid_stage_nodes(S, [homes] + [body_reps] * (S - 1))
    if free and (homes * m * per_route) % free:
        with pytest.raises(ValueError, match="CC5"):
            oblivious_skip(sn, m, L, seed=seed, swap_prob=swap, layout=layout)
        return
    try:
        plan = oblivious_skip(sn, m, L, seed=seed, swap_prob=swap, layout=layout)
    except ValueError as exc:
        # CC4 (a jump skips at most 4 stages) can only bind with more than 6 stages.
        assert "CC4" in str(exc) and S > 6, exc
        return
    assert validate(plan) == []
    again = oblivious_skip(sn, m, L, seed=seed, swap_prob=swap, layout=layout)
    assert again.routes == plan.routes  # seeded and reproducible
    loads = plan.node_visits()
    for s in range(1, S if layout == "ring" else S - 1):
        per_rep = [loads[n] for n in sn[s]]
        assert max(per_rep) - min(per_rep) <= 1  # replicas balanced


def test_oblivious_skip_respects_jump_limit_with_many_stages():
    for layout, L in (("ring", 3), ("ring", 4), ("linear", 4)):
        plan = oblivious_skip(grid_stage_nodes(10, 1), 9 if layout == "ring" else 8, L, seed=1, swap_prob=1.0,
                              layout=layout)
        assert validate(plan) == [], layout
    with pytest.raises(ValueError, match="CC4"):
        oblivious_skip(grid_stage_nodes(8, 1), 6, 3, layout="linear")  # stages 1 and 6 unreachable within 4


def test_oblivious_skip_memory_slots():
    sn = grid_stage_nodes(6, [5, 3, 3, 3, 3, 3])
    plan = oblivious_skip(sn, 6, 4, seed=0, memory=3)
    assert validate(plan) == [] and plan.stage_visits()[1:] == [18] * 5
    with pytest.raises(ValueError, match="multiple of memory"):
        oblivious_skip(sn, 5, 4, memory=3)


def test_build_plan_dispatch_and_ratio():
    sn = grid_stage_nodes(6, 1)
    assert path_length_for_ratio(6, 0.33) == 4 and path_length_for_ratio(4, 0.25) == 3
    assert build_plan("skip", sn, 10, skip_ratio=0.33).path_length == 4
    with pytest.raises(ValueError, match="routing.kind"):
        build_plan("zigzag", sn, 6)
    with pytest.raises(ValueError, match="model.layout=ring"):
        build_plan("checkfree_plus", sn, 6, layout="linear")
