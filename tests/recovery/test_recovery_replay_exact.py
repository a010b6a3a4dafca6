"""Replay exactness on the main job: an exact recovery (home mirror, replica copy) followed by the
replay of the aborted step must give a run bitwise equal to one that saw no failure - every step's
loss, the final validation loss and every rank's final weights + Adam state (summary digest).

The kills land mid-backward and mid-forward *after* other stages already accumulated gradients of
the aborted attempt (``after_ops``), which a replay must not add to its own. Reference: the same
command without ``recovery.inject``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_main_job_under_agent



def launch_main_job(out: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    p = run_main_job_under_agent(out, nproc, *overrides)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def results(out: Path, nproc: int) -> dict[int, dict]:
    res = {}
    for r in range(nproc):
        d = out / "out" / f"rank{r}"
        s = json.loads((d / "summary.json").read_text())
        s["losses_by_step"] = {h["step"]: h["loss"] for h in json.loads((d / "history.json").read_text())}
        res[r] = s
    return res


def assert_replay_equals_reference(failed: dict[int, dict], ref: dict[int, dict], method: str, recoveries: int,
                                   killed_rank: int):
    for r, s in failed.items():
        # The killed rank's last replacement joined for the last recovery only.
        want = 1 if r == killed_rank else recoveries
        assert [e["methods"] for e in s["recoveries"]] == [[method]] * want, (r, s["recoveries"])
        # Every step this rank ran (a replacement: from its resume step on) has the reference loss, bitwise.
        for step, loss in s["losses_by_step"].items():
            assert loss == ref[r]["losses_by_step"][step], (r, step, loss, ref[r]["losses_by_step"][step])
        assert s["val_loss_full_model"] == ref[r]["val_loss_full_model"], r
        assert s["state_digest"] == ref[r]["state_digest"], f"rank {r}: final weights / Adam state differ"
    assert len(failed[killed_rank]["losses_by_step"]) > 0


# megatron zeroes its gradient buffers at every step start; it is checked too (slow: its construction
# is the slowest part of a launch here).
@pytest.mark.parametrize("backend", ["deepspeed", pytest.param("megatron", marks=pytest.mark.slow)])
def test_home_loss_mid_backward_and_mid_forward_replays_exactly(tmp_path, backend):
    """CheckFree+ with the home mirror: the home (stage 0) SIGKILLed mid-backward of step 2 (4 ops
    in, body stages already hold gradients of the attempt), its replacement mid-forward of step 4."""
    common = ["parallel=pp6", "routing=checkfree_plus", "recovery=checkfree_plus", "train.steps=6",
              f"backend={backend}"]
    launch_main_job(tmp_path / "ref", 6, *common)
    launch_main_job(tmp_path / "kill", 6, *common, "recovery.inject=kill:stage=0,step=2,phase=backward,"
                    "after_ops=4;kill:stage=0,step=4,phase=forward,after_ops=3")
    assert_replay_equals_reference(results(tmp_path / "kill", 6), results(tmp_path / "ref", 6), "home_mirror", 2, 0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_replica_loss_mid_backward_and_mid_forward_replays_exactly(tmp_path, backend):
    """3 stages x 2 replicas: stage 1 replica 1 SIGKILLed mid-backward, then mid-forward; rebuilt
    by an exact copy of its surviving replica (weights + Adam state)."""
    common = ["parallel=pp3x2", "routing=full", "recovery=checkfree", "train.steps=6", f"backend={backend}"]
    launch_main_job(tmp_path / "ref", 6, *common)
    launch_main_job(tmp_path / "kill", 6, *common, "recovery.inject=kill:stage=1,replica=1,step=2,phase=backward,"
                    "after_ops=3;kill:stage=1,replica=1,step=4,phase=forward,after_ops=2")
    assert_replay_equals_reference(results(tmp_path / "kill", 6), results(tmp_path / "ref", 6), "replica_copy", 2, 3)
