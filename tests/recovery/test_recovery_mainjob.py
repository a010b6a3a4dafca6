"""The main job (integration/train.py, Hydra) run fault-tolerantly through launch.agent, as a user types it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import run_agent


def run_main_job(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    # Exactly the documented command (the schedule arrives unquoted, as from a shell), plus a short run.
    p = run_agent(["integration/train.py"], "recovery=checkfree", "recovery.inject=kill:stage=2,step=5,phase=backward",
                  f"output_root={tmp_path}/out", "train.steps=10", "progress=false", *overrides, nproc=4,
                  log_dir=tmp_path / "logs")
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_main_job_kill_stage_through_agent_recovers_and_loss_goes_down(tmp_path):
    p = run_main_job(tmp_path)
    assert '"reason": "killed by SIGKILL"' in p.stderr and "promoted hot spare" in p.stderr
    out = tmp_path / "out"
    for r in range(4):
        s = json.loads((out / f"rank{r}" / "summary.json").read_text())
        assert s["recovery"] == "checkfree" and s["generation"] == 1
        (ev,) = s["recoveries"]
        assert ev["methods"] == ["checkfree"] and ev["resume_step"] == 5
        for key in ("regroup_s", "transfer_s", "first_good_step_s", "loss_before", "loss_after"):
            assert ev[key] is not None, key
        assert (ev["detect_s"] is None) == (r == 2)  # the replacement did not detect anything itself
        assert len(s["loss_history"]) == (10 if r != 2 else 5)  # the replacement trained steps 5..9
    s0 = json.loads((out / "rank0" / "summary.json").read_text())
    assert s0["loss_last3"] < s0["loss_first3"] - 0.3, s0["loss_history"]
    events = [json.loads(x) for x in (out / "rank0" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["recovery"]
    # The event is in every rank's log (the promoted spare writes its own rank's directory) and TensorBoard.
    for r in range(4):
        assert "recovery event" in (out / f"rank{r}" / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "rank0" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"recovery/first_good_step_s", "recovery/transfer_s", "recovery/loss_after", "train/loss"} <= set(tags)


def test_main_job_on_megatron_recovers_the_same_way(tmp_path):
    p = run_main_job(tmp_path, "backend=megatron")
    assert '"reason": "killed by SIGKILL"' in p.stderr
    out = tmp_path / "out"
    for r in range(4):
        s = json.loads((out / f"rank{r}" / "summary.json").read_text())
        assert s["backend"] == "megatron" and s["generation"] == 1
        (ev,) = s["recoveries"]
        assert ev["methods"] == ["checkfree"] and ev["resume_step"] == 5
        assert len(s["loss_history"]) == (10 if r != 2 else 5)
    s0 = json.loads((out / "rank0" / "summary.json").read_text())
    assert s0["loss_last3"] < s0["loss_first3"] - 0.3, s0["loss_history"]
