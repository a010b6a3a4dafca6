"""CheckFree / CheckFree+ recovery math and ladder (checkfree.md section 7, tests 1-7)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from integration.models.llama import BlockStack, LlamaConfig, build_ring_stages, reference_forward
from integration.plan.builders import checkfree_plus, checkfree_plus_order, full_pipeline
from integration.plan.routeplan import grid_stage_nodes
from integration.recovery.rebuild import (CHECKFREE, CHECKPOINT, COPY_NEIGHBOUR, HOME_MIRROR, PARTNER_COPY,
                                          REPLICA_COPY, RebuildAction, RecoveryError, checkfree_average,
                                          fresh_optimizer_state, home_holders, partner_copy,
                                          per_iteration_probability, plan_rebuild, set_lr_scale, stage_weight)
from integration.recovery.session import FaultTolerantSession
from integration.recovery.state import stage_state

CFG = LlamaConfig(vocab_size=64, d_model=16, n_heads=2, seq_len=8)


def _stack(index: int) -> BlockStack:
    return BlockStack(CFG, 1, index, seed=3)


def test_per_iteration_probability_anchor():
    assert per_iteration_probability(0.10, 91.3) == pytest.approx(2.67e-3, rel=2e-3)
    assert per_iteration_probability(0.0, 91.3) == 0.0
    assert per_iteration_probability(1.0, 3600) == 1.0
    with pytest.raises(ValueError):
        per_iteration_probability(1.5, 1.0)


def test_average_is_exact_weighted_formula_on_every_key():
    a, b = _stack(0), _stack(5)
    b.blocks[0].attn_norm.weight.data.mul_(3.0)  # norm gains differ too
    b.register_buffer("counter_like", torch.tensor([2.5]))
    a.register_buffer("counter_like", torch.tensor([0.5]))
    sa, sb = a.state_dict(), b.state_dict()
    out = checkfree_average(sa, sb, 0.3, 0.9)
    assert set(out) == set(sa)
    for k in sa:
        want = ((sa[k].double() * 0.3 + sb[k].double() * 0.9) / 1.2).float()
        assert torch.equal(out[k], want), k
    equal = checkfree_average(sa, sb, 2.0, 2.0)
    for k in sa:
        assert torch.allclose(equal[k], (sa[k] + sb[k]) / 2, rtol=0, atol=1e-7), k


def test_average_refuses_mismatched_stages():
    with pytest.raises(ValueError, match="state keys"):
        checkfree_average({"a": torch.ones(2)}, {"b": torch.ones(2)}, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        checkfree_average({"a": torch.ones(2)}, {"a": torch.ones(3)}, 1, 1)
    with pytest.raises(ValueError, match="> 0"):
        checkfree_average({"a": torch.ones(2)}, {"a": torch.ones(2)}, 0.0, 1)


def test_stage_weight_statistics():
    assert stage_weight(3.0) == pytest.approx(1.0 + 1e-4)
    assert stage_weight(0.5) == pytest.approx(0.5 + 1e-4)
    assert stage_weight(3.0, "l2") == pytest.approx(3.0 + 1e-4)
    assert stage_weight(3.0, "squared_l2") == pytest.approx(9.0 + 1e-4)
    assert stage_weight(0.0) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="weight_statistic"):
        stage_weight(1.0, "l1")


def test_commit_step_records_the_unclipped_stage_gradient_norm():
    """The CheckFree statistic of the real step (:func:`commit_step`, one rank, real store and gloo): the
    L2 norm of the stage's gradients before clipping; an unvisited stage keeps its last value."""
    import torch.distributed as dist

    from integration.recovery.commit import StepCommit
    from integration.recovery.detect import FailureMonitor
    from integration.recovery.guard import StepGuard, commit_step
    from integration.runtime.spawn import free_port

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=True, wait_for_workers=False)
    mon = FailureMonitor("127.0.0.1", port, 0, 0, poll_s=0.02).start()
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=0, world_size=1)
    try:
        guard = StepGuard(mon, StepCommit(store, 1, mon), 0)
        grads = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
        loss = commit_step(guard, 0, grads, True, 1.0, None, 6.0, 3, "test")
        assert loss == 2.0 and guard.last_grad_norm == pytest.approx(5.0) and guard.applied_steps == [0]
        assert float(torch.cat(grads).norm()) == pytest.approx(1.0, rel=1e-5)  # clipped in place to grad_clip
        commit_step(guard, 1, [torch.tensor([0.5])], False, 0.0, None, 1.0, 1, "test")
        assert guard.last_grad_norm == pytest.approx(5.0) and guard.applied_steps == [0, 1]
    finally:
        dist.destroy_process_group()
        mon.stop()


def _trained(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(2, CFG.seq_len, CFG.d_model, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    return opt, sched, x


def test_optimizer_surgery_fresh_state_scaled_lr_no_compounding():
    rebuilt, neighbour = _stack(1), _stack(2)
    opt, sched, x = _trained(rebuilt)
    opt_n, sched_n, _ = _trained(neighbour)
    neighbour_state = copy.deepcopy(opt_n.state_dict())
    scheduled = opt.param_groups[0]["lr"]

    fresh_optimizer_state(opt)
    set_lr_scale(opt, 1.1)
    assert opt.state_dict()["state"] == {}
    seen = []  # the LR the optimizer's step itself runs at (registered after set_lr_scale's own hook)
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    before = {n: p.detach().clone() for n, p in rebuilt.named_parameters()}
    opt.zero_grad()
    rebuilt(x).pow(2).mean().backward()
    opt.step()
    assert seen == [pytest.approx(1.1 * scheduled)]
    # Own step count restarted at 1, and the first Adam update is ~lr per element (bias-corrected),
    # not ~3x (the trap with zero moments and a kept step count).
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())
    for n, p in rebuilt.named_parameters():
        delta = (p.detach() - before[n] * (1 - 1.1 * scheduled * 0.01)).abs().max()
        assert delta <= 1.1 * scheduled * 1.001, n
    # The scheduler still owns the unscaled value and its global position.
    assert opt.param_groups[0]["lr"] == scheduled
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + 4))
    # A second failure does not compound.
    set_lr_scale(opt, 1.1)
    opt.zero_grad()
    rebuilt(x).pow(2).mean().backward()
    opt.step()
    assert seen[-1] == pytest.approx(1.1 * 1e-2 / (1 + 4)) and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    # The neighbour's optimizer is untouched, bitwise.
    after = opt_n.state_dict()
    for pid, st in neighbour_state["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k])


def _joiner(module: torch.nn.Module, statistic: str = "clipped_l2"):
    """What :meth:`FaultTolerantSession._apply` reads of the joining rank's session."""
    from types import SimpleNamespace

    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, foreach=False)
    return SimpleNamespace(module=module, optimizer=opt, scheduler=None, guard=SimpleNamespace(last_grad_norm=None),
                           settings=SimpleNamespace(weight_statistic=statistic))


def _received(module: torch.nn.Module, opt: torch.optim.Optimizer, norm: float | None) -> dict:
    return {"model": stage_state(module), "optimizer": copy.deepcopy(opt.state_dict()), "grad_norm": norm}


def test_replica_copy_is_exact_and_unscaled():
    """The real rebuild step (the session's ``_apply``) of a replica copy: weights and Adam state exact,
    no lr_scale, the schedule's LR from the donor."""
    src, dst = _stack(1), _stack(7)
    opt_src, _, _ = _trained(src)
    joiner = _joiner(dst)
    FaultTolerantSession._apply(joiner, RebuildAction(1, 1, REPLICA_COPY, ((1, 0),)), [_received(src, opt_src, 2.0)],
                                {"scheduler": None, "lrs": [opt_src.param_groups[0]["lr"]]})
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
    a, b = opt_src.state_dict(), joiner.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for k in a["state"][pid]:
            assert torch.equal(a["state"][pid][k], b["state"][pid][k])
    assert "lr_scale" not in joiner.optimizer.param_groups[0]


def test_checkfree_rebuild_starts_a_fresh_optimizer_at_the_scaled_lr():
    """The real rebuild step of CheckFree: the weighted average of the neighbours, Adam state dropped,
    ``lr_scale`` set, the donor's scheduled LR, and the mean of the neighbours' norms as the new statistic."""
    prev, nxt, lost = _stack(1), _stack(3), _stack(2)
    opt_p, _, _ = _trained(prev)
    opt_n, _, _ = _trained(nxt)
    joiner = _joiner(lost)
    lost(torch.randn(2, CFG.seq_len, CFG.d_model)).pow(2).mean().backward()
    joiner.optimizer.step()
    assert joiner.optimizer.state  # the joiner's own optimizer has state to drop
    FaultTolerantSession._apply(joiner, RebuildAction(2, 0, CHECKFREE, ((1, 0), (3, 0)), lr_scale=1.1),
                                [_received(prev, opt_p, 0.5), _received(nxt, opt_n, 3.0)],
                                {"scheduler": None, "lrs": [2.5e-3]})
    want = checkfree_average(stage_state(prev), stage_state(nxt), stage_weight(0.5), stage_weight(3.0))
    assert all(torch.equal(lost.state_dict()[k], want[k]) for k in want)
    assert not joiner.optimizer.state and joiner.optimizer.param_groups[0]["lr_scale"] == 1.1
    assert joiner.optimizer.param_groups[0]["lr"] == 2.5e-3 and joiner.guard.last_grad_norm == pytest.approx(1.75)


def test_partner_copy_is_bitwise():
    s2 = _stack(2).state_dict()
    s1 = partner_copy(s2)
    assert all(torch.equal(s1[k], s2[k]) and s1[k].data_ptr() != s2[k].data_ptr() for k in s2)


def test_sharded_equivalence():
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    full = checkfree_average({"w": a}, {"w": b}, 0.7, 0.2)["w"]
    for dim in (0, 1):
        shards = [checkfree_average({"w": x}, {"w": y}, 0.7, 0.2)["w"]
                  for x, y in zip(a.chunk(2, dim), b.chunk(2, dim))]
        assert torch.equal(torch.cat(shards, dim), full)


@pytest.mark.parametrize("L", [4, 5, 6, 7, 9])
def test_swap_routing_any_L(L):
    swapped = checkfree_plus_order(L, True)
    assert swapped[:2] == [2, 1] and swapped[-2:] == [L, L - 1] and swapped[2:-2] == list(range(3, L - 1))
    assert checkfree_plus_order(L, False) == list(range(1, L + 1))
    plan = checkfree_plus(grid_stage_nodes(L + 1, 1), 4)
    assert [list(r.body_stages) for r in plan.routes] == [list(range(1, L + 1)), swapped] * 2


def test_swaps_off_gradients_match_baseline():
    stages = build_ring_stages(CFG, 5, 1, seed=1)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(1))
    plan = full_pipeline(grid_stage_nodes(5, 1), 2)

    def grads(order_of):
        for m in stages:
            m.zero_grad()
        for r in plan.routes:
            reference_forward(stages, tokens, order_of(r)).float().pow(2).mean().backward()
        return [p.grad.clone() for m in stages for p in m.parameters()]

    baseline = grads(lambda r: None)
    routed = grads(lambda r: list(r.body_stages))
    assert all(torch.equal(a, b) for a, b in zip(baseline, routed))


# ------------------------------------------------------------------------------ ladder


def test_ladder_replica_then_checkfree():
    acts = plan_rebuild({(2, 1)}, 5, 2, swaps_on=False)
    assert [(a.method, a.sources, a.lr_scale) for a in acts] == [(REPLICA_COPY, ((2, 0),), 1.0)]
    acts = plan_rebuild({(2, 0), (2, 1)}, 5, 2, swaps_on=False, lr_scale=1.2)
    assert [(a.method, a.sources, a.lr_scale) for a in acts] == [(CHECKFREE, ((1, 0), (3, 0)), 1.2)] * 2
    # A lost replica of a neighbour does not block averaging: the survivor is the source.
    acts = plan_rebuild({(2, 0), (2, 1), (3, 0)}, 5, 2, swaps_on=False)
    assert acts[0].sources == ((1, 0), (3, 1)) and acts[2].method == REPLICA_COPY


def test_ladder_edges_with_and_without_swaps():
    acts = plan_rebuild({(1, 0), (4, 0)}, 5, 1, swaps_on=True)
    assert [(a.stage, a.method, a.sources) for a in acts] == [(1, PARTNER_COPY, ((2, 0),)),
                                                               (4, PARTNER_COPY, ((3, 0),))]
    acts = plan_rebuild({(1, 0)}, 5, 1, swaps_on=False)
    assert acts[0].method == CHECKPOINT and acts[0].degraded and "swaps are off" in acts[0].reason
    acts = plan_rebuild({(4, 0)}, 5, 1, swaps_on=False, fallback="copy_neighbour")
    assert (acts[0].method, acts[0].sources, acts[0].degraded) == (COPY_NEIGHBOUR, ((3, 0),), True)
    with pytest.raises(RecoveryError, match="edge stage"):
        plan_rebuild({(1, 0)}, 5, 1, swaps_on=False, fallback="error")
    with pytest.raises(ValueError, match="4 body stages"):
        plan_rebuild({(1, 0)}, 4, 1, swaps_on=True)


def test_ladder_adjacent_losses_never_chain():
    acts = plan_rebuild({(2, 0), (3, 0)}, 6, 1, swaps_on=False)
    assert all(a.method == CHECKPOINT and a.degraded for a in acts)
    acts = plan_rebuild({(2, 0), (3, 0)}, 6, 1, swaps_on=False, fallback="copy_neighbour")
    assert [(a.stage, a.sources) for a in acts] == [(2, ((1, 0),)), (3, ((4, 0),))]
    with pytest.raises(RecoveryError, match="adjacent"):
        plan_rebuild({(2, 0), (3, 0)}, 6, 1, swaps_on=False, fallback="error")
    with pytest.raises(RecoveryError, match="adjacent"):
        plan_rebuild({(1, 0), (2, 0)}, 6, 1, swaps_on=True, fallback="error")
    with pytest.raises(RecoveryError, match="no adjacent"):
        plan_rebuild({(2, 0), (3, 0), (4, 0)}, 6, 1, swaps_on=False, fallback="copy_neighbour")
    # Non-adjacent double loss: both averaged from survivors.
    acts = plan_rebuild({(2, 0), (4, 0)}, 7, 1, swaps_on=False)
    assert [(a.method, a.sources) for a in acts] == [(CHECKFREE, ((1, 0), (3, 0))), (CHECKFREE, ((3, 0), (5, 0)))]


def test_ladder_home_stage_and_bad_input():
    assert plan_rebuild({(0, 1)}, 5, 2, swaps_on=False)[0].method == REPLICA_COPY
    with pytest.raises(RecoveryError, match="home stage"):
        plan_rebuild({(0, 0)}, 5, 1, swaps_on=False, fallback="error")
    with pytest.raises(ValueError, match="not in the layout"):
        plan_rebuild({(5, 0)}, 5, 1, swaps_on=False)
    with pytest.raises(ValueError, match="fallback"):
        plan_rebuild(set(), 5, 1, swaps_on=False, fallback="pray")


def test_ladder_home_mirror_exact_no_chain():
    """CheckFree+ E/H replication: a lost home is copied exactly from a surviving holder's current mirror."""
    assert home_holders([1] * 5, 0) == [(1, 0), (4, 0)]
    assert home_holders([2, 2, 2], 1) == [(1, 1), (2, 1)] and home_holders([1, 1], 0) == [(1, 0)]
    both = {0: [(1, 0), (4, 0)]}
    (a,) = plan_rebuild({(0, 0)}, 5, 1, swaps_on=True, home_mirrors=both)
    assert (a.method, a.sources, a.lr_scale, a.degraded) == (HOME_MIRROR, ((1, 0),), 1.0, False)
    # Holder stage 1 lost in the same round: the other holder is the source; stage 1 itself is rebuilt
    # from its partner, never from anything rebuilt in this round.
    acts = plan_rebuild({(0, 0), (1, 0)}, 5, 1, swaps_on=True, home_mirrors=both)
    assert [(a.stage, a.method, a.sources) for a in acts] == [(0, HOME_MIRROR, ((4, 0),)),
                                                               (1, PARTNER_COPY, ((2, 0),))]
    # Both holders lost (or no current mirror): the configured fallback, with the reason.
    acts = plan_rebuild({(0, 0), (1, 0), (5, 0)}, 6, 1, swaps_on=True, home_mirrors={0: [(1, 0), (5, 0)]})
    assert acts[0].method == CHECKPOINT and acts[0].degraded and "was lost too" in acts[0].reason
    assert plan_rebuild({(0, 0)}, 5, 1, swaps_on=True, home_mirrors={0: []})[0].method == CHECKPOINT
    with pytest.raises(RecoveryError, match="home_replica=false"):
        plan_rebuild({(0, 0)}, 5, 1, swaps_on=True, fallback="error")
    # A surviving data-parallel replica still comes first; each lost home replica uses its own column's mirror.
    assert plan_rebuild({(0, 1)}, 5, 2, swaps_on=False, home_mirrors={0: [(1, 0)], 1: [(1, 1)]})[0].method == \
        REPLICA_COPY
    acts = plan_rebuild({(0, 0), (0, 1)}, 5, 2, swaps_on=False, home_mirrors={0: [(1, 0)], 1: [(4, 1)]})
    assert [(a.method, a.sources) for a in acts] == [(HOME_MIRROR, ((1, 0),)), (HOME_MIRROR, ((4, 1),))]
    with pytest.raises(ValueError, match="holder"):
        plan_rebuild({(0, 0)}, 5, 1, swaps_on=True, home_mirrors={0: [(0, 0)]})


def test_home_replica_setting_validated_and_on_for_checkfree_plus():
    from omegaconf import OmegaConf

    from integration.recovery.session import RecoverySettings

    conf = Path(__file__).resolve().parents[2] / "hydra_conf" / "recovery"
    assert OmegaConf.load(conf / "checkfree_plus.yaml").home_replica is True
    assert OmegaConf.load(conf / "checkfree.yaml").home_replica is False
    assert RecoverySettings.from_mapping({"home_replica": True}).home_replica is True
    assert RecoverySettings.from_mapping({}).home_replica is False
    with pytest.raises(ValueError, match="recovery.home_replica"):
        RecoverySettings.from_mapping({"home_replica": "yes"})
