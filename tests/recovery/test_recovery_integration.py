"""Must-show recovery runs: real processes under launch.agent, real SIGKILL/SIGSTOP, gloo, DeepSpeed.

Each run trains the main job (`integration/train.py preset=recovery_test`) and checks the audit files every
rank writes (events, per-step audit digests of weights + optimizer state, the state right after
the recovery, final state): the run completes, no checkpoint is read (there is none), the rebuilt
stage equals the rule applied to its sources' pre-failure weights, survivors' state is bitwise
what it was after their last applied step, and every step is applied exactly once per stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from integration.recovery.rebuild import checkfree_average, stage_weight

from tests.conftest import audit, events, run_agent_job


def run_job(tmp: Path, nproc: int, *overrides: str, timeout: int = 240, hb: float = 4.0) -> tuple[int, str]:
    return run_agent_job(tmp, *overrides, nproc=nproc, heartbeat_timeout=hb, max_restarts=2, timeout=timeout)


def check_exactly_once(tmp: Path, world: int, steps: int, lost: set[int], fresh: bool = True) -> dict[int, int]:
    """Every rank's processes together applied steps 0..steps-1 exactly once; returns rank -> resume step.

    ``fresh``: the rebuilt ranks started a fresh optimizer (CheckFree rules) rather than a replica's copy."""
    resume = {}
    for r in range(world):
        rows = audit(tmp, r)
        assert [row["step"] for row in rows] == list(range(steps)), (r, [row["step"] for row in rows])
        pids = [row["pid"] for row in rows]
        final = torch.load(tmp / f"rank{r}" / "final.pt", weights_only=False)
        if r in lost:
            assert len(set(pids)) == 2, f"rank {r} should have been replaced once"
            resume[r] = next(row["step"] for row in rows if row["pid"] != pids[0])
            assert final["applied"] == list(range(resume[r], steps))
        else:
            assert len(set(pids)) == 1, f"survivor rank {r} was restarted"
            assert final["applied"] == list(range(steps))
        # Adam's own per-parameter step count: the steps this state has seen (a replica copy inherits them).
        want = len(final["applied"]) if (r not in lost or fresh) else steps
        assert final["opt_steps"] == [want], (r, final["opt_steps"], want)
    return resume


def check_survivors_unchanged(tmp: Path, world: int, lost: set[int], generation: int) -> None:
    for r in set(range(world)) - lost:
        dump = torch.load(tmp / f"rank{r}" / f"recovery_g{generation}.pt", weights_only=False)
        before = [row for row in audit(tmp, r) if row["generation"] < generation][-1]
        assert dump["digest"] == before["digest"], f"survivor rank {r} changed during recovery"


def test_kill_middle_stage_in_forward_checkfree(tmp_path):
    steps = 5
    rc, log = run_job(tmp_path, 5, f"train.steps={steps}",
                      "recovery.inject=\"kill:stage=2,step=2,phase=forward,after_ops=1\"")
    assert rc == 0, log
    assert '"reason": "killed by SIGKILL"' in log and '"rank": 2' in log
    resume = check_exactly_once(tmp_path, 5, steps, {2})
    assert resume[2] == 2  # the interrupted step was replayed
    check_survivors_unchanged(tmp_path, 5, {2}, 1)
    rebuilt = torch.load(tmp_path / "rank2" / "recovery_g1.pt", weights_only=False)
    prev = torch.load(tmp_path / "rank1" / "recovery_g1.pt", weights_only=False)
    nxt = torch.load(tmp_path / "rank3" / "recovery_g1.pt", weights_only=False)
    want = checkfree_average(prev["model"], nxt["model"], stage_weight(prev["grad_norm"]),
                             stage_weight(nxt["grad_norm"]))
    assert all(torch.equal(rebuilt["model"][k], want[k]) for k in want)
    assert rebuilt["optimizer_state_empty"] and rebuilt["lr_scale"] == pytest.approx(1.1)
    # The replayed step used the same microbatches: its loss equals what the survivors logged for it.
    losses = {row["loss"] for r in range(5) for row in audit(tmp_path, r) if row["step"] == 2}
    assert len(losses) == 1
    ev = [e for e in events(tmp_path, 0) if e["event"] == "recovery"]
    assert len(ev) == 1 and ev[0]["methods"] == ["checkfree"] and ev[0]["resume_step"] == 2
    for key in ("detect_s", "regroup_s", "transfer_s", "first_good_step_s", "loss_before", "loss_after"):
        assert ev[0][key] is not None, key
    assert ev[0]["detect_s"] < 2.0
    assert not any(p.name.startswith("checkpoint") for p in tmp_path.rglob("*"))


def test_kill_replica_in_backward_exact_copy(tmp_path):
    steps = 4
    rc, log = run_job(tmp_path, 6, "parallel.stages=3", "parallel.replicas=2", f"train.steps={steps}",
                      "recovery.inject=\"kill:stage=1,replica=1,step=1,phase=backward\"")
    assert rc == 0, log
    lost_rank = 3  # stage 1 replica 1 (stage-major grid: rank = stage*2 + replica)
    check_exactly_once(tmp_path, 6, steps, {lost_rank}, fresh=False)
    check_survivors_unchanged(tmp_path, 6, {lost_rank}, 1)
    rebuilt = torch.load(tmp_path / f"rank{lost_rank}" / "recovery_g1.pt", weights_only=False)
    donor = torch.load(tmp_path / "rank2" / "recovery_g1.pt", weights_only=False)
    # Bitwise: weights AND optimizer state (digest covers both), no lr_scale.
    assert rebuilt["digest"] == donor["digest"] and rebuilt["lr_scale"] == 1.0
    assert all(torch.equal(rebuilt["model"][k], donor["model"][k]) for k in donor["model"])
    final_a = torch.load(tmp_path / "rank2" / "final.pt", weights_only=False)["model"]
    final_b = torch.load(tmp_path / f"rank{lost_rank}" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)  # replicas stay in lockstep


@pytest.mark.parametrize("phase", [pytest.param("recovery", marks=pytest.mark.slow), "regroup"])
def test_failure_during_recovery_regroups_again_and_rebuilds_both(tmp_path, phase):
    # Stage 2 dies mid-backward; stage 4 dies inside that recovery: ``recovery`` = the new group
    # formed, before the exchange; ``regroup`` = before the new group forms (the survivors meet in
    # the store first: no gloo connect waits its 60 s timeout for a dead member). Everybody
    # regroups once more and both stages are rebuilt from the survivors.
    steps = 4
    rc, log = run_job(tmp_path, 6, "parallel.stages=6", f"train.steps={steps}",
                      f"recovery.inject=\"kill:stage=2,step=2,phase=backward;kill:stage=4,step=2,phase={phase}\"")
    assert rc == 0, log
    assert log.count('"reason": "killed by SIGKILL"') == 2
    resume = check_exactly_once(tmp_path, 6, steps, {2, 4})
    assert resume == {2: 2, 4: 2}
    check_survivors_unchanged(tmp_path, 6, {2, 4}, 2)
    evs = events(tmp_path, 0)
    assert [e["event"] for e in evs] == ["recovery_interrupted", "recovery"]
    ev = evs[1]
    assert ev["generation"] == 2 and sorted(ev["failed_ranks"]) == [2, 4] and ev["methods"] == ["checkfree"]
    assert ev["first_good_step_s"] < 30  # no op timeout on the way (a pending gloo collective would cost 60 s)
    dump = {r: torch.load(tmp_path / f"rank{r}" / "recovery_g2.pt", weights_only=False) for r in range(6)}
    for lost, (a, b) in ((2, (1, 3)), (4, (3, 5))):  # sources are survivors only
        want = checkfree_average(dump[a]["model"], dump[b]["model"], stage_weight(dump[a]["grad_norm"]),
                                 stage_weight(dump[b]["grad_norm"]))
        assert all(torch.equal(dump[lost]["model"][k], want[k]) for k in want), lost


@pytest.mark.slow
def test_edge_partner_copy_then_hang_detected(tmp_path):
    steps = 6
    rc, log = run_job(tmp_path, 5, "routing=checkfree_plus", f"train.steps={steps}",
                      "recovery.inject=\"kill:stage=1,step=1,phase=backward;hang:stage=3,step=3,phase=forward\"",
                      hb=3.0)
    assert rc == 0, log
    assert "hang (no heartbeat" in log
    check_exactly_once(tmp_path, 5, steps, {1, 3})
    s1 = torch.load(tmp_path / "rank1" / "recovery_g1.pt", weights_only=False)
    s2 = torch.load(tmp_path / "rank2" / "recovery_g1.pt", weights_only=False)
    assert all(torch.equal(s1["model"][k], s2["model"][k]) for k in s2["model"])  # S1 <- S2 bitwise
    ev = [e for e in events(tmp_path, 0) if e["event"] == "recovery"]
    assert [e["methods"] for e in ev] == [["partner_copy"], ["checkfree"]]
    assert ev[1]["detect_s"] < 3.0 + 2.0  # heartbeat timeout + agent poll + watcher poll


@pytest.mark.slow
def test_edge_without_swaps_announces_fallback(tmp_path):
    steps = 4
    rc, log = run_job(tmp_path, 5, f"train.steps={steps}", "recovery.fallback=copy_neighbour",
                      "recovery.inject=\"kill:stage=4,step=1,phase=forward\"")
    assert rc == 0, log
    fb = [e for e in events(tmp_path, 0) if e["event"] == "recovery_fallback"]
    assert fb and fb[0]["method"] == "copy_neighbour" and "DEGRADED" in fb[0]["action"]
    s4 = torch.load(tmp_path / "rank4" / "recovery_g1.pt", weights_only=False)
    s3 = torch.load(tmp_path / "rank3" / "recovery_g1.pt", weights_only=False)
    assert all(torch.equal(s4["model"][k], s3["model"][k]) for k in s3["model"])


@pytest.mark.slow
def test_edge_without_swaps_checkpoint_fallback_is_a_clear_error(tmp_path):
    rc, log = run_job(tmp_path, 5, "train.steps=4", "recovery.fallback=checkpoint",
                      "recovery.inject=\"kill:stage=1,step=1,phase=forward\"")
    assert rc != 0
    text = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert "no checkpoint to restore" in text and "swaps are off" in text
