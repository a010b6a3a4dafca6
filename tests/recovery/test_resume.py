"""Resume a stopped job (``train.save_every`` / ``train.resume``, integration/resume.py): the continued
run equals an uninterrupted run of the same config bitwise - every loss after the resume point, the
final validation loss and every rank's final weights + optimizer state (``state_digest``).

The job is stopped the way jobs stop: the plain deepspeed launcher's process group SIGKILLed, the
fault-tolerant agent sent SIGTERM, as soon as a checkpoint exists; a checkpoint cut short (a
``.tmp`` directory without the completion marker, as a kill during a save leaves it) is planted
above the newest one and must be ignored, and named, by ``train.resume=auto``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration.config import BAD_INPUT, compose_and_check
from integration.resume import MARKER, find_latest
from integration.runtime.spawn import free_port
from tests.conftest import DEEPSPEED, ROOT

STEPS, EVERY = 12, 2
# Plain launcher: 4 stages; under the agent the recovery preset's 5. A loaded machine may take more than
# the default 60 s to build a rank's first group.
PLAIN = ["preset=recovery_test", "recovery=none", "parallel.stages=4", f"train.steps={STEPS}", "progress=false"]
AGENT = ["preset=recovery_test", f"train.steps={STEPS}", "recovery.rendezvous_timeout_s=300", "progress=false",
         "tensorboard=false"]


def _command(under_agent: bool, out: Path, overrides: list[str]) -> tuple[list[str], int]:
    if under_agent:
        return ([sys.executable, "-m", "launch.agent", "--nproc", "5", "--hot-spares", "0", "--log-dir",
                 str(out / "logs"), "--", "integration/train.py", f"output_root={out}", *AGENT, *overrides], 5)
    return ([DEEPSPEED, "--no_local_rank", "--num_gpus", "4", "--master_port", str(free_port()), "integration/train.py",
             f"output_root={out}", *PLAIN, *overrides], 4)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "SKIPFREE_DEBUG", "HYDRA_FULL_ERROR"):
        env.pop(k, None)
    return env


def launch(under_agent: bool, out: Path, *overrides: str) -> dict[int, dict]:
    cmd, world = _command(under_agent, out, list(overrides))
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return {r: json.loads((out / f"rank{r}" / "summary.json").read_text()) for r in range(world)}


def _pointer_updated(ckpts: Path) -> bool:
    """The framework's pointer file names the newest complete checkpoint (it is replaced right after it)."""
    newest, meta, _ = find_latest(ckpts)
    for name, want in (("latest", newest.name), ("latest_checkpointed_iteration.txt", str(meta["step"]))):
        if (ckpts / name).is_file() and (ckpts / name).read_text() == want:
            return True
    return False


def launch_and_stop(under_agent: bool, out: Path, *overrides: str) -> None:
    """Start the job and stop it as soon as its first checkpoint is complete."""
    cmd, _ = _command(under_agent, out, list(overrides))
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while find_latest(out / "checkpoints") is None or not _pointer_updated(out / "checkpoints"):
            assert p.poll() is None, f"the job ended (exit {p.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 900 s"
            time.sleep(0.02)
        if under_agent:
            p.send_signal(signal.SIGTERM)  # the agent's orderly stop: workers stopped, summary, event
            p.wait(timeout=120)
        else:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank, at once
            p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.parametrize("backend, under_agent", [
    ("deepspeed", False),
    pytest.param("megatron", False, marks=pytest.mark.slow),
    pytest.param("deepspeed", True, marks=pytest.mark.slow),
    pytest.param("megatron", True, marks=pytest.mark.slow),
], ids=["deepspeed", "megatron", "deepspeed-agent", "megatron-agent"])
def test_stopped_job_resumes_bitwise_like_an_uninterrupted_run(tmp_path, backend, under_agent):
    ref = launch(under_agent, tmp_path / "ref", f"backend={backend}")
    run = tmp_path / "run"
    launch_and_stop(under_agent, run, f"backend={backend}", f"train.save_every={EVERY}")
    ckpts = run / "checkpoints"
    newest, meta, _ = find_latest(ckpts)
    step = int(meta["step"])
    assert step % EVERY == 0 and 0 < step < STEPS, step
    # The framework's own layout and pointer file.
    if backend == "deepspeed":
        assert newest.name == f"global_step{step}" and (newest / "mp_rank_00_model_states.pt").is_file()
        assert (ckpts / "latest").read_text() == newest.name
    else:
        assert newest.name == f"iter_{step:07d}" and (newest / "mp_rank_00_000" / "model_optim_rng.pt").is_file()
        assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == str(step)
    # A save cut short above it: the files without the completion marker.
    cut = ckpts / newest.name.replace(str(step), str(step + EVERY)).replace(f"{step:07d}", f"{step + EVERY:07d}")
    cut = cut.with_name(cut.name + ".tmp")
    shutil.copytree(newest, cut)
    (cut / MARKER).unlink()

    resumed = launch(under_agent, run, f"backend={backend}", f"train.save_every={EVERY}", "train.resume=auto")
    log0 = (run / "rank0" / "train.log").read_text()
    assert f"ignored half-written checkpoints (no completion marker, a save was cut short): {cut.name}" in log0
    assert f"resume: {newest}, {step} steps applied; data continues at step {step}" in log0
    for r, s in resumed.items():
        assert s["start_step"] == step, r
        assert s["loss_history"] == ref[r]["loss_history"][step:], (r, s["loss_history"], ref[r]["loss_history"])
        assert s["val_loss_full_model"] == ref[r]["val_loss_full_model"], r
        assert s["state_digest"] == ref[r]["state_digest"], f"rank {r}: final weights / optimizer state differ"
        if under_agent:
            assert s["recoveries"] == [], r
    # The resumed run went on saving; the last checkpoint is the final state.
    assert int(find_latest(ckpts)[1]["step"]) == STEPS


# ----------------------------------------------------------------------------- bad input, up front
BASE = ["preset=recovery_test", "recovery=none", "parallel.stages=4"]


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(BAD_INPUT) as info:
        compose_and_check([*BASE, *overrides])
    return str(info.value)


def _fake_checkpoint(root: Path, step: int, **meta) -> Path:
    name = f"global_step{step}"
    d = root / name
    d.mkdir(parents=True)
    job = {"backend": "deepspeed", "stages": 4, "replicas": 1, "tensor": 1, "world_size": 4, "layout": "ring"}
    (d / MARKER).write_text(json.dumps({"step": step, "tag": name, "job": {**job, **meta}}))
    return d


def test_bad_save_and_resume_settings_are_named_before_any_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    assert _refusal(["train.save_every=-1"]).startswith("train.save_every: must be >= 0")
    msg = _refusal([f"train.resume={tmp_path}/nowhere"])
    assert msg.startswith("train.resume:") and "does not exist" in msg and "train.save_every" in msg
    (tmp_path / "half" / "global_step4.tmp").mkdir(parents=True)
    msg = _refusal([f"train.resume={tmp_path}/half"])
    assert msg.startswith("train.resume:") and "holds none" in msg and "global_step4.tmp" in msg
    other = _fake_checkpoint(tmp_path / "c", 2, stages=5, world_size=5)
    msg = _refusal([f"train.resume={other}"])
    assert msg.startswith("train.resume:") and "stages 5 (now 4)" in msg and "world_size 5 (now 4)" in msg
    msg = _refusal([f"train.resume={other.parent}", "backend=megatron"])  # the directory holding it: its newest
    assert msg.startswith("train.resume:") and "backend 'deepspeed' (now 'megatron')" in msg
    mine = _fake_checkpoint(tmp_path / "d", 2)
    msg = _refusal([f"train.resume={mine}", "train.steps=2"])
    assert msg.startswith("train.resume:") and "already holds 2 applied steps" in msg
    # auto: the newest complete checkpoint under ${output_root}/checkpoints; none there is a fresh start.
    _, checked = compose_and_check([*BASE, f"output_root={tmp_path}/fresh", "train.resume=auto"])
    assert checked.resume_from is None
    _fake_checkpoint(tmp_path / "run" / "checkpoints", 2)
    newer = _fake_checkpoint(tmp_path / "run" / "checkpoints", 10)
    (tmp_path / "run" / "checkpoints" / "global_step12.tmp").mkdir()
    _, checked = compose_and_check([*BASE, f"output_root={tmp_path}/run", "train.resume=auto", "train.steps=20"])
    path, meta, ignored = checked.resume_from
    assert path == newer and meta["step"] == 10 and [p.name for p in ignored] == ["global_step12.tmp"]
