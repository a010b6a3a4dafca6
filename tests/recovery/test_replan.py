"""Re-plan while training (docs/replan.md): routes around a lost node, and the main job continuing on them.

The plan part is checked against independent references (the builders' own plans for the shorter
pipeline, the rule checker); the job part runs the real main job under the agent with a lost body
stage and a delayed replacement (real processes, gloo, DeepSpeed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from integration.config import BAD_INPUT, compose_and_check
from integration.plan.builders import build_plan, full_pipeline
from integration.plan.reroute import RerouteError, route_around
from integration.plan.routeplan import grid_stage_nodes
from integration.plan.rules import Rules, validate
from tests.conftest import RECOVERY_TEST_JOB, agent_events, audit, events, run_agent


# ----------------------------------------------------------------------------- the plan (no processes)
def test_dead_stage_of_the_full_pipeline_is_the_shorter_full_pipeline():
    plan = full_pipeline(grid_stage_nodes(5, 2), 3)
    rr = route_around(plan, [4, 5])  # both replicas of stage 2
    reference = full_pipeline(grid_stage_nodes(4, 2), 3)
    assert rr.plan.to_dict()["microbatches"] == reference.to_dict()["microbatches"]
    assert rr.plan.stage_nodes == reference.stage_nodes and rr.plan.path_length == 4
    assert rr.dead_stages == (2,) and rr.node_map == {0: 0, 1: 1, 2: 2, 3: 3, 6: 4, 7: 5, 8: 6, 9: 7}
    assert rr.ok and validate(rr.plan) == []
    assert [x.split(":")[0] for x in rr.relaxed] == ["CC5", "CC2"]


def test_lost_replica_moves_its_hops_to_the_surviving_replica():
    plan = build_plan("skip", grid_stage_nodes(7, 2), 6, path_length=5, memory=3, swap_prob=0.5)
    rr = route_around(plan, [5])  # stage 2 replica 1
    assert rr.ok and rr.dead_stages == () and rr.moved_hops == plan.stage_visits()[2] // 2
    assert rr.plan.stage_visits() == plan.stage_visits()  # every route keeps its stages
    survivor = rr.node_map[4]
    for old, new in zip(plan.routes, rr.plan.routes):
        assert old.body_stages == new.body_stages and new.mb == old.mb
        for h_old, h_new in zip(old.hops, new.hops):
            assert h_new.node == (survivor if h_old.node == 5 else rr.node_map[h_old.node])
    # TC1 cannot hold at the plan's memory: said, and the survivors' plan holds what it needs.
    assert any(x.startswith("TC1") for x in rr.relaxed) and rr.plan.memory == 4
    assert validate(rr.plan, rr.rules) == []


def test_dead_stage_of_a_skip_plan_keeps_equal_lengths_and_balanced_visits():
    plan = build_plan("skip", grid_stage_nodes(7, 2), 6, path_length=5, memory=3)
    rr = route_around(plan, [12, 13])  # stage 6, both replicas
    assert {len(r.hops) for r in rr.plan.routes} == {3} and rr.plan.num_stages == 6
    visits = rr.plan.stage_visits()[1:]
    assert max(visits) - min(visits) <= 1 and sum(visits) == 3 * len(plan.routes)
    assert rr.ok and validate(rr.plan, rr.rules) == []
    assert all(h.stage < 6 for r in rr.plan.routes for h in r.hops)


def test_what_cannot_be_routed_around_says_why():
    plan = full_pipeline(grid_stage_nodes(4, 1), 2)
    with pytest.raises(RerouteError, match="home node"):
        route_around(plan, [0])
    linear = full_pipeline(grid_stage_nodes(4, 1), 2, layout="linear")
    with pytest.raises(RerouteError, match="loss stage"):
        route_around(linear, [3])
    with pytest.raises(RerouteError, match="not in the plan"):
        route_around(plan, [9])
    assert route_around(linear, [2]).ok  # an interior stage of the linear layout can be skipped


@pytest.mark.parametrize("overrides,needs", [
    (["routing.replan.enabled=true"], "recovery=checkfree"),
    (["routing.replan.enabled=true", "recovery=checkfree", "backend=megatron"], "routing.replan.drift=true"),
    (["routing.replan.enabled=true", "recovery=checkfree", "recovery.checkpoint_every=2"], "checkpoint_every=0"),
    (["routing.replan.measure_steps=0"], "measure_steps"),
])
def test_bad_replan_settings_are_refused_naming_the_field(overrides, needs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(BAD_INPUT) as info:
        compose_and_check([f"output_root={tmp_path}/out", f"data.cache_dir={tmp_path}/cache", *overrides])
    assert str(info.value).startswith("routing.replan.") and needs in str(info.value)


# ----------------------------------------------------------------------------- the main job
STEPS = 300  # the replacement joins near step 80 on a quiet machine (3 s delay, ~35 ms per step)
DELAY_S = 3


def test_lost_body_stage_without_replacement_trains_on_and_switches_back(tmp_path: Path):
    """Stage 2 (of 5, no replica) SIGKILLed at step 3; its replacement is held back DELAY_S
    (``--respawn-delay``; the hot spare stands for a node that comes back later). The four survivors
    re-plan (every route skips stage 2), keep training, then re-form the full group with the
    replacement, which CheckFree rebuilds, and switch back to the job's plan."""
    p = run_agent(RECOVERY_TEST_JOB, f"output_root={tmp_path}", f"train.steps={STEPS}", "routing.replan.enabled=true",
                  "recovery.rendezvous_timeout_s=300", "recovery.inject=kill:stage=2,step=3,phase=backward", nproc=5,
                  log_dir=tmp_path / "logs", hot_spares=1, heartbeat_timeout=30, max_restarts=4,
                  extra=["--respawn-delay", str(DELAY_S)], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    agent = agent_events(p)
    (fail,) = [a for a in agent if a["event"] == "failure"]
    assert fail["rank"] == 2 and fail["respawn"] == f"delayed {DELAY_S} s" and fail["absent"] == [2]
    (back,) = [a for a in agent if a["event"] == "replaced"]  # it joined before the run ended
    assert back["rank"] == 2 and back["after_delay"] and back["time"] - fail["time"] >= DELAY_S

    for r in (0, 1, 3, 4):
        ev = events(tmp_path, r)
        lost, joined = [e for e in ev if e["event"] == "replan"]
        assert lost["reason"] == "rank(s) [2] lost, no replacement yet: routes skip stage(s) [2]"
        assert lost["members"] == [0, 1, 3, 4] and lost["stages"] == 4 and lost["dead_stages"] == [2]
        assert lost["at_step"] == 3 and lost["predicted_gain"] == pytest.approx(15.3 / 12.8)
        assert "joined" in joined["reason"] and joined["members"] == [0, 1, 2, 3, 4] and joined["stages"] == 5
        assert joined["predicted_gain"] == pytest.approx(12.8 / 15.3) and joined["at_step"] > lost["at_step"]
        for e in (lost, joined):
            assert e["measured_steps"] == 3 and e["measured_gain"] > 0
        rec = [e for e in ev if e["event"] == "recovery"]
        assert [e["methods"] for e in rec] == [[], ["checkfree"]]  # the re-plan rebuilds nothing; the join does
        assert rec[1]["resume_step"] == joined["at_step"]
        steps = [a["step"] for a in audit(tmp_path, r)]
        assert steps == list(range(STEPS)), "every step applied exactly once"
        gens = [a["generation"] for a in audit(tmp_path, r)]
        degraded = [s for s, g in zip(steps, gens) if g == 1]
        assert degraded == list(range(3, joined["at_step"])) and len(degraded) >= 3  # trained on 4 ranks meanwhile
    s0 = json.loads((tmp_path / "rank0" / "summary.json").read_text())
    assert s0["loss_last3"] < s0["loss_first3"] - 0.5, s0["loss_history"]
    # The replacement: rebuilt by CheckFree from its neighbours' (trained-on) weights, then trains on.
    (rebuilt,) = [e for e in events(tmp_path, 2) if e["event"] == "recovery"]
    assert rebuilt["rebuilt_here"] == "checkfree" and rebuilt["resume_step"] == joined["at_step"]
    by_pid: dict[int, list[int]] = {}
    for a in audit(tmp_path, 2):  # the killed process's steps, then the replacement's
        by_pid.setdefault(a["pid"], []).append(a["step"])
    assert list(by_pid.values()) == [[0, 1, 2], list(range(joined["at_step"], STEPS))]
    finals = {json.loads((tmp_path / f"rank{r}" / "summary.json").read_text())["val_loss_full_model"]
              for r in range(5)}
    assert len(finals) == 1  # the full model again, on every rank


@pytest.mark.slow
def test_a_death_during_the_switch_is_one_more_failure(tmp_path: Path):
    """Stage 2 SIGKILLed at step 3, stage 3 SIGKILLed inside that recovery, after the survivors' group
    formed and before the plan was agreed: the interrupted switch is recovered like any failure, the
    three survivors re-plan around both (a 3-stage pipeline), and both replacements join together
    (adjacent losses: the named degraded mode rebuilds them, ``fallback=copy_neighbour``)."""
    steps = STEPS
    p = run_agent(RECOVERY_TEST_JOB, f"output_root={tmp_path}", f"train.steps={steps}", "routing.replan.enabled=true",
                  "recovery.fallback=copy_neighbour", "recovery.rendezvous_timeout_s=300",
                  "recovery.inject=kill:stage=2,step=3,phase=backward;kill:stage=3,step=3,phase=recovery", nproc=5,
                  log_dir=tmp_path / "logs", hot_spares=2, heartbeat_timeout=30, max_restarts=4,
                  extra=["--respawn-delay", str(DELAY_S)], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    agent = agent_events(p)
    assert [a["absent"] for a in agent if a["event"] == "failure"] == [[2], [2, 3]]
    assert sorted(a["rank"] for a in agent if a["event"] == "replaced") == [2, 3]
    for r in (0, 1, 4):
        ev = events(tmp_path, r)
        assert any(e["event"] == "recovery_interrupted" for e in ev)
        lost, joined = [e for e in ev if e["event"] == "replan"]
        assert lost["members"] == [0, 1, 4] and lost["stages"] == 3 and lost["dead_stages"] == [2, 3]
        assert joined["members"] == [0, 1, 2, 3, 4] and joined["stages"] == 5
        assert [a["step"] for a in audit(tmp_path, r)] == list(range(steps))
    s0 = json.loads((tmp_path / "rank0" / "summary.json").read_text())
    assert s0["loss_last3"] < s0["loss_first3"] - 0.5, s0["loss_history"]


def test_members_of_a_generation_follow_the_agents_records():
    """Every rank derives the same group from the store's failure records (a real TCPStore, no ranks):
    survivors when the plan can be routed around the absent ranks, everyone (waiting) when not."""
    import torch.distributed as dist

    from integration.recovery.detect import record_failure
    from integration.recovery.events import EventLog
    from integration.recovery.replan import Replanner, ReplanSettings
    from integration.runtime.program import compile_plan
    from tests.dist_utils import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), world_size=None, is_master=True, wait_for_workers=False)
    program = compile_plan(full_pipeline(grid_stage_nodes(5, 1), 2))
    rp = Replanner(program, Rules(), ReplanSettings(enabled=True), 5, 1, None, EventLog(None, 1))
    record_failure(store, 2, "killed", absent=[2])
    record_failure(store, 0, "killed", absent=[0, 2])
    record_failure(store, 2, "replacements join", absent=[0], kind="join")
    record_failure(store, 0, "replacements join", absent=[], kind="join")
    assert rp.members_of(store, 0) == [0, 1, 2, 3, 4]
    assert rp.members_of(store, 1) == [0, 1, 3, 4] and rp.refused(1) is None
    assert rp.members_of(store, 2) == [0, 1, 2, 3, 4] and "home node(s) [0]" in rp.refused(2)
    assert rp.members_of(store, 3) == [0, 1, 2, 3, 4] and "home node(s) [0]" in rp.refused(3)
    assert rp.members_of(store, 4) == [0, 1, 2, 3, 4] and rp.refused(4) is None
    layout = rp.layout_of([0, 1, 3, 4])
    assert layout.num_stages == 4 and layout.plan.stage_nodes == [[0], [1], [2], [3]]
    assert layout.reason == "rank(s) [2] lost, no replacement yet: routes skip stage(s) [2]"
    # megatron keeps its grid (no survivors' group): the same records make everyone wait, saying why.
    mg = Replanner(compile_plan(full_pipeline(grid_stage_nodes(5, 1), 2), carry_batch=True), Rules(),
                   ReplanSettings(enabled=True), 5, 1, None, EventLog(None, 1), reroute=False)
    assert mg.members_of(store, 1) == [0, 1, 2, 3, 4] and "backend=deepspeed only" in mg.refused(1)
    assert mg.compile(full_pipeline(grid_stage_nodes(5, 1), 2)).carry_batch
