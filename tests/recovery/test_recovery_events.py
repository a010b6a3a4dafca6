"""Recovery records on the main job: every failure gets exactly one ``recovery`` event, a recovery
superseded by a newer failure before its first good step included (marked so), a recovery during
the final validation and one at the final barrier too (and counted in the summary); times count
from the failure itself, for a hang from the last heartbeat (so detection takes the heartbeat
timeout, not 0). A death after the final barrier is no failure: the job is complete."""

from __future__ import annotations

import json

from tests.conftest import agent_events, run_main_job_under_agent


HEARTBEAT_TIMEOUT = 3.0
# Stage 2 (interior, CheckFree) fails four times in four generations:
#   gen 0: killed mid-backward of step 3;
#   gen 1: its replacement killed in the replay of step 3 (the gen-0 recovery is superseded);
#   gen 2: hung (SIGSTOP) mid-backward of step 5, found by heartbeats;
#   gen 3: killed at the start of the final validation (after step 7, train.steps=8);
#   gen 4: its replacement (joined in the final validation) killed before the final barrier;
#   then rank 1 (stage 1) killed right after the final barrier.
SCHEDULE = ("kill:stage=2,step=3,phase=backward,after_ops=2;kill:stage=2,step=3,phase=forward,after_ops=1,gen=1;"
            "hang:stage=2,step=5,phase=backward,after_ops=1;kill:stage=2,step=8,phase=validation;"
            "kill:stage=2,step=8,phase=final,gen=4;kill:stage=1,step=8,phase=exit,gen=5")


def test_every_failure_one_event_superseded_validation_and_hang_timing(tmp_path):
    p = run_main_job_under_agent(tmp_path, 4, "recovery=checkfree", "train.steps=8", f"recovery.inject={SCHEDULE}",
                                 heartbeat_timeout=HEARTBEAT_TIMEOUT, max_restarts=10)
    assert p.returncode == 0, p.stderr[-4000:]
    agent = agent_events(p)
    assert [(e["rank"], e["generation"]) for e in agent if e["event"] == "failure"] == [(2, g) for g in range(1, 6)]
    (late,) = [e for e in agent if e["event"] == "failure_after_completion"]
    assert late["rank"] == 1 and "SIGKILL" in late["reason"]
    assert any(e["event"] == "finished" for e in agent)

    out = tmp_path / "out"
    for r in (0, 1, 3):  # ranks that never failed before the end saw all five failures
        events = [json.loads(x) for x in (out / f"rank{r}" / "events.jsonl").read_text().splitlines()]
        rec = [e for e in events if e["event"] == "recovery"]
        # One event per failure: every generation covered exactly once, in order.
        assert [e["generations"] for e in rec] == [[1], [2], [3], [4], [5]], rec
        assert [e["superseded"] for e in rec] == [True, False, False, False, False]
        sup, after, hang, val, final = rec
        assert sup["first_good_step_s"] is None and sup["superseded_by"] and sup["resume_step"] == 3
        assert after["first_good"] == "step" and after["resume_step"] == 3
        assert after["burst_s"] > after["first_good_step_s"] > 0  # the burst began with the superseded failure
        assert "hang" in hang["reasons"][0] and hang["resume_step"] == 5
        # From the last heartbeat, not from the agent's record (that gave 0). A survivor sees the
        # connection reset at the agent's SIGKILL, up to one agent poll (50 ms) before the record,
        # and the agent's reason rounds the silence to 0.1 s.
        assert hang["detect_s"] >= HEARTBEAT_TIMEOUT - 0.2, hang
        assert hang["first_good_step_s"] > hang["detect_s"]
        assert val["first_good"] == "validation" and val["resume_step"] == 8 and val["loss_after"] > 0
        # The final barrier's loss: the replacement joined with nothing to train, validation ran again.
        assert final["first_good"] == "validation" and final["resume_step"] == 8 and final["loss_after"] > 0
        assert final["loss_after"] == val["loss_after"]  # same weights, same validation batches
        s = json.loads((out / f"rank{r}" / "summary.json").read_text())  # rewritten after that recovery
        assert len(s["recoveries"]) == 5 and s["recoveries"][4]["first_good"] == "validation"
        assert s["generation"] == 5 and len(s["loss_history"]) == 8
    # The last replacement of rank 2 joined at the final barrier: no step, no made-up loss.
    s2 = json.loads((out / "rank2" / "summary.json").read_text())
    assert s2["loss_history"] == [] and s2["loss_first3"] is None and s2["loss_last3"] is None
    (ev,) = s2["recoveries"]
    assert ev["first_good"] == "validation" and ev["generations"] == [5]
