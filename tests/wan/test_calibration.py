"""Calibration parameters of the simulator: hand-computed timings, the runtime's order, defaults unchanged."""

import numpy as np
import pytest

from integration.plan import RoutePlan, full_pipeline, grid_stage_nodes, make_route, oblivious_skip
from integration.plan.calibration import CalibratedModel
from integration.plan.cluster import builtin_cluster
from integration.plan.simulator import simulate
from integration.runtime.program import compile_plan


def test_measured_op_seconds_replace_the_w_factors():
    # home 0 -> node 1 -> home, C = 0.5 both ways, no gap; measured F0 .2, F1 .3, L .1, B1 .6, B0 .4
    plan = RoutePlan([[0], [1]], [make_route(0, [[0], [1]], 0, [(1, 0)])], path_length=2, memory=1)
    C = np.array([[0, 0.5], [0.5, 0]])
    ops = {(0, "F"): 0.2, (1, "F"): 0.3, (0, "L"): 0.1, (1, "B"): 0.6, (0, "B"): 0.4}
    r = simulate(plan, cost=C, stage_times=[1.0, 2.0], gap_s=0.0, op_seconds=ops)
    assert r.iteration_s == pytest.approx(0.2 + 0.5 + 0.3 + 0.5 + 0.1 + 0.5 + 0.6 + 0.5 + 0.4)
    # without them: the paper factors (9.75 s with the 0.1 s gap, tests/plan/test_simulator.py)
    assert simulate(plan, cost=C, stage_times=[1.0, 2.0]).iteration_s == pytest.approx(9.75)


def test_allreduce_latency_term_can_be_dropped():
    c = builtin_cluster("geo-12", 8)
    plan = full_pipeline(grid_stage_nodes(4, 2), 6)
    on, off = simulate(plan, c, mode="full"), simulate(plan, c, mode="full", allreduce_latency=False)
    lat = c.latency_matrix()
    for s, group in enumerate(plan.stage_nodes):
        assert on.allreduce_s[s] - off.allreduce_s[s] == pytest.approx(2 * lat[np.ix_(group, group)].max())


def _two_node_cluster():
    from integration.plan.cluster import GIB, cluster_from_dict
    return cluster_from_dict({"nodes": [{"region": "a"}, {"region": "b"}],
                              "links": [{"a": "a", "b": "b", "latency_ms": 100, "bandwidth_GiB_per_s": 1000 / 0.2 / GIB}],
                              "workload": {"samples_per_microbatch": 1, "activation_bytes_per_sample": 1000}})


def test_replay_of_the_compiled_program_hand_computed():
    """home 0 -> node 1 -> home; latency .1 s, 1000 B at 5000 B/s = .2 s; send .01 s, receive .02 s."""
    plan = RoutePlan([[0], [1]], [make_route(0, [[0], [1]], 0, [(1, 0)])], path_length=2, memory=1)
    compute = {(0, "load", None): 0.0, (0, "fwd", "embed"): 0.1, (1, "fwd", "body"): 0.3, (0, "fwd", "head"): 0.05,
               (0, "bwd", "head"): 0.05, (1, "bwd", "body"): 0.6, (0, "bwd", "embed"): 0.4}
    model = CalibratedModel(compute, send_s=0.01, recv_s=0.02)
    r = model.simulate(plan, _two_node_cluster())
    # fwd .1, send -> .11, arrives .41, recv .43, fwd 1 -> .73, send .74, arrives 1.04, recv 1.06, head fwd+bwd 1.16,
    # send 1.17, arrives 1.47, recv 1.49, bwd 1 -> 2.09, send 2.10, arrives 2.40, recv 2.42, bwd embed -> 2.82
    assert r.iteration_s == pytest.approx(2.82), [str(op) for op in compile_plan(plan).for_rank(0)]
    starts = {(o.node, o.phase, round(o.start, 6)) for o in r.ops}
    assert {(1, "F", 0.43), (0, "L", 1.06), (1, "B", 1.49), (0, "B", 2.42)} <= starts


def test_replay_follows_the_runtime_order_a_send_leaves_before_the_next_receive():
    """The replay runs the compiled programs as the runtime does: a body node's send of microbatch 0
    leaves right after its forward, not after the (blocking) receive of microbatch 1."""
    plan = full_pipeline(grid_stage_nodes(4, 1), 3)
    body = [(op.kind, op.mb) for op in compile_plan(plan).for_rank(1)]
    assert body.index(("send_act", 0)) < body.index(("recv_act", 1))
    c = builtin_cluster("geo-12", 4)
    compute = {(r, k, p): 0.01 for r in range(4) for k, p in (("load", None), ("fwd", "embed"), ("fwd", "body"),
                                                              ("fwd", "head"), ("bwd", "head"), ("bwd", "body"),
                                                              ("bwd", "embed"))}
    compute[(0, "fwd", "embed")] = 0.5  # microbatch 1 reaches stage 1 long after microbatch 0 left it
    r = CalibratedModel(compute, send_s=0.0, recv_s=0.0, allreduce_latency=False).simulate(plan, c)
    # Microbatch 0's forward reaches stage 3 after exactly its three transfers and three forwards:
    # nothing waits for microbatch 1 on the way (the old order added its 0.51 s embed + load per hop).
    lat, bw = c.latency_matrix(), c.bandwidth_matrix()
    nbytes = c.workload.activation_bytes
    hop = lambda a, b: nbytes / bw[a][b] + lat[a][b]  # noqa: E731
    stage3_f0 = min(o.start for o in r.ops if o.node == 3 and o.mb == 0 and o.phase == "F")
    assert stage3_f0 == pytest.approx(0.01 + 0.5 + 0.01 + 0.01 + hop(0, 1) + hop(1, 2) + hop(2, 3))


def test_fit_takes_medians_and_the_fastest_receive():
    trace = {"full": {0: [("fwd", 0, "embed", None, 0.0, 0.1), ("send_act", 0, None, 1, 0.1, 0.11),
                          ("fwd", 1, "embed", None, 0.2, 0.5), ("send_act", 1, None, 1, 0.5, 0.53),
                          ("fwd", 2, "embed", None, 0.6, 0.8), ("recv_grad", 0, None, 1, 0.8, 1.5),
                          ("recv_grad", 1, None, 1, 1.5, 1.52)]}}
    m = CalibratedModel.fit(trace)
    assert m.compute_s == {(0, "fwd", "embed"): pytest.approx(0.2)}
    assert m.send_s == {"act": pytest.approx(0.02)} and m.recv_s == {"grad": pytest.approx(0.02)}
