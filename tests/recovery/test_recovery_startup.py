"""Failures before the first step is applied, on the main job: a rank lost before the first group
formed used to leave the others waiting for a group that never formed (then a timeout). Nothing is
lost yet, so the job restarts what is needed: the others regroup with the replacement, which starts
from its own initial state (``fresh_start``, not a CheckFree average of its neighbours), and the run
equals one without a failure, bitwise (every loss, validation loss, every rank's weights + Adam
state). A death inside the backend's construction (the others blocked in DeepSpeed's collectives
or failing on a raw gloo error) ends the others with exit code 75 and their agent starts them
again, not counted as failures: they settle with the replacement like ranks whose first group
never formed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_main_job_under_agent
from tests.recovery.test_recovery_replay_exact import launch_main_job, results

COMMON = ["recovery=checkfree", "train.steps=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    launch_main_job(out, 4, *COMMON)
    return results(out, 4)


@pytest.mark.parametrize("schedule, generations", [
    # stage 2 dies before the first group forms
    ("kill:stage=2,step=0,phase=startup", [1]),
    # stage 2 dies in the first step, after other stages accumulated gradients
    ("kill:stage=2,step=0,phase=backward,after_ops=2", [1]),
    # stage 2 dies inside its DeepSpeed construction (module groups made, engine not built)
    ("kill:stage=2,step=0,phase=construction", [1]),
], ids=["before-group", "first-step", "construction"])
def test_failure_before_the_first_step_restarts_and_equals_no_failure(tmp_path, reference, schedule, generations):
    # --max-restarts 1: the one failure is all the agent may count (restarts after exit 75 are not failures)
    p = run_main_job_under_agent(tmp_path, 4, *COMMON, f"recovery.inject={schedule}", max_restarts=1)
    assert p.returncode == 0, p.stderr[-4000:]
    agent = [json.loads(line[len("agent: "):]) for line in p.stderr.splitlines() if line.startswith("agent: {")]
    assert [e["generation"] for e in agent if e["event"] == "failure"] == generations
    if schedule.endswith("phase=construction"):  # the survivors were started again, not counted as failures
        restarted = sorted(e["rank"] for e in agent if e["event"] == "restart")
        assert restarted and 2 not in restarted and len(set(restarted)) == len(restarted), restarted
        for r in restarted:  # each said why, in its first process's log
            assert "exiting with code 75 for the agent to start this rank again" in (
                tmp_path / "logs" / f"rank{r}-g0.log").read_text(), r
    failed = results(tmp_path, 4)
    for r, s in failed.items():
        for step, loss in s["losses_by_step"].items():
            assert loss == reference[r]["losses_by_step"][step], (r, step)
        assert len(s["losses_by_step"]) == 4, r  # every rank, the replacement too, ran steps 0..3
        assert s["val_loss_full_model"] == reference[r]["val_loss_full_model"], r
        assert s["state_digest"] == reference[r]["state_digest"], r
    (ev,) = failed[0]["recoveries"]
    assert ev["methods"] == ["fresh_start"] and ev["resume_step"] == 0 and ev["generations"] == generations
    assert ev["first_good_step_s"] > 0
