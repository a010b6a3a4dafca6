"""Checkpoint-free recovery on the megatron-core backend: real processes under launch.agent, real SIGKILL.

The same job (`preset=recovery_test`) and the same checks as the DeepSpeed runs (:mod:`tests.recovery.test_recovery_integration`),
with ``backend=megatron``: megatron-core stages, megatron DDP and optimizer, rebuilt in-process on the
new process-group generation from an in-memory snapshot.
"""

from __future__ import annotations

import pytest
import torch

from integration.recovery.rebuild import checkfree_average, stage_weight
from tests.recovery.test_recovery_integration import audit, check_exactly_once, check_survivors_unchanged, events, run_job


def test_megatron_kill_middle_stage_in_backward_checkfree(tmp_path):
    steps = 5
    rc, log = run_job(tmp_path, 5, "backend=megatron", f"train.steps={steps}",
                      "recovery.inject=\"kill:stage=2,step=2,phase=backward\"")
    assert rc == 0, log
    assert '"reason": "killed by SIGKILL"' in log and '"rank": 2' in log
    resume = check_exactly_once(tmp_path, 5, steps, {2})
    assert resume[2] == 2  # the interrupted step was replayed
    check_survivors_unchanged(tmp_path, 5, {2}, 1)  # weights + Adam state survive the in-process rebuild
    rebuilt = torch.load(tmp_path / "rank2" / "recovery_g1.pt", weights_only=False)
    prev = torch.load(tmp_path / "rank1" / "recovery_g1.pt", weights_only=False)
    nxt = torch.load(tmp_path / "rank3" / "recovery_g1.pt", weights_only=False)
    want = checkfree_average(prev["model"], nxt["model"], stage_weight(prev["grad_norm"]),
                             stage_weight(nxt["grad_norm"]))
    assert any(k.startswith("decoder.layers.0.") for k in want)  # megatron's own module names
    assert all(torch.equal(rebuilt["model"][k], want[k]) for k in want)
    assert rebuilt["optimizer_state_empty"] and rebuilt["lr_scale"] == pytest.approx(1.1)
    losses = {row["loss"] for r in range(5) for row in audit(tmp_path, r) if row["step"] == 2}
    assert len(losses) == 1  # the replay used the same microbatches on every rank
    (ev,) = [e for e in events(tmp_path, 0) if e["event"] == "recovery"]
    assert ev["methods"] == ["checkfree"] and ev["resume_step"] == 2 and ev["detect_s"] < 2.0


@pytest.mark.slow  # the default run has the replica copy on DeepSpeed (test_recovery_integration.py)
def test_megatron_kill_replica_exact_copy(tmp_path):
    steps = 4
    rc, log = run_job(tmp_path, 6, "backend=megatron", "parallel.stages=3", "parallel.replicas=2", f"train.steps={steps}",
                      "recovery.inject=\"kill:stage=1,replica=1,step=1,phase=forward\"")
    assert rc == 0, log
    lost_rank = 3  # megatron's default order at TP=1: stage s, replica r -> rank s*2 + r
    check_exactly_once(tmp_path, 6, steps, {lost_rank}, fresh=False)
    check_survivors_unchanged(tmp_path, 6, {lost_rank}, 1)
    rebuilt = torch.load(tmp_path / f"rank{lost_rank}" / "recovery_g1.pt", weights_only=False)
    donor = torch.load(tmp_path / "rank2" / "recovery_g1.pt", weights_only=False)
    assert rebuilt["digest"] == donor["digest"] and rebuilt["lr_scale"] == 1.0  # weights AND Adam state
    final_a = torch.load(tmp_path / "rank2" / "final.pt", weights_only=False)["model"]
    final_b = torch.load(tmp_path / f"rank{lost_rank}" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)  # replicas stay in lockstep


def test_megatron_home_killed_restored_exactly_from_neighbour_mirror(tmp_path):
    steps = 5
    rc, log = run_job(tmp_path, 5, "backend=megatron", "routing=checkfree_plus", "recovery.home_replica=true",
                      f"train.steps={steps}", "recovery.inject=\"kill:stage=0,step=2,phase=backward\"")
    assert rc == 0, log
    check_exactly_once(tmp_path, 5, steps, {0}, fresh=False)
    check_survivors_unchanged(tmp_path, 5, {0}, 1)
    (ev,) = [e for e in events(tmp_path, 1) if e["event"] == "recovery"]
    assert ev["methods"] == ["home_mirror"] and ev["resume_step"] == 2
    # Embedding, final norm, output layer AND Adam state: bitwise the lost home's after its last committed step.
    lost = [row for row in audit(tmp_path, 0) if row["generation"] == 0][-1]
    assert lost["step"] == 1
    rebuilt = torch.load(tmp_path / "rank0" / "recovery_g1.pt", weights_only=False)
    assert rebuilt["digest"] == lost["digest"] and rebuilt["lr_scale"] == 1.0
