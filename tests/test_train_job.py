"""The main job as a user runs it: the deepspeed launcher, Hydra overrides, bad input, outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration.runtime.spawn import free_port
from tests.conftest import ROOT, run_job


def assert_refused(proc, *needles):
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    for n in needles:
        assert n in text, f"{n!r} not in output:\n{text[-3000:]}"
    assert "step 0 loss" not in text


def test_main_job_defaults_train_and_loss_goes_down(tmp_path):
    proc = run_job([], tmp_path, world=4)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "validation loss of the full model" in text
    summaries = [json.loads((tmp_path / "out" / f"rank{r}" / "summary.json").read_text()) for r in range(4)]
    s = summaries[0]
    assert s["routing"] == "skip" and s["steps"] == 120
    assert s["loss_last3"] < s["loss_first3"] - 1.0, s
    assert s["val_loss_full_model"] < s["loss_first3"] - 1.0
    assert abs(s["skip_ratio"] - 1 / 3) < 1e-9 and s["stage_visits"] == [6, 4, 4, 4]
    assert {x["val_loss_full_model"] for x in summaries} == {s["val_loss_full_model"]}  # one value on every rank
    assert (tmp_path / "out" / "rank0" / "plan.json").exists()
    assert list((tmp_path / "out" / "rank0" / "tensorboard").glob("events.out.tfevents.*"))
    for r in range(4):  # every rank writes its own directory and log
        assert (tmp_path / "out" / f"rank{r}" / "train.log").exists()


def test_world_size_that_does_not_fit(tmp_path):
    proc = run_job([], tmp_path, world=3)
    assert_refused(proc, "world size 3", "parallel.stages (4)", "--num_gpus 4")
    assert not list((tmp_path / "out").glob("rank*/summary.json"))


def test_unknown_config_key(tmp_path):
    proc = run_job(["train.learning_rate=1"], tmp_path, env_extra={"WORLD_SIZE": "4"})
    assert_refused(proc, "learning_rate")


def test_plan_for_another_stage_count(tmp_path):
    from integration.plan import full_pipeline, grid_stage_nodes

    path = tmp_path / "plan6.json"
    full_pipeline(grid_stage_nodes(6, 1), 6).save(path)
    proc = run_job(["routing=file", f"routing.path={path}"], tmp_path, env_extra={"WORLD_SIZE": "4"})
    assert_refused(proc, "6 stages", "parallel.stages is 4")


def test_missing_data_path(tmp_path):
    proc = run_job(["data=text", "data.paths=[/nonexistent/dir/*.txt]"], tmp_path,
                   env_extra={"WORLD_SIZE": "4"})
    assert_refused(proc, "data.paths", "/nonexistent/dir/*.txt")


def test_invalid_routing_settings_named(tmp_path):
    proc = run_job(["train.microbatches=4"], tmp_path, env_extra={"WORLD_SIZE": "4"})
    assert_refused(proc, "CC5", "train.microbatches")


def test_dry_run_prints_plan_and_programs(tmp_path):
    proc = run_job(["dry_run=true", "routing=full"], tmp_path, env_extra={"WORLD_SIZE": "4", "RANK": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage visits [6, 6, 6, 6]" in proc.stdout and "rank 3:" in proc.stdout


def test_main_job_megatron_backend_same_metrics(tmp_path):
    proc = run_job(["backend=megatron", "train.steps=12"], tmp_path, world=4)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    s = json.loads((tmp_path / "out" / "rank0" / "summary.json").read_text())
    assert s["backend"] == "megatron" and s["stage_visits"] == [6, 4, 4, 4]
    assert s["loss_last3"] < s["loss_first3"] - 0.3, s
    history = json.loads((tmp_path / "out" / "rank0" / "history.json").read_text())
    assert {"loss", "tokens_per_s", "skip_ratio", "stage_visits", "lr"} <= set(history[0])


def test_planned_routing_from_hydra_config(tmp_path):
    proc = run_job(["dry_run=true", "routing=planned", "cluster=geo-12"], tmp_path,
                   env_extra={"WORLD_SIZE": "4", "RANK": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "L=3" in proc.stdout and "stage visits [6, 4, 4, 4]" in proc.stdout
    plan = json.loads((tmp_path / "out" / "rank0" / "plan.json").read_text())
    assert plan["node_order"] and plan["meta"]


def test_megatron_backend_resamples_the_plan(tmp_path):
    """routing.resample_every on megatron: a new plan every 2 steps (the backend contract's set_plan)."""
    proc = run_job(["backend=megatron", "train.steps=5", "routing.resample_every=2", "train.eval_every=0"],
                   tmp_path, world=4)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    history = json.loads((tmp_path / "out" / "rank0" / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    assert all(h["loss"] == h["loss"] and h["loss"] < 20 for h in history)  # finite losses after each resample
    assert all(h["stage_visits"] == [6, 4, 4, 4] for h in history)


def _compile_once(rank: int, world: int, backend: str, out: str) -> dict:
    """One rank of the main job's construction, counting every compile of a plan into a Program."""
    import integration.runtime.program as program_module
    from integration.config import compose_and_check
    from integration.trainer import Trainer, setup_environment

    compiled = []
    real = program_module.compile_plan

    def counting(plan, max_inflight=None, carry_batch=False):
        compiled.append(plan.num_microbatches)
        return real(plan, max_inflight, carry_batch)

    program_module.compile_plan = counting
    cfg, checked = compose_and_check([f"backend={backend}", "parallel.stages=2", "routing=full", "train.steps=4",
                                      "routing.resample_every=2", "train.micro_batch_size=2", "train.microbatches=2",
                                      "model.d_model=32", "model.n_heads=2", "model.seq_len=16",
                                      "data.tokenizer=bytes", "data.max_bytes=200000", "tensorboard=false",
                                      f"output_root={out}"])
    after_preflight = len(compiled)
    trainer = Trainer(cfg, checked, __import__("pathlib").Path(out) / f"rank{rank}")
    trainer.dist_backend = setup_environment()
    trainer.build_data()
    trainer.setup()
    handed = trainer.backend.program is checked.program
    after_setup = len(compiled)
    trainer.maybe_resample(2)  # a new plan: compiled once, by the trainer, and run as compiled
    resampled = trainer.backend.program is not checked.program and trainer.backend.program.plan is trainer.plan
    loss = trainer.train_step(2).loss
    return {"after_preflight": after_preflight, "after_setup": after_setup, "handed": handed,
            "resampled": resampled, "after_resample": len(compiled), "loss": loss}


def test_the_preflight_program_is_what_the_backend_runs(tmp_path):
    """Compile once: the preflight's Program is handed to the backend (DeepSpeed and megatron-core), a
    resample compiles once in the trainer, and the handed Program trains."""
    from tests.dist_utils import run_workers

    for backend in ("deepspeed", "megatron"):
        for r in run_workers(_compile_once, 2, backend, str(tmp_path / backend)):
            assert (r["after_preflight"], r["after_setup"], r["after_resample"]) == (1, 1, 2), (backend, r)
            assert r["handed"] and r["resampled"] and 0 < r["loss"] < 20, (backend, r)


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_start(tmp_path):
    """torch's JIT loader waits forever on ``<op>/lock``; a start must neither take that lock (a live
    loader's release would fail if anyone removed it) nor wait on one a killed process left behind."""
    import shutil

    built = Path(sys.prefix) / "torch_extensions"
    if not (built / ".skipfree-built").is_file():
        pytest.skip("launch/setup.sh has not built DeepSpeed's CPU op in this venv")
    ext = tmp_path / "ext"
    shutil.copytree(built / "deepspeed_shm_comm", ext / "deepspeed_shm_comm")
    (ext / ".skipfree-built").touch()
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.touch()  # what a loader SIGKILLed inside torch's FileBaton leaves
    script = (
        "import os, torch.distributed as dist\n"
        "from integration.trainer import setup_environment\n"
        "setup_environment()\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:%d', rank=0, world_size=1)\n"
        "from integration.backends.deepspeed.module import ensure_deepspeed_comm\n"
        "ensure_deepspeed_comm()\n"
        "from deepspeed.ops.op_builder.builder import OpBuilder\n"
        "print('OP', OpBuilder._loaded_ops['deepspeed_shm_comm'].__file__)\n" % free_port())
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"OP {ext}/deepspeed_shm_comm/deepspeed_shm_comm.so" in done.stdout
    assert lock.exists()  # never touched: nobody else's lock is ours to remove

