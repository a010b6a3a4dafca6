"""The plan compiler: per-rank programs from one global order never deadlock and match pairwise."""

from collections import defaultdict, deque
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from integration.plan import full_pipeline, grid_stage_nodes, oblivious_skip, checkfree_plus
from integration.runtime import program as P


def execute(program, seed=0):
    """Run every rank's program with blocking receives and non-blocking sends, ranks stepping in a
    random interleaving. Returns the per-rank executed ops; raises on deadlock or a mismatched pair."""
    rng = random.Random(seed)
    pos = {r: 0 for r in program.ops}
    channels = defaultdict(deque)  # (src, dst) -> messages in flight
    done_compute = set()
    pair = {P.SEND_ACT: P.RECV_ACT, P.SEND_GRAD: P.RECV_GRAD, P.SEND_LABELS: P.RECV_LABELS, P.SEND_BATCH: P.RECV_BATCH}
    while any(pos[r] < len(program.ops[r]) for r in program.ops):
        runnable = []
        for r, ops in program.ops.items():
            if pos[r] >= len(ops):
                continue
            op = ops[pos[r]]
            if op.kind in pair.values() and not channels[(op.peer, r)]:
                continue  # blocked on a receive
            runnable.append(r)
        if not runnable:
            stuck = {r: str(program.ops[r][pos[r]]) for r in program.ops if pos[r] < len(program.ops[r])}
            raise AssertionError(f"deadlock: {stuck}")
        r = rng.choice(runnable)
        op = program.ops[r][pos[r]]
        if op.kind in pair:
            channels[(r, op.peer)].append((pair[op.kind], op.mb))
        elif op.kind in pair.values():
            kind, mb = channels[(op.peer, r)].popleft()
            assert (kind, mb) == (op.kind, op.mb), f"rank {r} expected {op} but got {kind} of mb {mb}"
        else:
            done_compute.add((r, op.kind, op.mb, op.part))
        pos[r] += 1
    assert not any(channels.values())
    return done_compute


def check_dependencies(program):
    """Within a rank, a microbatch's forward precedes its backward; received data precedes its use."""
    for r, ops in program.ops.items():
        seen = set()
        for op in ops:
            if op.kind == P.BWD:
                assert (P.FWD, op.mb, op.part) in seen
            if op.kind == P.FWD and op.part == P.PART_BODY:
                assert (P.RECV_ACT, op.mb, None) in seen
            seen.add((op.kind, op.mb, op.part))
    check_sends_hoisted(program)


SENDS = (P.SEND_ACT, P.SEND_GRAD, P.SEND_LABELS, P.SEND_BATCH)


def check_sends_hoisted(program):
    """A rank's program is the global order with every send moved up to right after its compute op:
    receives and compute keep the global order, sends keep theirs, a send only ever moves earlier and
    no receive sits between a send and the compute op before it."""
    for r, ops in program.ops.items():
        for kinds in (SENDS, [k for k in {o.kind for o in ops} if k not in SENDS]):
            seqs = [op.seq for op in ops if op.kind in kinds]
            assert seqs == sorted(seqs), (r, kinds)
        for i, op in enumerate(ops):
            if op.kind in SENDS:
                # The nearest op before it that is not a send is the compute op that made its data.
                j = i - 1
                while j >= 0 and ops[j].kind in SENDS:
                    j -= 1
                made_by = P.BWD if op.kind == P.SEND_GRAD else P.FWD
                assert j >= 0 and (ops[j].kind, ops[j].mb) == (made_by, op.mb), (r, str(op), str(ops[j]))
                assert all(later.kind.startswith("recv") for later in ops[i + 1:] if later.seq < op.seq), (r, str(op))


def test_full_pipeline_linear_program_shape():
    plan = full_pipeline(grid_stage_nodes(4, 1), 4, layout="linear")
    prog = P.compile_plan(plan)
    kinds0 = [op.kind for op in prog.for_rank(0)]
    assert kinds0.count(P.LOAD) == 4 and kinds0.count(P.SEND_LABELS) == 4
    assert [op.kind for op in prog.for_rank(3)].count(P.RECV_LABELS) == 4
    # Each stage runs the backward of microbatches in order 0..3 (same accumulation order as 1F1B).
    for r in range(4):
        assert [op.mb for op in prog.for_rank(r) if op.kind == P.BWD] == [0, 1, 2, 3]
    execute(prog)
    check_dependencies(prog)


def test_a_send_leaves_before_the_next_receive():
    """A body node forwards microbatch 0 before it waits for microbatch 1 (the old order,
    recv_act(1) then send_act(0), held activations back for a whole transfer on slow links)."""
    prog = P.compile_plan(full_pipeline(grid_stage_nodes(4, 1), 3))
    body = [(op.kind, op.mb) for op in prog.for_rank(1)]
    assert body.index((P.SEND_ACT, 0)) == body.index((P.FWD, 0)) + 1 < body.index((P.RECV_ACT, 1))
    assert body.index((P.SEND_GRAD, 0)) == body.index((P.BWD, 0)) + 1
    # The global order itself (seq) still has the receive first: only the rank's program moved.
    ops = {(op.kind, op.mb): op.seq for op in prog.for_rank(1)}
    assert ops[(P.RECV_ACT, 1)] < ops[(P.SEND_ACT, 0)]
    execute(prog)
    check_dependencies(prog)


def test_ring_home_runs_embed_and_head():
    plan = checkfree_plus(grid_stage_nodes(5, 1), 4)
    prog = P.compile_plan(plan)
    parts = [(op.kind, op.part) for op in prog.for_rank(0) if op.kind in (P.FWD, P.BWD)]
    assert parts.count((P.FWD, P.PART_EMBED)) == 4 and parts.count((P.BWD, P.PART_HEAD)) == 4
    # Swapped microbatch 1 goes home -> stage 2 first.
    first_send = [op for op in prog.for_rank(0) if op.kind == P.SEND_ACT and op.mb == 1][0]
    assert first_send.peer == 2
    execute(prog)


def test_max_inflight_bounds_live_microbatches():
    plan = full_pipeline(grid_stage_nodes(4, 1), 8)
    prog = P.compile_plan(plan, max_inflight=2)
    live = peak = 0
    for op in prog.for_rank(0):
        if op.kind == P.LOAD:
            live += 1
            peak = max(peak, live)
        if op.kind == P.BWD and op.part == P.PART_EMBED:
            live -= 1
    assert peak == 2


@settings(max_examples=40, deadline=None)
@given(S=st.integers(3, 7), homes=st.integers(1, 3), reps=st.integers(1, 3), seed=st.integers(0, 10 ** 6),
       layout=st.sampled_from(["ring", "linear"]), inflight=st.sampled_from([None, 1, 2, 5]))
def test_random_plans_never_deadlock(S, homes, reps, seed, layout, inflight):
    free = S - 1 if layout == "ring" else S - 2
    L = max(3, S - 1)
    per = L - 1 if layout == "ring" else L - 2
    m = free  # makes CC5 feasible for any route count
    plan = oblivious_skip(grid_stage_nodes(S, [homes] + [reps] * (S - 1)), m, L, seed=seed, swap_prob=0.7,
                          layout=layout)
    assert per >= 1
    prog = P.compile_plan(plan, inflight)
    computed = execute(prog, seed)
    check_dependencies(prog)
    # Every visit is computed: forward and backward on every node of every route.
    n_compute = sum(1 for c in computed if c[1] in (P.FWD, P.BWD))
    extra = 2 if layout == "ring" else 0  # the ring home runs embed and head
    assert n_compute == sum(2 * (len(r.hops) + 1) + extra for r in plan.routes)


def test_node_order_is_followed_and_infeasible_order_rejected():
    plan = full_pipeline(grid_stage_nodes(3, 1), 3)
    # Stage 1 processes microbatch 2 first, then 0, then 1.
    plan.node_order = {1: [(2, "F"), (2, "B"), (0, "F"), (0, "B"), (1, "F"), (1, "B")]}
    prog = P.compile_plan(plan)
    assert [op.mb for op in prog.for_rank(1) if op.kind == P.FWD] == [2, 0, 1]
    execute(prog)
    plan.node_order = {1: [(0, "B"), (0, "F"), (1, "F"), (1, "B"), (2, "F"), (2, "B")]}
    with pytest.raises(ValueError, match="node_order cannot be followed"):
        P.compile_plan(plan)


@pytest.mark.parametrize("layout", ["linear", "ring"])
def test_carry_batch_sends_the_batch_once_to_every_other_node_of_the_route_before_it_computes(layout):
    plan = oblivious_skip(grid_stage_nodes(4, 2), 3, 3, seed=1, layout=layout)
    plain, carried = P.compile_plan(plan), P.compile_plan(plan, carry_batch=True)
    assert not any(op.kind in (P.SEND_BATCH, P.RECV_BATCH) for ops in plain.ops.values() for op in ops)
    for route in plan.routes:
        others = {h.node for h in route.hops} - {route.home_node}
        sent = [op.peer for op in carried.for_rank(route.home_node) if op.kind == P.SEND_BATCH and op.mb == route.mb]
        assert sorted(sent) == sorted(others)
        for node in others:
            ops = carried.for_rank(node)
            first_recv = next(i for i, op in enumerate(ops) if op.kind == P.RECV_BATCH and op.mb == route.mb)
            first_fwd = next(i for i, op in enumerate(ops) if op.kind == P.FWD and op.mb == route.mb)
            assert first_recv < first_fwd
    assert not any(op.kind in (P.SEND_LABELS, P.RECV_LABELS) for ops in carried.ops.values() for op in ops)
    # Compute ops are the same, in the same order, with or without the batch transfers.
    compute = lambda prog: {r: [(o.kind, o.mb, o.part) for o in ops if o.kind in (P.FWD, P.BWD)]  # noqa: E731
                            for r, ops in prog.ops.items()}
    assert compute(plain) == compute(carried)
    execute(carried)
    check_dependencies(carried)
