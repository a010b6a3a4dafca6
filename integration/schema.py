"""The main job's typed config schema: one dataclass per ``hydra_conf/`` group, registered in Hydra's
ConfigStore as the schema of ``hydra_conf/config.yaml``.

Composition refuses unknown keys (``+foo=1``) and values of the wrong type (``parallel.stages=4.7``
or ``=abc``, ``tensorboard=maybe``): OmegaConf checks them against these types. The range checks
(finite floats, positive counts, probabilities in [0, 1], ...) are the ``__post_init__`` of each
dataclass, run by ``OmegaConf.to_object`` in :func:`integration.config.preflight`. Every problem is a
:class:`ConfigError` naming the field, the problem and the fix. The choice constants (backends,
layouts, routing kinds, gradient rules, recovery methods) are defined here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from .plan.routeplan import LAYOUTS
from .runtime.gradient import GRADIENT_RULES

BACKENDS = ("deepspeed", "megatron")
ROUTING_KINDS = ("full", "skip", "checkfree_plus", "planned", "file")
DATA_SOURCES = ("stdlib", "text", "megatron")
TOKENIZERS = ("bpe", "bytes")
RECOVERY_METHODS = ("none", "checkfree", "checkfree_plus", "degraded")
FALLBACKS = ("checkpoint", "copy_neighbour", "error")
STATISTICS = ("clipped_l2", "l2", "squared_l2")

__all__ = ["BACKENDS", "ROUTING_KINDS", "GRADIENT_RULES", "LAYOUTS", "DATA_SOURCES", "TOKENIZERS",
           "RECOVERY_METHODS", "FALLBACKS", "STATISTICS", "ConfigError", "JobConfig", "register"]


class ConfigError(ValueError):
    """A config value that cannot work. ``str()`` is ``<field>: <problem>; <fix>``."""

    def __init__(self, field: str, problem: str | None = None, fix: str = ""):
        if problem is None:  # re-raised by OmegaConf with the message only
            field, _, problem = field.partition(": ")
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem}" + (f"; {fix}" if fix else ""))


# ----------------------------------------------------------------------------- checks
def _finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}", f"set {key} to a real value")


def positive(key: str, value: float) -> None:
    """``value`` > 0 (and finite)."""
    _finite(key, value)
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}", f"set {key} to a positive value")


def at_least(key: str, value: float, low: float) -> None:
    """``value`` >= ``low`` (and finite)."""
    _finite(key, value)
    if value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}", f"set {key}={low} or more")


def in_range(key: str, value: float, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> None:
    """``value`` in the interval [low, high] (either end open when asked)."""
    _finite(key, value)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(key, f"must be in {interval}, got {value}", f"set {key} inside {interval}")


def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}",
                          f"set {key}={choices[0]} (or another of these)")


# ----------------------------------------------------------------------------- groups
@dataclass
class BackendConfig:
    """``backend=deepspeed|megatron``."""

    name: str = "deepspeed"

    def __post_init__(self) -> None:
        one_of("backend.name", self.name, BACKENDS)


@dataclass
class ModelConfig:
    """``model=tiny|small``: the LLaMa-style decoder (vocab_size comes from the data)."""

    layout: str = "ring"
    d_model: int = 128
    n_heads: int = 4
    ffn_hidden: Optional[int] = None
    layers_per_stage: int = 1
    seq_len: int = 64
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        one_of("model.layout", self.layout, LAYOUTS)
        for key in ("d_model", "n_heads", "layers_per_stage", "seq_len"):
            at_least(f"model.{key}", getattr(self, key), 1)
        if self.ffn_hidden is not None:
            at_least("model.ffn_hidden", self.ffn_hidden, 1)
        positive("model.rope_theta", self.rope_theta)
        positive("model.init_std", self.init_std)


@dataclass
class ParallelConfig:
    """``parallel=pp4|pp6|pp3x2|...``: world size = stages x replicas (x tensor on megatron)."""

    stages: int = 4
    replicas: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        at_least("parallel.stages", self.stages, 2)
        at_least("parallel.replicas", self.replicas, 1)
        at_least("parallel.tensor", self.tensor, 1)


@dataclass
class RulesConfig:
    """``routing.rules``: overrides of :class:`integration.plan.rules.Rules` (null: the rule's default)."""

    path_length: Optional[int] = None
    max_swaps: Optional[int] = None
    max_swap_distance: Optional[int] = None
    max_swap_total: Optional[int] = None
    max_jump: Optional[int] = None
    equal_visits: Optional[bool] = None
    memory: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("path_length", "memory", "max_swap_distance"):
            if getattr(self, key) is not None:
                at_least(f"routing.rules.{key}", getattr(self, key), 1)
        for key in ("max_swaps", "max_swap_total", "max_jump"):
            if getattr(self, key) is not None:
                at_least(f"routing.rules.{key}", getattr(self, key), 0)

    def overrides(self) -> dict[str, Any]:
        """The keys the user set, for ``Rules.from_mapping``."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ReplanConfig:
    """``routing.replan``: re-plan while training (``docs/replan.md``; off by default)."""

    enabled: bool = False    # a lost rank without a replacement yet: survivors continue on a plan around it
    measure_steps: int = 3   # steps on each side of a switch for its measured gain (the replan event)
    # Measured drift (integration/recovery/drift.py): re-plan on the measured link and compute costs.
    drift: bool = False          # needs enabled=true (the same agreement and recovery path)
    window: int = 5              # steps per measurement window (every rank publishes its timings once per window)
    drift_threshold: float = 0.25  # |measured / predicted iteration - 1| above this is drift
    drift_windows: int = 2       # consecutive drifting windows before the planner runs
    gain_threshold: float = 0.1  # switch when predicted(current) / predicted(new) - 1 exceeds this
    cooldown: int = 10           # steps after a start, switch or kept decision before drift is checked again
    ewma: float = 0.5            # weight of the newest window in the running estimates
    planner_budget_s: float = 2.0  # wall-time cap of one re-plan (the planning rank; the others wait)
    check_every: int = 0         # windows without a decision after which the planner runs anyway (0: on drift only)

    def __post_init__(self) -> None:
        at_least("routing.replan.measure_steps", self.measure_steps, 1)
        at_least("routing.replan.window", self.window, 2)
        positive("routing.replan.drift_threshold", self.drift_threshold)
        at_least("routing.replan.drift_windows", self.drift_windows, 1)
        at_least("routing.replan.gain_threshold", self.gain_threshold, 0)
        at_least("routing.replan.cooldown", self.cooldown, 0)
        in_range("routing.replan.ewma", self.ewma, 0.0, 1.0, low_open=True)
        positive("routing.replan.planner_budget_s", self.planner_budget_s)
        at_least("routing.replan.check_every", self.check_every, 0)
        if self.drift and not self.enabled:
            raise ConfigError("routing.replan.drift", "re-planning on measured drift uses the re-plan agreement "
                              "and its recovery path", "set routing.replan.enabled=true as well")


@dataclass
class RoutingConfig:
    """``routing=full|skip|checkfree_plus|planned|file``: how microbatches route through the stages."""

    kind: str = "full"
    skip_ratio: Optional[float] = None
    path_length: Optional[int] = None
    swap_prob: float = 0.0
    seed: int = 0
    memory: Optional[int] = None
    resample_every: int = 0
    gradient_rule: str = "visited"
    max_inflight: Optional[int] = None
    path: Optional[str] = None
    rules: RulesConfig = field(default_factory=RulesConfig)
    replan: ReplanConfig = field(default_factory=ReplanConfig)

    def __post_init__(self) -> None:
        one_of("routing.kind", self.kind, ROUTING_KINDS)
        one_of("routing.gradient_rule", self.gradient_rule, GRADIENT_RULES)
        if self.skip_ratio is not None:
            in_range("routing.skip_ratio", self.skip_ratio, 0.0, 1.0, high_open=True)
        in_range("routing.swap_prob", self.swap_prob, 0.0, 1.0)
        at_least("routing.seed", self.seed, 0)
        at_least("routing.resample_every", self.resample_every, 0)
        if self.path_length is not None:
            at_least("routing.path_length", self.path_length, 2)
        if self.memory is not None:
            at_least("routing.memory", self.memory, 1)
        if self.max_inflight is not None:
            at_least("routing.max_inflight", self.max_inflight, 1)
        if self.kind == "file" and not self.path:
            raise ConfigError("routing.path", "routing=file needs a plan file", "set routing.path=plan.json")
        if self.kind in ("skip", "planned") and self.skip_ratio is None and self.path_length is None:
            raise ConfigError("routing.skip_ratio", f"routing={self.kind} needs a skip ratio or a path length",
                              "set routing.skip_ratio=0.33 or routing.path_length=L")


@dataclass
class DataConfig:
    """``data=stdlib|text|megatron``."""

    source: str = "stdlib"
    paths: List[str] = field(default_factory=list)
    prefix: Optional[str] = None
    tokenizer: str = "bpe"
    vocab_size: Optional[int] = 1024
    cache_dir: str = "~/.cache/skipfree/data"
    max_bytes: int = 8_000_000
    seed: int = 0
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        one_of("data.source", self.source, DATA_SOURCES)
        one_of("data.tokenizer", self.tokenizer, TOKENIZERS)
        if self.vocab_size is not None:
            at_least("data.vocab_size", self.vocab_size, 2)
        at_least("data.max_bytes", self.max_bytes, 1)
        at_least("data.seed", self.seed, 0)
        in_range("data.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if self.source == "text" and not self.paths:
            raise ConfigError("data.paths", "empty", "list text files or globs: 'data.paths=[corpus/*.txt]'")
        if self.source == "megatron" and not self.prefix:
            raise ConfigError("data.prefix", "required with data=megatron",
                              "set data.prefix=/path/corpus_text_document (without .bin/.idx)")
        if self.source != "megatron" and self.vocab_size is None:
            raise ConfigError("data.vocab_size", f"null is only allowed with data=megatron (inferred from the ids)",
                              "set data.vocab_size=1024")


@dataclass
class ClusterConfig:
    """``cluster=geo-12|5-clusters|single-cluster`` (or ``cluster.path``), used by ``routing=planned``."""

    name: str = "geo-12"
    path: Optional[str] = None


@dataclass
class NetworkConfig:
    """``network.emulate=<cluster file>``: add each link's latency and bandwidth to this job's routed
    transfers in-process (``integration/runtime/netem.py``; node i = rank i). Off (null) by default."""

    emulate: Optional[str] = None

    def __post_init__(self) -> None:
        if self.emulate is None:
            return
        from .plan.cluster import ClusterConfigError, load_cluster  # read up front: a bad file fails before any rank
        try:
            c = load_cluster(self.emulate)
        except (ClusterConfigError, OSError) as exc:
            raise ConfigError("network.emulate", f"cannot use {self.emulate!r}: {exc}",
                              "give a cluster file with nodes and links (schema: docs/planner.md)") from None
        if not c.has_links:
            raise ConfigError("network.emulate", f"{self.emulate!r} has no link for every node pair",
                              "add links or default_link (latency_ms, bandwidth_GiB_per_s) to the file")


@dataclass
class RecoveryConfig:
    """``recovery=none|checkfree|checkfree_plus|degraded`` (fault-tolerant runs under ``launch.agent``)."""

    name: str = "none"
    fallback: str = "checkpoint"
    lr_scale: float = 1.1
    weight_statistic: str = "clipped_l2"
    swaps_on: Optional[bool] = None
    heartbeat_s: float = 0.5
    poll_s: float = 0.05
    rendezvous_timeout_s: float = 60.0
    confirm_timeout_s: float = 30.0
    inject: str = ""
    rate_per_hour: float = 0.0
    iteration_seconds: float = 0.0
    checkpoint_every: int = 0
    checkpoint_dir: str = ""
    home_replica: bool = False
    straggler: str = ""  # tests/benchmarks: "rank=R,factor=F[,step=K]" makes rank R's compute F x slower from step K
    audit: bool = False  # per-step digests + recovery/final state dumps per rank (integration/recovery/audit.py)

    def __post_init__(self) -> None:
        one_of("recovery.name", self.name, RECOVERY_METHODS)
        one_of("recovery.fallback", self.fallback, FALLBACKS)
        one_of("recovery.weight_statistic", self.weight_statistic, STATISTICS)
        positive("recovery.lr_scale", self.lr_scale)
        for key in ("heartbeat_s", "poll_s", "rendezvous_timeout_s", "confirm_timeout_s"):
            positive(f"recovery.{key}", getattr(self, key))
        for key in ("rate_per_hour", "iteration_seconds", "checkpoint_every"):
            at_least(f"recovery.{key}", getattr(self, key), 0)
        if self.rate_per_hour > 0 and self.iteration_seconds <= 0:
            raise ConfigError("recovery.iteration_seconds", "random failures (recovery.rate_per_hour > 0) need the "
                              "iteration time", "set recovery.iteration_seconds to the seconds per step")
        if self.inject:
            from .recovery.inject import parse_schedule  # the failure schedule is read up front
            try:
                parse_schedule(self.inject)
            except (ValueError, TypeError) as exc:
                problem = str(exc).removeprefix("recovery.inject: ")
                raise ConfigError("recovery.inject", problem,
                                  "write mode:stage=S,step=T[,phase=...] entries separated by ';'") from None

        if self.straggler:
            from .recovery.inject import parse_straggler
            try:
                parse_straggler(self.straggler)
            except ValueError as exc:
                raise ConfigError("recovery.straggler", str(exc).removeprefix("recovery.straggler: "),
                                  "write rank=R,factor=F[,step=K] (factor >= 1)") from None

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def settings(self) -> dict[str, Any]:
        """The keys of ``integration.recovery.session.RecoverySettings``."""
        return {k: v for k, v in self.__dict__.items() if k not in ("name", "audit")}


@dataclass
class TrainConfig:
    """``train.*``: optimisation and the iteration's shape."""

    steps: int = 120
    micro_batch_size: int = 4
    microbatches: int = 6
    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 1234
    eval_every: int = 0
    val_microbatches: int = 4
    save_every: int = 0   # resume checkpoint every K steps into ${output_root}/checkpoints (0: none)
    resume: str = ""      # "" | auto (newest complete checkpoint under ${output_root}/checkpoints) | PATH

    def __post_init__(self) -> None:
        for key in ("steps", "micro_batch_size", "microbatches", "val_microbatches"):
            at_least(f"train.{key}", getattr(self, key), 1)
        for key in ("warmup_steps", "eval_every", "seed", "save_every"):
            at_least(f"train.{key}", getattr(self, key), 0)
        positive("train.lr", self.lr)
        at_least("train.min_lr", self.min_lr, 0)
        if self.min_lr > self.lr:
            raise ConfigError("train.min_lr", f"{self.min_lr} is above train.lr={self.lr}",
                              "set train.min_lr <= train.lr")
        at_least("train.weight_decay", self.weight_decay, 0)
        at_least("train.grad_clip", self.grad_clip, 0)
        if len(self.betas) != 2:
            raise ConfigError("train.betas", f"needs two values, got {list(self.betas)}", "set train.betas=[0.9,0.95]")
        for i, b in enumerate(self.betas):
            in_range(f"train.betas[{i}]", b, 0.0, 1.0, high_open=True)
        if self.resume not in ("", "auto"):
            from .resume import find_checkpoint  # a PATH is read up front: a wrong one fails before any rank
            try:
                find_checkpoint(self.resume)
            except FileNotFoundError as exc:
                raise ConfigError("train.resume", str(exc), "give a checkpoint directory written with "
                                  "train.save_every (or the directory holding them), or train.resume=auto") from None


@dataclass
class JobConfig:
    """The whole main job (``hydra_conf/config.yaml``)."""

    backend: BackendConfig = field(default_factory=BackendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_name: str = MISSING
    output_root: str = MISSING
    dry_run: bool = False
    tensorboard: bool = True
    progress: bool = True


def quote_failure_schedule(argv: list[str]) -> list[str]:
    """A failure schedule typed in a shell (``recovery.inject=kill:stage=2,step=5``) arrives unquoted
    and its commas would read as a Hydra sweep: quote it."""
    out = []
    for a in argv:
        key, _, value = a.partition("=")
        if key in ("recovery.inject", "recovery.straggler") and value and value[0] not in "'\"":
            a = f'{key}="{value}"'
        out.append(a)
    return out


def register() -> None:
    """Register :class:`JobConfig` as ``schema`` (the first entry of ``hydra_conf/config.yaml``'s defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=JobConfig)


register()
