"""Bad input is refused by the main job's one preflight, with one message naming the field.

Table-driven over generated bad inputs (Hydra overrides of every field kind, NaN/inf, truncating
floats, strings as bools, unknown keys, plan files, data paths, world sizes). Each case runs the
real validation in-process (``compose_and_check``: Hydra composition against the typed schema, then
``preflight``), as ``integration/train.py`` does before Hydra writes anything; a sample runs as real
2-rank launches through the deepspeed launcher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration.config import BAD_INPUT, compose_and_check
from integration.plan import full_pipeline, grid_stage_nodes
from integration.runtime.spawn import free_port

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


# ----------------------------------------------------------------------------- the table
def _field_cases() -> list[tuple[list[str], str]]:
    """(overrides, field the message must name) for every typed field."""
    cases: list[tuple[list[str], str]] = []
    ints_ge1 = ["train.steps", "train.micro_batch_size", "train.microbatches", "train.val_microbatches",
                "model.d_model", "model.n_heads", "model.layers_per_stage", "model.seq_len", "parallel.replicas",
                "parallel.tensor", "data.max_bytes"]
    ints_ge0 = ["train.warmup_steps", "train.eval_every", "train.save_every", "train.seed", "routing.seed",
                "routing.resample_every", "data.seed"]
    for key in ints_ge1 + ints_ge0 + ["parallel.stages"]:
        cases.append(([f"{key}=4.7"], key))          # a float is never truncated
        cases.append(([f"{key}=abc"], key))          # not a number
    for key in ints_ge1:
        cases.append(([f"{key}=0"], key))
    for key in ints_ge0:
        cases.append(([f"{key}=-1"], key))
    cases += [(["parallel.stages=1"], "parallel.stages"), (["parallel.stages=-4"], "parallel.stages"),
              (["routing.max_inflight=0"], "routing.max_inflight"), (["routing.max_inflight=-2"], "routing.max_inflight"),
              (["routing.max_inflight=1.5"], "routing.max_inflight"), (["routing.path_length=1"], "routing.path_length"),
              (["routing.memory=0"], "routing.memory"), (["model.ffn_hidden=0"], "model.ffn_hidden"),
              (["model.ffn_hidden=12.5"], "model.ffn_hidden"), (["data.vocab_size=1"], "data.vocab_size"),
              (["data.vocab_size=1024.5"], "data.vocab_size")]
    floats = {"train.lr": "-1", "train.min_lr": "-0.1", "train.weight_decay": "-0.1", "train.grad_clip": "-1",
              "model.rope_theta": "0", "model.init_std": "-0.02", "routing.skip_ratio": "1.0",
              "routing.swap_prob": "1.5", "data.val_fraction": "0"}
    for key, out_of_range in floats.items():
        for bad in ("nan", "inf", "-inf", "abc", out_of_range):
            cases.append(([f"{key}={bad}"], key))
    cases += [(["train.lr=0"], "train.lr"), (["routing.swap_prob=-0.1"], "routing.swap_prob"),
              (["routing.skip_ratio=-0.2"], "routing.skip_ratio"), (["data.val_fraction=1"], "data.val_fraction"),
              (["train.min_lr=0.1"], "train.min_lr")]
    for key in ("tensorboard", "progress", "dry_run", "train.bf16"):
        cases.append(([f"{key}=maybe"], key))
        cases.append(([f"{key}=truthy"], key))
    cases += [(["train.betas=[0.9]"], "train.betas"), (["train.betas=[0.9,1.0]"], "train.betas[1]"),
              (["train.betas=[-0.1,0.9]"], "train.betas[0]"), (["train.betas=[nan,0.9]"], "train.betas[0]"),
              (["train.betas=3"], "train.betas"), (["train.betas=[0.9,0.95,0.99]"], "train.betas")]
    choices = {"model.layout": "zigzag", "routing.kind": "zigzag", "routing.gradient_rule": "sometimes",
               "data.source": "web", "data.tokenizer": "words", "backend.name": "jax"}
    cases += [([f"{k}={v}"], k) for k, v in choices.items()]
    cases += [(["routing=zigzag"], "routing"), (["model=huge"], "model"), (["parallel=pp99"], "parallel"),
              (["data=web"], "data"), (["backend=jax"], "backend"), (["recovery=maybe"], "recovery")]
    cases += [(["+foo=1"], "foo"), (["+train.foo=1"], "train.foo"), (["+routing.rules.foo=1"], "routing.rules.foo"),
              (["train.learning_rate=1"], "train.learning_rate"), (["model.dmodel=3"], "model.dmodel"),
              (["routing.rules.max_swaps=x"], "routing.rules.max_swaps"),
              (["routing.rules.max_jump=-1"], "routing.rules.max_jump"),
              (["routing.rules.equal_visits=maybe"], "routing.rules.equal_visits")]
    rec = ["recovery=checkfree"]
    for key in ("lr_scale", "heartbeat_s", "poll_s", "rendezvous_timeout_s", "confirm_timeout_s"):
        cases += [([*rec, f"recovery.{key}={bad}"], f"recovery.{key}") for bad in ("nan", "0", "-1")]
    cases += [([*rec, "recovery.rate_per_hour=-1"], "recovery.rate_per_hour"),
              ([*rec, "recovery.rate_per_hour=inf"], "recovery.rate_per_hour"),
              ([*rec, "recovery.rate_per_hour=2"], "recovery.iteration_seconds"),
              ([*rec, "recovery.checkpoint_every=-1"], "recovery.checkpoint_every"),
              ([*rec, "recovery.checkpoint_every=2.5"], "recovery.checkpoint_every"),
              ([*rec, "recovery.home_replica=maybe"], "recovery.home_replica"),
              ([*rec, "recovery.fallback=pray"], "recovery.fallback"),
              ([*rec, "recovery.weight_statistic=l3"], "recovery.weight_statistic"),
              ([*rec, "recovery.name=magic"], "recovery.name"),
              ([*rec, "+recovery.colour=red"], "recovery.colour"),
              ([*rec, "recovery.inject=kill:stage=x,step=1"], "recovery.inject"),
              ([*rec, "recovery.inject=explode:stage=1,step=2"], "recovery.inject"),
              ([*rec, "recovery.inject=kill:step=2"], "recovery.inject"),
              ([*rec, "recovery.inject=kill:stage=1,step=2,phase=sideways"], "recovery.inject"),
              ([*rec, "recovery.inject=kill:stage=1,step=2,colour=red"], "recovery.inject"),
              ([*rec, "routing.resample_every=2"], "routing.resample_every"),
              ([*rec, "backend=megatron", "model.layout=linear"], "model.layout")]
    # cross-field limits (world size set per case below where it differs from 4)
    cases += [(["parallel.tensor=2"], "parallel.tensor"), (["model.n_heads=3"], "model.d_model"),
              (["model.d_model=120", "model.n_heads=8"], "model.d_model"),
              (["routing=checkfree_plus", "model.layout=linear"], "model.layout"),
              (["routing=planned", "model.layout=linear"], "model.layout"),
              (["train.microbatches=4"], "routing"),
              (["routing=file"], "routing.path"), (["data=text"], "data.paths"), (["data=megatron"], "data.prefix"),
              (["data.source=text"], "data.paths"), (["data.vocab_size=null"], "data.vocab_size"),
              (["a b"], "overrides")]
    return cases


def _env_cases() -> list[tuple[list[str], dict, str]]:
    """(overrides, environment, field) for world sizes and ranks."""
    return [([], {"WORLD_SIZE": "3"}, "parallel"), ([], {"WORLD_SIZE": "8"}, "parallel"),
            ([], {"WORLD_SIZE": "four"}, "WORLD_SIZE"), ([], {"WORLD_SIZE": "0"}, "WORLD_SIZE"),
            ([], {"WORLD_SIZE": "-2"}, "WORLD_SIZE"), ([], {"WORLD_SIZE": "4", "RANK": "7"}, "RANK"),
            ([], {"WORLD_SIZE": "4", "RANK": "x"}, "RANK"), (["parallel=pp6"], {"WORLD_SIZE": "4"}, "parallel"),
            (["backend=megatron", "parallel.tensor=3"], {"WORLD_SIZE": "12"}, "parallel.tensor"),
            (["parallel.stages=2", "model.layout=linear"], {"WORLD_SIZE": "2"}, "parallel.stages"),
            (["recovery=checkfree", "backend=megatron", "parallel.tensor=2"], {"WORLD_SIZE": "8"}, "parallel.tensor")]


def _plan_dict(**change) -> dict:
    d = full_pipeline(grid_stage_nodes(4, 1), 6).to_dict()
    d.update(change)
    return d


def _plan_files(tmp: Path) -> list[tuple[str, str]]:
    """(file contents, field) of plan files that do not fit the default 4-stage, 6-microbatch job."""
    four_mb = full_pipeline(grid_stage_nodes(4, 1), 4).to_dict()
    six_stages = full_pipeline(grid_stage_nodes(6, 1), 6).to_dict()
    other_nodes = full_pipeline([[10], [11], [12], [13]], 6).to_dict()
    bad_hop = _plan_dict()
    bad_hop["microbatches"][0]["hops"][0]["stage"] = 9
    linear = full_pipeline(grid_stage_nodes(4, 1), 6, "linear").to_dict()
    nested = "[" * 5000 + "]" * 5000  # deeper than Python's recursion limit
    return [(json.dumps(four_mb), "routing.path"), (json.dumps(six_stages), "routing"),
            (json.dumps(other_nodes), "routing.path"), (json.dumps(_plan_dict(microbatches=[])), "routing.path"),
            (json.dumps(bad_hop), "routing.path"), (json.dumps(linear), "routing.path"),
            (json.dumps([1, 2, 3]), "routing.path"), (nested, "routing.path"),
            (json.dumps(_plan_dict(memory="abc")), "routing.path"), ("not json {", "routing.path"),
            (json.dumps(_plan_dict(version=99)), "routing.path"), ("", "routing.path")]


def _data_cases(tmp: Path) -> list[tuple[list[str], str]]:
    tiny = tmp / "tiny.txt"
    tiny.write_text("x = 1\n")
    small = tmp / "small.txt"  # enough for training samples, not for a validation sample at 1%
    small.write_text("def f(x):\n    return x\n" * 150)
    (tmp / "adir").mkdir()
    (tmp / "garbage.bin").write_bytes(b"\x07" * 100_000)  # a megatron pair whose index is not one
    (tmp / "garbage.idx").write_bytes(b"not an index" * 10)
    return [(["data=text", "data.paths=[/nonexistent/dir/*.txt]"], "data.paths"),
            (["data=text", "data.paths=[/nonexistent/file.txt]"], "data.paths"),
            (["data=text", f"data.paths=[{tmp / 'adir'}]"], "data.paths"),
            (["data=text", f"data.paths=[{tiny}]"], "data.paths"),
            (["data=text", f"data.paths=[{small}]", "data.val_fraction=0.01"], "data.val_fraction"),
            (["data=megatron", "data.prefix=/nonexistent/corpus"], "data.prefix"),
            (["data=megatron", "data.prefix=/nonexistent/corpus.bin"], "data.prefix"),
            (["data=megatron", f"data.prefix={tmp / 'garbage'}"], "data.prefix"),
            (["routing=file", f"routing.path={tmp / 'adir'}"], "routing.path"),
            (["routing=file", f"routing.path={tmp / 'missing.json'}"], "routing.path")]


FIELD_CASES = _field_cases()
ENV_CASES = _env_cases()


def _refused(overrides: list[str], field: str, tmp_path: Path, monkeypatch, env: dict | None = None) -> str:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(BAD_INPUT) as info:
        compose_and_check([f"output_root={tmp_path}/out", f"data.cache_dir={tmp_path}/cache", *overrides])
    message = str(info.value)
    assert message.startswith(f"{field}: "), f"{overrides}: {message!r} does not start with {field!r}"
    assert "Traceback" not in message and "\n    full_key" not in message
    assert sorted(p for p in tmp_path.rglob("*")) == before, "the checks wrote files"
    return message


def test_the_table_is_large_enough(tmp_path):
    assert len(FIELD_CASES) + len(ENV_CASES) + len(_plan_files(tmp_path)) + len(_data_cases(tmp_path)) >= 150


@pytest.mark.parametrize("overrides,field", FIELD_CASES, ids=[" ".join(c[0]) for c in FIELD_CASES])
def test_bad_override_refused(overrides, field, tmp_path, monkeypatch):
    _refused(overrides, field, tmp_path, monkeypatch)


@pytest.mark.parametrize("overrides,env,field", ENV_CASES,
                         ids=[" ".join([*c[0], *(f"{k}={v}" for k, v in c[1].items())]) for c in ENV_CASES])
def test_bad_environment_refused(overrides, env, field, tmp_path, monkeypatch):
    _refused(overrides, field, tmp_path, monkeypatch, env)


@pytest.mark.parametrize("index", range(12))
def test_bad_plan_file_refused(index, tmp_path, monkeypatch):
    text, field = _plan_files(tmp_path)[index]
    path = tmp_path / "plan.json"
    path.write_text(text)
    _refused(["routing=file", f"routing.path={path}"], field, tmp_path, monkeypatch)


@pytest.mark.parametrize("index", range(10))
def test_bad_data_refused(index, tmp_path, monkeypatch):
    overrides, field = _data_cases(tmp_path)[index]
    _refused(overrides, field, tmp_path, monkeypatch)


def test_messages_name_the_users_keys(tmp_path, monkeypatch):
    """The microbatch count is the user's train.microbatches, never an engine setting."""
    path = tmp_path / "plan.json"
    full_pipeline(grid_stage_nodes(4, 1), 4).save(path)
    message = _refused(["routing=file", f"routing.path={path}"], "routing.path", tmp_path, monkeypatch)
    assert "train.microbatches=6" in message and "gradient_accumulation_steps" not in message
    message = _refused(["train.microbatches=4"], "routing", tmp_path, monkeypatch)
    assert "train.microbatches" in message and "routing.microbatches" not in message


@pytest.mark.parametrize("overrides", [[], ["routing=full"], ["parallel.stages=5", "routing=checkfree_plus"], ["parallel=pp6",
                         "train.microbatches=10"], ["backend=megatron"], ["recovery=checkfree",
                         "recovery.inject=kill:stage=2,step=5,phase=backward"], ["routing.max_inflight=2"]])
def test_good_configs_pass(overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6" if "parallel=pp6" in overrides else "5" if "parallel.stages=5" in overrides
                       else "4")
    monkeypatch.delenv("RANK", raising=False)
    cfg, checked = compose_and_check([f"output_root={tmp_path}/out", *overrides])
    assert checked.plan.num_stages == cfg.parallel.stages
    assert checked.program.stage_visits == checked.plan.stage_visits()
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- real launches
LAUNCH_SAMPLE = [(["parallel.stages=4.7"], "parallel.stages"), (["+foo=1"], "foo"), (["train.lr=nan"], "train.lr"),
                 (["routing.max_inflight=0"], "routing.max_inflight"), (["parallel.stages=3"], "parallel")]


@pytest.mark.parametrize("overrides,field", LAUNCH_SAMPLE, ids=[c[0][0] for c in LAUNCH_SAMPLE])
def test_two_rank_launch_refuses_once(overrides, field, tmp_path):
    """deepspeed --num_gpus 2: rank 0 prints one message, the job exits non-zero, no traceback, no outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [DEEPSPEED, "--no_local_rank", "--num_gpus", "2", "--master_port", str(free_port()), "integration/train.py",
           f"output_root={tmp_path}/out", "parallel=pp2", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {field}: "), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert not (tmp_path / "out").exists()
