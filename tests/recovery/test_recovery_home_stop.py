"""Losing the home stage without a mirror: ``fallback=copy_neighbour`` cannot rebuild it (a body stage
has no embedding or head), so the job must stop cleanly up front - one clear message per rank, no
traceback, no crash-and-respawn loop - and no stop message may suggest that setting for the home."""

from __future__ import annotations

import json

import pytest

from tests.conftest import agent_events, run_main_job_under_agent

from integration.recovery.rebuild import RecoveryError, plan_rebuild



@pytest.mark.parametrize("fallback", ["copy_neighbour", "error"])
def test_home_stage_is_never_copied_from_a_body_stage(fallback):
    with pytest.raises(RecoveryError, match="home_replica=true") as exc:
        plan_rebuild({(0, 0)}, 5, 1, swaps_on=False, fallback=fallback)
    assert "fallback=copy_neighbour" not in str(exc.value) and "'copy_neighbour'" not in str(exc.value)
    # With a surviving replica or a mirror the home is still rebuilt exactly, whatever the fallback.
    assert plan_rebuild({(0, 1)}, 5, 2, swaps_on=False, fallback=fallback)[0].method == "replica_copy"
    assert plan_rebuild({(0, 0)}, 5, 1, swaps_on=True, fallback=fallback,
                        home_mirrors={0: [(1, 0), (4, 0)]})[0].method == "home_mirror"
    # Body stages keep the degraded mode.
    if fallback == "copy_neighbour":
        assert plan_rebuild({(4, 0)}, 5, 1, swaps_on=False, fallback=fallback)[0].method == "copy_neighbour"


def test_home_loss_with_copy_neighbour_stops_the_job_with_one_clean_message(tmp_path):
    """The main job as the old stop message told users to run it: home SIGKILLed mid-backward,
    ``recovery=degraded`` (``fallback=copy_neighbour``), no home mirror."""
    p = run_main_job_under_agent(tmp_path, 4, "recovery=degraded", "train.steps=6",
                                 "recovery.inject=kill:stage=0,step=2,phase=backward,after_ops=2", timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    agent = agent_events(p)
    failures = [e for e in agent if e["event"] == "failure"]
    assert len(failures) == 1 and failures[0]["rank"] == 0, failures  # the kill only: no crash, no respawn loop
    (abort,) = [e for e in agent if e["event"] == "abort"]
    assert "home stage 0" in abort["reason"] and "home_replica=true" in abort["reason"]
    for r in (1, 2, 3):  # the survivors
        events = [json.loads(x) for x in (tmp_path / "out" / f"rank{r}" / "events.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events] == ["recovery_failed"], events
        assert "fallback=copy_neighbour" not in events[0]["error"] and "home stage 0" in events[0]["error"]
        log = (tmp_path / "logs" / f"rank{r}-g0.log").read_text()
        assert "Traceback" not in log and "Error executing job" not in log, log[-3000:]
        stops = [line for line in log.splitlines() if line.startswith(f"rank {r}: job stopped")]
        assert len(stops) == 1 and "home_replica=true" in stops[0], log[-3000:]
