"""The calibrated replay's backend-specific parts, hand-computed: megatron's batch-carrying program,
per-kind message overheads and sizes, the fitted tail of collectives after the program."""

import pytest

from integration.plan import RoutePlan, make_route
from integration.plan.calibration import CalibratedModel
from integration.plan.cluster import GIB, cluster_from_dict
from integration.plan.simulator import SimulationError
from integration.runtime.program import compile_plan


def _two_nodes():
    """Latency 0.1 s; 5000 B/s; activations of 1000 B (0.2 s on the link)."""
    return cluster_from_dict({"nodes": [{"region": "a"}, {"region": "b"}],
                              "links": [{"a": "a", "b": "b", "latency_ms": 100, "bandwidth_GiB_per_s": 5000 / GIB}],
                              "workload": {"samples_per_microbatch": 1, "activation_bytes_per_sample": 1000}})


PLAN = RoutePlan([[0], [1]], [make_route(0, [[0], [1]], 0, [(1, 0)])], path_length=2, memory=1)
COMPUTE = {(0, "load", None): 0.0, (0, "fwd", "embed"): 0.1, (1, "fwd", "body"): 0.3, (0, "fwd", "head"): 0.05,
           (0, "bwd", "head"): 0.05, (1, "bwd", "body"): 0.6, (0, "bwd", "embed"): 0.4}


def test_megatron_program_sends_the_batch_ahead_of_the_activation():
    """carry_batch: home 0 sends the batch (500 B, 0.1 s on the link) before the activation, so the
    activation leaves 0.1 s later; the body rank posts the batch receive first (0.005 s overhead)."""
    assert [o.kind for o in compile_plan(PLAN, carry_batch=True).for_rank(1)][:2] == ["recv_batch", "recv_act"]
    model = CalibratedModel(COMPUTE, send_s=0.01, recv_s={"act": 0.02, "grad": 0.02, "batch": 0.005},
                            carry_batch=True, message_bytes={"batch": 500})
    r = model.simulate(PLAN, _two_nodes())
    # rank 0: embed .1, send_batch .11 (link busy to .21, arrives .31), send_act .12 (link .21-.41, arrives .51)
    # rank 1: recv_batch .315, recv_act .53, body fwd .83, send .84 (arrives 1.14)
    # rank 0: recv 1.16, head 1.26, send_grad 1.27 (arrives 1.57); rank 1: recv 1.59, bwd 2.19, send 2.20
    # (arrives 2.50); rank 0: recv 2.52, embed bwd 2.92
    assert r.iteration_s == pytest.approx(2.92)
    assert {(1, "F", 0.53), (0, "L", 1.16), (1, "B", 1.59), (0, "B", 2.52)} <= \
        {(o.node, o.phase, round(o.start, 6)) for o in r.ops}
    # DeepSpeed's program (no batch messages): the 2.82 s of tests/wan/test_calibration.py
    plain = CalibratedModel(COMPUTE, send_s=0.01, recv_s={"act": 0.02, "grad": 0.02}).simulate(PLAN, _two_nodes())
    assert plain.iteration_s == pytest.approx(2.82)


def test_fitted_tail_of_collectives_then_the_optimizer_step():
    """After the programs (2.82 s on rank 0, 2.20 s on rank 1) both ranks all-reduce 400 B:
    2(k-1)/k x 400 B / 5000 B/s = 0.08 s + 2(k-1) x 0.1 s latency = 0.28 s, from 2.82; then post_s."""
    tail = {0: [((0, 1), 400)], 1: [((0, 1), 400)]}
    model = CalibratedModel(COMPUTE, send_s=0.01, recv_s=0.02, tail=tail, post_s={0: 0.03, 1: 0.01})
    r = model.simulate(PLAN, _two_nodes())
    assert r.compute_end_s == pytest.approx(2.82)
    assert r.iteration_s == pytest.approx(2.82 + 0.28 + 0.03)
    no_lat = CalibratedModel(COMPUTE, send_s=0.01, recv_s=0.02, tail=tail, post_s={0: 0.03, 1: 0.01},
                             allreduce_latency=False).simulate(PLAN, _two_nodes())
    assert no_lat.iteration_s == pytest.approx(2.82 + 0.08 + 0.03)
    bad = CalibratedModel(COMPUTE, send_s=0.01, recv_s=0.02, tail={0: [((0, 1), 400)], 1: []})
    with pytest.raises(SimulationError, match="tail"):
        bad.simulate(PLAN, _two_nodes())


def test_fit_per_kind_overheads_tail_and_post_over_iterations():
    def iteration(fast_batch: float, grad_wait: float, end: float):
        return {0: [("fwd", 0, "embed", None, 0.0, 0.1), ("send_batch", 0, None, 1, 0.1, 0.101),
                    ("send_act", 0, None, 1, 0.101, 0.111), ("recv_grad", 0, None, 1, 0.2, 0.2 + grad_wait),
                    ("allreduce", -1, 8, [0, 1], 0.5, 0.6), ("end", -1, None, None, end, end)],
                1: [("recv_batch", 0, None, 0, 0.0, fast_batch), ("recv_act", 0, None, 0, 0.0, 0.05),
                    ("allreduce", -1, 64, [0, 1], 0.0, 0.01),  # inside the program: not part of the tail
                    ("fwd", 0, "body", None, 0.05, 0.35), ("send_grad", 0, None, 0, 0.35, 0.37),
                    ("allreduce", -1, 8, [0, 1], 0.4, 0.6), ("end", -1, None, None, 0.61, 0.61)]}
    its = [iteration(0.001, 0.3, 0.7), iteration(0.003, 0.02, 0.64), iteration(0.002, 0.04, 0.62)]
    m = CalibratedModel.fit({"full": its}, carry_batch=True, message_bytes={"batch": 500})
    assert m.compute_s[(1, "fwd", "body")] == pytest.approx(0.3)
    assert m.send_s == pytest.approx({"batch": 0.001, "act": 0.01, "grad": 0.02})
    # one receive of each kind per iteration here: the median of the per-iteration fastest ones
    assert m.recv_s == pytest.approx({"batch": 0.002, "act": 0.05, "grad": 0.04})
    assert m.tail == {0: [((0, 1), 8)], 1: [((0, 1), 8)]}
    assert m.post_s == pytest.approx({0: 0.04, 1: 0.01})
    assert m.carry_batch and m.message_bytes == {"batch": 500}
    with pytest.raises(ValueError, match="unknown op kind 'sleep'"):
        CalibratedModel.fit({"full": {0: [("sleep", 0, None, None, 0.0, 1.0)]}})
    with pytest.raises(ValueError, match="no iteration"):
        CalibratedModel.fit({"full": []})
