"""Losses the ladder cannot average (two adjacent stages killed at once, real SIGKILL): the configured
fallback - named degraded mode, a clear job-wide error, or a real DeepSpeed checkpoint rollback - never a
silent chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import audit, events, run_agent_job

ADJACENT = 'recovery.inject="kill:stage=2,step={s},phase=boundary;kill:stage=3,step={s},phase=boundary"'


def run_job(tmp: Path, *overrides: str, max_restarts: int = 4, timeout: int = 300) -> tuple[int, str]:
    return run_agent_job(tmp, *overrides, max_restarts=max_restarts, timeout=timeout)


def test_adjacent_kill_without_checkpoint_is_a_clear_job_wide_error(tmp_path):
    rc, log = run_job(tmp_path, "train.steps=5", "recovery.fallback=checkpoint", ADJACENT.format(s=2))
    assert rc == 1, log
    assert log.count('"event": "failure"') == 2 and '"event": "abort"' in log  # stopped, no respawn loop
    failed = [e for e in events(tmp_path, 0) if e["event"] == "recovery_failed"]
    assert len(failed) == 1 and "no checkpoint to restore" in failed[0]["error"]
    assert "adjacent stage(s) [3] lost too" in failed[0]["error"]
    assert not [e for e in events(tmp_path, 0) if e["event"] == "recovery"]


def test_adjacent_kill_degraded_mode_copies_surviving_neighbours_and_says_so(tmp_path):
    steps = 4
    rc, log = run_job(tmp_path, f"train.steps={steps}", "recovery.fallback=copy_neighbour", ADJACENT.format(s=2))
    assert rc == 0, log
    fb = [e for e in events(tmp_path, 0) if e["event"] == "recovery_fallback"]
    assert sorted(e["action"].split(":")[0] for e in fb) == ["stage 2 replica 0", "stage 3 replica 0"]
    assert all("DEGRADED" in e["action"] and e["method"] == "copy_neighbour" for e in fb)
    (ev,) = [e for e in events(tmp_path, 0) if e["event"] == "recovery"]
    assert sorted(ev["failed_ranks"]) == [2, 3] and ev["resume_step"] == 2  # both failures coalesced into one regroup
    g = ev["generation"]
    dump = {r: torch.load(tmp_path / f"rank{r}" / f"recovery_g{g}.pt", weights_only=False) for r in range(5)}
    # Sources are survivors only: 2 <- 1 and 3 <- 4, never 3 <- rebuilt 2 (no chain).
    for lost, src in ((2, 1), (3, 4)):
        assert all(torch.equal(dump[lost]["model"][k], dump[src]["model"][k]) for k in dump[src]["model"])
    for r in range(5):
        assert [row["step"] for row in audit(tmp_path, r)] == list(range(steps))


@pytest.mark.parametrize("backend", ["deepspeed", pytest.param("megatron", marks=pytest.mark.slow)])
def test_adjacent_kill_checkpoint_fallback_rolls_back_every_rank(tmp_path, backend):
    steps = 7
    rc, log = run_job(tmp_path, f"train.steps={steps}", "recovery.fallback=checkpoint",
                      "recovery.checkpoint_every=2", ADJACENT.format(s=5), f"backend={backend}")
    assert rc == 0, log
    ckdir = tmp_path / "checkpoints"
    # The host framework's own files, per stage: DeepSpeed's, or Megatron-LM's per-rank torch layout.
    own = {"deepspeed": "mp_rank_02_model_states.pt", "megatron": "mp_rank_00_002/model_optim_rng.pt"}[backend]
    assert (ckdir / "step4-g0" / own).exists()
    (rb,) = [e for e in events(tmp_path, 0) if e["event"] == "recovery_rollback"]
    assert rb["checkpoint_step"] == 4 and rb["tag"] == "step4-g0"
    (ev,) = [e for e in events(tmp_path, 0) if e["event"] == "recovery"]
    assert ev["methods"] == ["checkpoint"] and ev["resume_step"] == 4
    g = ev["generation"]
    for r in range(5):
        rows = audit(tmp_path, r)
        first = [row for row in rows if row["generation"] == 0]
        # Real rollback: every rank re-applies step 4 after having applied it once already (or lost it).
        assert [row["step"] for row in rows if row["generation"] == g] == [4, 5, 6]
        # The restored state is bitwise the state every rank had after step 3 (weights + Adam state).
        restored = torch.load(tmp_path / f"rank{r}" / f"recovery_g{g}.pt", weights_only=False)
        assert restored["digest"] == next(row for row in first if row["step"] == 3)["digest"], r
        if r not in (2, 3):
            assert [row["step"] for row in first] == [0, 1, 2, 3, 4]
            # ...and re-applies step 4 exactly as the first time: the LR schedule is rewound with the state.
            again = next(row for row in rows if row["generation"] == g and row["step"] == 4)
            assert again["digest"] == next(row for row in first if row["step"] == 4)["digest"], r
    # The replayed step 4 reproduces the first run's loss (same batch, same restored state).
    losses = [row["loss"] for row in audit(tmp_path, 0) if row["step"] == 4]
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-6)
