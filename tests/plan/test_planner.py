"""Planner: the geo-12 acceptance numbers, validity on random inputs, TC2 timelines, bad input."""

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integration.plan import RoutePlan, grid_stage_nodes, validate
from integration.plan.cli import main as cli_main
from integration.plan.cluster import synthetic_cluster
from integration.plan.placement import (LayoutError, anneal_placement, derive_stage_sizes, genetic_placement,
                                        placement_score)
from integration.plan.planner import Effort, compare_variants, plan_for_training, plan_routes, valid_orders
from integration.plan.rules import Rules
from integration.plan.builders import full_pipeline
from integration.plan.cluster import load_cluster
from integration.plan.exact import applicable
from integration.plan.simulator import compute_lower_bound, simulate

QUICK = Effort(placement_evals=200, static_iters=2000, sim_evals=60)
PAPER = dict(num_stages=6, path_length=4, memory=3, microbatches_per_home=6)


def _forward_overlap(ops):
    fwd = {}
    for o in ops:
        if o.phase == "F":
            fwd.setdefault(o.node, []).append((o.start, o.end))
    return any(b[0] < a[1] - 1e-9 for lst in fwd.values() for a, b in zip(sorted(lst), sorted(lst)[1:]))


def test_geo12_beats_full_pipeline_by_the_paper_margin():
    # Speed is measured by benchmarks/planner_bench.py (goal 10 s); CPU seconds differ by 2-3x between
    # machines of this class, so the test only guards against a runaway search.
    t = time.process_time()
    rows, ours = compare_variants("geo-12", stage_sizes=[5, 3, 3, 3, 3, 3], **PAPER)
    assert time.process_time() - t <= 60
    full = rows[0].paper_s
    assert ours.predicted_paper_s <= 0.40 * full
    assert validate(ours.plan) == []
    assert ours.predicted_paper_s <= rows[2].paper_s + 1e-9  # TC2 never loses to its own start point
    sim = simulate(ours.plan, "geo-12")
    assert sim.iteration_s == pytest.approx(ours.predicted_paper_s)
    assert not _forward_overlap(sim.ops)


@pytest.mark.parametrize("name,bound", [("5-clusters", 0.40), ("single-cluster", 0.40)])
def test_other_profiles(name, bound):
    # single-cluster: every link is equal, the floor is 0.398x (docs/planner.md); the CP-SAT path reaches it.
    t = time.process_time()
    rows, ours = compare_variants(name, effort=Effort(sim_evals=800), **PAPER)
    assert time.process_time() - t <= 60  # a guard only (see above)
    assert validate(ours.plan) == []
    assert ours.predicted_paper_s <= bound * rows[0].paper_s
    assert all(validate(r.plan, Rules(memory=None if r.name.startswith("full") else 3)) == [] for r in rows)


@pytest.mark.slow
def test_synthetic_100_nodes_8_stages():
    t = time.process_time()
    rows, ours = compare_variants("synthetic-100", num_stages=8, path_length=6, memory=3, microbatches_per_home=6,
                                  effort=Effort(placement_evals=1000, sim_evals=1000))
    assert time.process_time() - t <= 60  # CPU time: planner + baselines, single-threaded
    assert validate(ours.plan) == []
    assert ours.predicted_paper_s < rows[0].paper_s


def test_fixed_grid_for_training_is_deterministic():
    grid = grid_stage_nodes(6, [5, 3, 3, 3, 3, 3])
    a = plan_for_training("geo-12", grid, 4, 3, 6, seed=1, effort=QUICK)
    b = plan_for_training("geo-12", grid, 4, 3, 6, seed=1, effort=QUICK)
    assert a.stage_nodes == grid
    assert a.to_json() == b.to_json()
    assert validate(a) == []
    assert RoutePlan.from_json(a.to_json()).node_order == a.node_order
    c = plan_for_training("geo-12", grid, 4, None, 6, seed=1, effort=QUICK)  # memory from the cluster (3)
    assert c.memory == 3 and validate(c) == []


_RANDOM_CLUSTERS = dict(seed=st.integers(0, 10_000), S=st.integers(3, 6), drop=st.integers(0, 2),
                        memory=st.integers(1, 3), rounds=st.integers(1, 2), extra=st.integers(0, 4))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_RANDOM_CLUSTERS)
def test_random_clusters_give_valid_collision_free_plans(seed, S, drop, memory, rounds, extra):
    _check_random_cluster(seed, S, drop, memory, rounds, extra)


@pytest.mark.slow
@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_RANDOM_CLUSTERS)
def test_many_random_clusters_give_valid_collision_free_plans(seed, S, drop, memory, rounds, extra):
    _check_random_cluster(seed, S, drop, memory, rounds, extra)


def _check_random_cluster(seed, S, drop, memory, rounds, extra):
    L = max(2, S - drop)
    m = memory * rounds
    try:
        sizes = derive_stage_sizes(40, S, L, memory, m)
    except LayoutError:
        return
    n = min(40, sum(sizes[:1]) + sum(sizes[1:]) + extra)
    sizes = derive_stage_sizes(n, S, L, memory, m)
    c = synthetic_cluster(n, seed=seed)
    res = plan_routes(c, num_stages=S, path_length=L, memory=memory, microbatches_per_home=m, seed=seed,
                      effort=QUICK)
    assert validate(res.plan) == []
    assert [len(g) for g in res.plan.stage_nodes] == sizes
    sim = simulate(res.plan, c)
    assert not _forward_overlap(sim.ops)
    assert sim.iteration_s == pytest.approx(res.predicted_paper_s)


def test_equal_links_use_the_exact_model_deterministically():
    grid = grid_stage_nodes(6, [5, 3, 3, 3, 3, 3])
    a = plan_for_training("single-cluster", grid, 4, 3, 6, seed=0)
    b = plan_for_training("single-cluster", grid, 4, 3, 6, seed=0)
    assert a.meta["method"] == "cp-sat hop layers" and a.to_json() == b.to_json()
    assert validate(a) == []
    sim = simulate(a, "single-cluster")
    full = simulate(full_pipeline(grid, 6), "single-cluster").iteration_s
    assert sim.iteration_s <= 0.40 * full and not _forward_overlap(sim.ops)
    # The layering: every body node serves one hop position, and one route of every slot.
    pos = {}
    for r in a.routes:
        for k, h in enumerate(r.hops):
            pos.setdefault(h.node, set()).add(k)
    assert all(len(v) == 1 for v in pos.values())
    # Links that differ (geo-12) never take this path.
    g = plan_for_training("geo-12", grid, 4, 3, 6, seed=0, effort=QUICK)
    assert g.meta.get("method") != "cp-sat hop layers"


def test_exact_model_applicability_says_why_not():
    C = np.full((6, 6), 0.4)
    np.fill_diagonal(C, 0)
    sn = [[0], [1], [2], [3], [4], [5]]
    cap = {n: 1 for n in range(1, 6)}
    assert applicable(sn, C, 1, 2, 4, cap) == "5 body nodes do not split into 3 hop layers"
    C2 = C.copy()
    C2[0, 1] = 0.9
    assert applicable(sn, C2, 1, 2, 4, cap) == "links differ"
    assert applicable(sn, C, 2, 3, 6, {n: 2 for n in cap}) is not None  # 3 microbatches over 2 slots


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(S=st.integers(3, 6), drop=st.integers(0, 2), memory=st.integers(1, 3), rounds=st.integers(1, 2),
       homes=st.integers(1, 4), seed=st.integers(0, 1000))
def test_equal_link_layouts_give_valid_plans(S, drop, memory, rounds, homes, seed):
    L = max(2, S - drop)
    hops, m = L - 1, memory * rounds
    slots = min(memory, m)
    per_stage, rem = divmod(homes * slots * hops, (S - 1) * memory)
    if rem or per_stage == 0:
        return  # the sizing rule: body nodes exactly full
    sizes = [homes] + [per_stage] * (S - 1)
    grid = grid_stage_nodes(S, sizes)
    try:
        plan = plan_for_training("single-cluster", grid, L, memory, m, seed=seed,
                                 effort=Effort(placement_evals=50, static_iters=500, sim_evals=40, exact_dtime=2.0))
    except LayoutError:
        return
    assert validate(plan) == []
    sim = simulate(plan, "single-cluster")
    assert not _forward_overlap(sim.ops)
    cl = load_cluster("single-cluster", num_nodes=sum(sizes))
    assert sim.iteration_s >= compute_lower_bound(plan, cl.stage_times()) - 1e-9


def test_valid_orders_pass_the_rules():
    for stages in ([1, 2, 3], [1, 2, 3, 4, 5], [2, 3, 5, 6], [1, 3, 4]):
        for o in valid_orders(stages):
            f, swaps = 0, 0
            for s in o:
                if s < f:
                    assert f - s == 1
                    swaps += 1
                f = max(f, s)
            assert swaps <= 2
    assert (2, 1, 3) in valid_orders([1, 2, 3]) and (3, 1, 2) not in valid_orders([1, 2, 3])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(num_stages=4, path_length=5), "path_length: L=5 but S=4"),
    (dict(memory=3, microbatches_per_home=4), "multiple of memory"),
    (dict(stage_sizes=[5, 3, 3, 3, 3, 2]), "add up to 19 but the cluster has 20"),
    (dict(stage_sizes=[10, 2, 2, 2, 2, 2]), "TC1 (memory): stage 1 must serve 18 routes"),
    (dict(stage_sizes=[4, 4, 3, 3, 3, 3]), "CC5 (equal visits)"),
    (dict(memory=0), "memory: 0"),
])
def test_infeasible_layouts_name_the_constraint(kwargs, needle):
    args = {**PAPER, **kwargs}
    with pytest.raises(LayoutError) as e:
        plan_routes("geo-12", effort=QUICK, **args)
    assert needle in str(e.value)


def test_sizing_rule():
    assert derive_stage_sizes(20, 6, 4, 3, 6) == [5, 3, 3, 3, 3, 3]
    assert derive_stage_sizes(42, 8, 6, 3, 6) == [7, 5, 5, 5, 5, 5, 5, 5]
    assert derive_stage_sizes(18, 4, 3, 3, 6) == [6, 4, 4, 4]


def test_placement_heuristics_report_the_spec_score():
    c = synthetic_cluster(20, seed=2)
    C = c.cost_matrix()
    a = anneal_placement(C, [5, 3, 3, 3, 3, 3], seed=0, max_evals=400)
    g = genetic_placement(C, [5, 3, 3, 3, 3, 3], seed=0, population=20, trials=400)
    for r in (a, g):
        assert sorted(n for grp in r.stage_nodes for n in grp) == list(range(20))
        assert r.score.total == pytest.approx(placement_score(C, r.stage_nodes).total)
        assert r.score.total == pytest.approx(r.score.data_parallel + r.score.pipeline)


def test_cli_plan_validate_simulate(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli_main(["plan", "--cluster", "single-cluster", "--nodes", "20", "--grid", "--sim-evals", "30",
                     "--out", str(out)]) == 0
    assert (out / "plan.json").is_file() and (out / "gantt.png").is_file() and (out / "report.json").is_file()
    assert cli_main(["validate", str(out / "plan.json")]) == 0
    assert cli_main(["simulate", str(out / "plan.json"), "--cluster", "single-cluster", "--mode", "paper"]) == 0
    bad = RoutePlan.load(out / "plan.json")
    bad.routes[0] = type(bad.routes[0])(bad.routes[0].mb, 0, bad.routes[0].home_node,
                                        tuple(reversed(bad.routes[0].hops)))
    bad.save(tmp_path / "bad.json")
    assert cli_main(["validate", str(tmp_path / "bad.json")]) == 1
    assert "CC3" in capsys.readouterr().out
    assert cli_main(["plan", "--stages", "4", "--path-length", "5", "--out", str(tmp_path / "x")]) == 2
