"""The main job's one validation pass (:func:`preflight`), shared by the real run and the dry run.

It runs before any dataset, tokenizer, process group or model exists and before any output file is
written: the typed schema (:mod:`integration.schema`: types, ranges, enums, the failure schedule),
the environment (``WORLD_SIZE``, ``RANK``), cross-field limits (world size vs ``parallel.*``, tensor
parallelism, recovery and megatron limits), the plan (built, checked against the rank grid and
``train.microbatches``, compiled into the per-rank programs) and the data checks that need no
compute (paths exist, text large enough for one sample in each split). Every problem is one
:class:`ConfigError` (``<field>: <problem>; <fix>``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, MissingMandatoryValue, OmegaConfBaseException

from .models.llama import LlamaConfig
from .schema import ConfigError, JobConfig, quote_failure_schedule


def _bad_input() -> tuple[type[Exception], ...]:
    from .plan.routeplan import PlanFormatError
    from .plan.rules import PlanValidationError

    return ConfigError, PlanValidationError, PlanFormatError


#: The exceptions that mean "bad input": one message, exit code 2, nothing trained.
BAD_INPUT: tuple[type[Exception], ...] = _bad_input()


@dataclass
class Preflight:
    """What the checks produced; the trainer uses it instead of rebuilding any of it."""

    job: JobConfig          # the typed, range-checked config
    world_size: int
    rank: int
    stage_nodes: list[list[int]]
    plan: Any               # integration.plan.routeplan.RoutePlan
    program: Any            # integration.runtime.program.Program: what every rank runs
    #: ``train.resume``: (checkpoint directory, its marker, half-written ones ignored), None = from step 0
    resume_from: tuple[Path, dict, list[Path]] | None = None


# ----------------------------------------------------------------------------- environment
def env_int(name: str, default: int, low: int) -> int:
    """An integer environment variable (``WORLD_SIZE=four`` -> a clear error)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(name, f"environment variable is {raw!r}, not an integer",
                          f"set {name} to a whole number >= {low} (the launcher sets it)") from None
    if value < low:
        raise ConfigError(name, f"environment variable is {value}, must be >= {low}", f"set {name} >= {low}")
    return value


def world_size_from_env() -> int:
    return env_int("WORLD_SIZE", 1, 1)


def rank_from_env(world_size: int) -> int:
    rank = env_int("RANK", 0, 0)
    if rank >= world_size:
        raise ConfigError("RANK", f"environment variable is {rank}, outside 0..{world_size - 1} (WORLD_SIZE="
                          f"{world_size})", "launch with deepspeed or launch.agent, which set both")
    return rank


# ----------------------------------------------------------------------------- typed config
def check_known_keys(node: DictConfig, schema: type = JobConfig, prefix: str = "") -> None:
    """Refuse keys the schema does not have (Hydra lets ``+key=value`` add them even to a typed config)."""
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ConfigError(name, "unknown key", f"remove it; {prefix.rstrip('.') or 'the config'} has {known}")
        child = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig) and not child._is_missing():
            check_known_keys(child, hints[key], f"{name}.")


def compose_error(exc: Exception) -> ConfigError:
    """A Hydra composition error (bad override, unknown key, wrong type, unknown group option) as one message."""
    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    if key:
        problem = str(cause).splitlines()[0]
        fix = ("give a whole number" if "Integer" in problem else "use true or false" if "bool" in problem
               else "give a number" if "Float" in problem else "give a list, e.g. [0.9,0.95]" if "List" in problem
               else "fix the value")
        if isinstance(cause, ConfigAttributeError):
            problem, fix = "unknown key", "check the spelling (integration/schema.py lists every key)"
        return ConfigError(key, problem, fix)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    m = re.search(r"Could not find '([^/']+)/([^']*)'", text)
    if m:
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return ConfigError(m.group(1), f"no option {m.group(2)!r}", f"use one of {', '.join(options)}" if options
                           else "check hydra_conf/")
    return ConfigError("overrides", first, "write overrides as key=value (Hydra syntax)")


def compose_and_check(overrides: list[str], config_dir: str | Path | None = None) -> tuple[DictConfig, Preflight]:
    """Compose the job's config from command-line overrides (as Hydra's main would) and run :func:`preflight`.

    Used by ``integration/train.py`` before Hydra creates any output directory, and by tests."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from . import schema  # noqa: F401 (registers the schema)

    config_dir = Path(config_dir or Path(__file__).resolve().parent.parent / "hydra_conf")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose("config", overrides=quote_failure_schedule(list(overrides)))
    except (HydraException, OmegaConfBaseException) as exc:
        raise compose_error(exc) from None
    return cfg, preflight(cfg)


def typed_config(cfg: DictConfig) -> JobConfig:
    """The composed config as :class:`JobConfig`; runs every ``__post_init__`` range check."""
    check_known_keys(cfg)
    try:
        job = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(key, "missing value (???)", f"set {key}=... on the command line") from None
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(key, str(exc).splitlines()[0], "fix the value's type") from None
    if not isinstance(job, JobConfig):
        raise ConfigError("config", f"composed into {type(job).__name__}, not the job schema",
                          "keep `schema` first in hydra_conf/config.yaml's defaults")
    return job


def expected_world_size(job: JobConfig) -> int:
    tensor = job.parallel.tensor if job.backend.name == "megatron" else 1
    return job.parallel.stages * job.parallel.replicas * tensor


def stage_nodes_for(job: JobConfig) -> list[list[int]]:
    """Stage -> replica -> global rank of the backend's rank grid (megatron: rank T*(r + D*s), the
    tensor-rank-0 member of that TP group; DeepSpeed: s*D + r)."""
    T = job.parallel.tensor if job.backend.name == "megatron" else 1
    S, D = job.parallel.stages, job.parallel.replicas
    return [[T * (r + D * s) for r in range(D)] for s in range(S)]


def model_config(cfg: Any, vocab_size: int) -> LlamaConfig:
    """The model's config from ``model.*`` (a DictConfig or :class:`ModelConfig`) and the data's vocabulary."""
    m = cfg.model
    ffn = m.ffn_hidden if not isinstance(m, DictConfig) else m.get("ffn_hidden")
    return LlamaConfig(vocab_size=int(vocab_size), d_model=int(m.d_model), n_heads=int(m.n_heads),
                       ffn_hidden=None if ffn is None else int(ffn), seq_len=int(m.seq_len),
                       rope_theta=float(m.rope_theta), init_std=float(m.init_std))


def _field_of(message: str, default: str) -> str:
    """The config key a library message starts with (``model.d_model (..) must ..`` -> ``model.d_model``)."""
    head = message.split(" ", 1)[0].rstrip(":")
    return head if "." in head and head.split(".", 1)[0] in JobConfig.__dataclass_fields__ else default


def as_config_error(exc: Exception, default_field: str, fix: str = "") -> ConfigError:
    """A library's ValueError as a :class:`ConfigError` on the key its message starts with."""
    text = str(exc)
    key = _field_of(text, default_field)
    if text.startswith(key + ":"):
        text = text[len(key) + 1:].lstrip()
    return ConfigError(key, text, fix)


def check_layout(job: JobConfig, world_size: int) -> None:
    """World size, tensor parallelism, layout and backend limits."""
    par, name = job.parallel, job.backend.name
    if name == "deepspeed" and par.tensor != 1:
        raise ConfigError("parallel.tensor", "tensor parallelism is available with backend=megatron only",
                          "set parallel.tensor=1 or backend=megatron")
    want = expected_world_size(job)
    if world_size != want:
        tp = f" x parallel.tensor ({par.tensor})" if name == "megatron" else ""
        raise ConfigError("parallel", f"world size {world_size} does not fit parallel.stages ({par.stages}) x "
                          f"parallel.replicas ({par.replicas}){tp} = {want}",
                          f"launch {want} ranks (deepspeed --num_gpus {want}) or change parallel.*")
    if name == "megatron" and job.model.n_heads % par.tensor:
        raise ConfigError("parallel.tensor", f"{par.tensor} does not divide model.n_heads={job.model.n_heads} "
                          f"(megatron splits the heads across tensor-parallel ranks)",
                          "pick parallel.tensor dividing model.n_heads")
    kind, layout = job.routing.kind, job.model.layout
    if kind in ("skip", "planned") and layout == "linear" and par.stages < 3:
        raise ConfigError("parallel.stages", "skipping with model.layout=linear needs at least 3 stages (the last "
                          "stage holds the loss and is never skipped)", "set parallel.stages>=3 or routing=full")
    if kind in ("checkfree_plus", "planned") and layout != "ring":
        raise ConfigError("model.layout", f"routing={kind} needs the home-stage ring", "set model.layout=ring")
    try:
        model_config(job, vocab_size=job.data.vocab_size or 256).validate()
    except ValueError as exc:
        raise as_config_error(exc, "model") from None


def check_recovery(job: JobConfig) -> None:
    """The fault-tolerant path's limits (today's coverage, docs/recovery.md, docs/replan.md)."""
    if job.routing.replan.enabled:
        check_replan(job)
    if not job.recovery.enabled:
        return
    if job.routing.resample_every:
        raise ConfigError("routing.resample_every", "not supported with recovery (every generation must run one "
                          "fixed plan)", "set routing.resample_every=0")
    if job.backend.name == "megatron":
        if job.parallel.tensor != 1:
            raise ConfigError("parallel.tensor", f"recovery with backend=megatron supports parallel.tensor=1 only "
                              f"(the tensor-parallel all-reduces inside megatron's layers are not failure-aware)",
                              "set parallel.tensor=1 or backend=deepspeed")
        if job.model.layout != "ring":
            raise ConfigError("model.layout", "recovery with backend=megatron needs the ring layout (the rebuild "
                              "ladder numbers stages as the ring does)", "set model.layout=ring")


def check_replan(job: JobConfig) -> None:
    """``routing.replan``'s limits: what the survivors' smaller group can run today (docs/replan.md)."""
    fix = "set routing.replan.enabled=false"
    if not job.recovery.enabled:
        raise ConfigError("routing.replan.enabled", "re-planning around a lost rank runs in the fault-tolerant job",
                          f"add recovery=checkfree (under python -m launch.agent), or {fix}")
    if job.backend.name != "deepspeed" and not job.routing.replan.drift:
        raise ConfigError("routing.replan.enabled", f"the survivors' smaller group is built for backend=deepspeed "
                          f"only (backend={job.backend.name}: there a lost rank waits for its replacement, and only "
                          f"re-planning on measured drift runs)", f"add routing.replan.drift=true, set "
                          f"backend=deepspeed, or {fix}")
    if job.recovery.home_replica:
        raise ConfigError("routing.replan.enabled", "home mirrors are placed by rank and are not re-placed in a "
                          "smaller group", f"set recovery.home_replica=false, or {fix}")
    if job.recovery.checkpoint_every:
        raise ConfigError("routing.replan.enabled", "checkpoints count every rank of the job as a writer, a "
                          "smaller group would never complete one", f"set recovery.checkpoint_every=0, or {fix}")


# ----------------------------------------------------------------------------- plan
def build_plan(job: JobConfig, stage_nodes: list[list[int]], step: int = 0):
    """The plan for ``step`` as configured (``routing.resample_every`` redraws it)."""
    from .plan.from_config import plan_from_config

    return plan_from_config(_View(job.routing), stage_nodes, job.train.microbatches, job.model.layout,
                            _View(job.cluster), step)


class _View:
    """A config dataclass as :func:`integration.plan.from_config.plan_from_config` reads a DictConfig
    (attributes and ``get``, where None means unset)."""

    def __init__(self, node: Any):
        self._r = node

    def __getattr__(self, key: str) -> Any:
        return getattr(self._r, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self._r, key, default)
        return default if value is None else value


def rules_of(cfg: Any):
    """The :class:`integration.plan.rules.Rules` of ``routing.rules`` (unset keys keep the rule's default)."""
    from .plan.rules import Rules

    rules = cfg.routing.get("rules") if isinstance(cfg, DictConfig) else cfg.routing.rules
    if rules is None:
        return Rules()
    items = rules.overrides() if hasattr(rules, "overrides") else dict(rules)
    return Rules.from_mapping({k: v for k, v in items.items() if v is not None})


def check_plan(job: JobConfig, plan, stage_nodes: list[list[int]]) -> None:
    """The plan against the backend's rank grid, ``train.microbatches`` and every rule."""
    from .plan.rules import PlanValidationError, check_fits_grid

    try:
        rules = rules_of(job)
    except ValueError as exc:
        raise as_config_error(exc, "routing.rules") from None
    if plan.num_stages != job.parallel.stages:
        raise ConfigError("routing", f"the plan has {plan.num_stages} stages but parallel.stages is "
                          f"{job.parallel.stages}", "use a plan built for this layout")
    framework = "megatron" if job.backend.name == "megatron" else "DeepSpeed"
    try:
        check_fits_grid(plan, stage_nodes, job.train.microbatches, rules, framework,
                        f"stage s, replica r -> rank {'T*(s*D+r)' if framework == 'megatron' else 's*D+r'}",
                        "train.microbatches")
    except PlanValidationError as exc:
        raise ConfigError("routing.path" if job.routing.kind == "file" else "routing", str(exc),
                          "fix the plan, or routing.rules.* where a limit should differ") from None
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise as_config_error(exc, "routing.path" if job.routing.kind == "file" else "routing", "rebuild the plan for this parallel.* layout and train.microbatches") from None


def _load_plan(job: JobConfig, stage_nodes: list[list[int]]):
    from .plan.routeplan import PlanFormatError

    if job.routing.kind == "file":
        path = Path(os.path.expanduser(job.routing.path))
        if path.is_dir():
            raise ConfigError("routing.path", f"{path} is a directory", "give the plan's JSON file")
        if not path.is_file():
            raise ConfigError("routing.path", f"plan file not found: {path}", "write one with python -m "
                              "integration.plan plan ... or fix the path")
    try:
        return build_plan(job, stage_nodes)
    except (PlanFormatError, FileNotFoundError) as exc:
        raise as_config_error(exc, "routing.path" if job.routing.kind == "file" else "routing") from None
    except ValueError as exc:
        raise as_config_error(exc, "routing") from None
    except (TypeError, AttributeError, KeyError, IndexError, RecursionError, UnicodeDecodeError) as exc:
        if job.routing.kind != "file":
            raise
        raise ConfigError("routing.path", f"not a RoutePlan file ({type(exc).__name__}: {exc})",
                          "give a plan written by python -m integration.plan plan") from None


# ----------------------------------------------------------------------------- data
def check_data(job: JobConfig) -> None:
    """The data checks that need no tokenizer: paths exist, enough text for one sample per split."""
    from .data.corpus import resolve_paths

    d, seq = job.data, job.model.seq_len
    if d.source == "text":
        try:
            files = resolve_paths(list(d.paths), "data.paths")
        except ValueError as exc:
            raise as_config_error(exc, "data.paths") from None
        # Byte-level tokenizers never make more tokens than bytes, plus one EOS per document.
        bound = sum(f.stat().st_size for f in files) + len(files)
        _check_split_sizes(bound, d.val_fraction, seq, "data.paths", "bytes of text")
    elif d.source == "megatron":
        from .data.dataset import check_megatron_files

        try:
            prefix = check_megatron_files(d.prefix)
        except ValueError as exc:
            raise as_config_error(exc, "data.prefix") from None
        # Token ids take at least one byte each in megatron's .bin (uint8 is its narrowest dtype).
        bound = os.path.getsize(prefix + ".bin")
        _check_split_sizes(bound, d.val_fraction, seq, "data.prefix", "tokens at most")


def _check_split_sizes(tokens_bound: int, val_fraction: float, seq: int, field: str, what: str) -> None:
    n_val = int(tokens_bound * val_fraction)
    if tokens_bound - n_val - 1 < seq:
        raise ConfigError(field, f"{tokens_bound} {what}: too small for one training sample of model.seq_len+1 = "
                          f"{seq + 1} tokens", "use more text or a smaller model.seq_len")
    if n_val - 1 < seq:
        need = math.ceil((seq + 1) / val_fraction)
        raise ConfigError("data.val_fraction", f"the validation split would hold at most {n_val} tokens, fewer "
                          f"than model.seq_len+1 = {seq + 1}",
                          f"raise data.val_fraction or use more text (about {need} tokens at this fraction)")


# ----------------------------------------------------------------------------- the pass
def preflight(cfg: DictConfig) -> Preflight:
    """Every check that needs no compute, in one pass; raises :class:`ConfigError` (or the plan's
    ``PlanValidationError``) before anything is built or written."""
    job = typed_config(cfg)
    world_size = world_size_from_env()
    rank = rank_from_env(world_size)
    check_layout(job, world_size)
    check_recovery(job)
    stage_nodes = stage_nodes_for(job)
    plan = _load_plan(job, stage_nodes)
    check_plan(job, plan, stage_nodes)
    program = compile_job_plan(job, plan)
    check_data(job)
    return Preflight(job=job, world_size=world_size, rank=rank, stage_nodes=stage_nodes, plan=plan,
                     program=program, resume_from=check_resume(job, world_size))


def job_shape(job: JobConfig, world_size: int) -> dict:
    """What a resume checkpoint must share with the job that continues it (its marker records it)."""
    p = job.parallel
    return {"backend": job.backend.name, "stages": p.stages, "replicas": p.replicas, "tensor": p.tensor,
            "world_size": world_size, "layout": job.model.layout}


def check_resume(job: JobConfig, world_size: int) -> tuple[Path, dict, list[Path]] | None:
    """``train.resume``: the checkpoint to continue from (``auto``: the newest complete one under
    ``${output_root}/checkpoints``, None when there is none), checked against this job's shape."""
    from .resume import checkpoints_root, find_checkpoint, find_latest

    spec = job.train.resume
    if not spec:
        return None
    found = find_latest(checkpoints_root(job.output_root)) if spec == "auto" else find_checkpoint(spec)
    if found is None:
        return None
    path, meta, _ = found
    want = job_shape(job, world_size)
    diff = [f"{k} {meta.get('job', {}).get(k)!r} (now {v!r})" for k, v in want.items()
            if meta.get("job", {}).get(k) != v]
    if diff:
        raise ConfigError("train.resume", f"{path} was written by another job shape: {', '.join(diff)}",
                          "resume with the same backend, parallel.* and model.layout (and as many ranks)")
    replacement = bool(os.environ.get("SKIPFREE_SPARE")) or os.environ.get("SKIPFREE_JOINING") == "1"
    if int(meta["step"]) >= job.train.steps and not replacement:  # (launch.agent's replacements load nothing)
        raise ConfigError("train.resume", f"{path} already holds {meta['step']} applied steps, train.steps is "
                          f"{job.train.steps}", f"set train.steps above {meta['step']} to train further")
    return found


def compile_job_plan(job: JobConfig, plan: Any) -> Any:
    """The main job's one compile of ``plan`` (preflight and every resample): megatron's backend
    hands every stage the batch, so its programs carry it along the route."""
    from .runtime.program import compile_plan

    return compile_plan(plan, job.routing.max_inflight, carry_batch=job.backend.name == "megatron")


def validate_config(cfg: DictConfig, world_size: int | None = None) -> Preflight:
    """:func:`preflight` with ``WORLD_SIZE`` given (tests, tools)."""
    if world_size is None:
        return preflight(cfg)
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        return preflight(cfg)
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old
