"""Failures before the first step is applied, on the main job: a rank lost before the first group
formed used to leave the others waiting for a group that never formed (then a timeout). Nothing is
lost yet, so the job restarts what is needed: the others regroup with the replacement, which starts
from its own initial state (``fresh_start``, not a CheckFree average of its neighbours), and the run
equals one without a failure, bitwise (every loss, validation loss, every rank's weights + Adam
state). Not covered: a death inside the backend's construction (see docs/recovery.md, Limits)."""

from __future__ import annotations

import json

import pytest

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
], ids=["before-group", "first-step"])
def test_failure_before_the_first_step_restarts_and_equals_no_failure(tmp_path, reference, schedule, generations):
    p = launch_main_job(tmp_path, 4, *COMMON, f"recovery.inject={schedule}")
    agent = [json.loads(line[len("agent: "):]) for line in p.stderr.splitlines() if line.startswith("agent: {")]
    assert [e["generation"] for e in agent if e["event"] == "failure"] == generations
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
