"""Fault-tolerant training for one process: regroup, ladder rebuild, engine rebuild, replay.

:class:`FaultTolerantSession` owns what must survive a peer's failure - the stage module, the
optimizer (with its state) and the LR scheduler, held by a backend (DeepSpeed:
:class:`integration.recovery.engine.FaultTolerantBackend`; megatron-core:
:class:`integration.recovery.megatron_engine.FaultTolerantMegatronBackend`) - and has the backend
rebuild its engine around them on every new generation. Its :meth:`train_step` either applies one committed step or, on a
:class:`PeerFailure`, recovers and returns ``None`` so the caller replays (data is addressed by
step, so the replay uses the same microbatches).

Recovery, on every process of the new generation (survivors and the replacement alike):

1. survivors: wait for the agent's failure record (generation g -> g'), drop the engine, destroy
   the old process group (pending receives of peers fail at once) and init the group of g' under
   the store prefix ``gen<g'>/``; the replacement starts right there;
2. rebuild the module's DeepSpeed groups (same ``new_group`` sequence as a fresh PipelineModule);
3. exchange (failure-aware all-gather): who is joining, the step to resume at, stage gradient
   norms, scheduler state; every rank computes the same :func:`plan_rebuild` actions;
4. transfers in one global action order (survivors -> joiner), the joiner applies the rule
   (exact replica copy / home mirror copy / CheckFree average / partner or neighbour copy) and the
   optimizer surgery;
5. a new engine around the same module/optimizer/scheduler (``backend.rebuild_engine``), counters
   restored.

Several failures recorded close together are coalesced: everybody regroups on the newest
generation (:func:`integration.recovery.rendezvous.settle_generation`). With ``home_replica`` the
home stage (E + H) is mirrored on its neighbour stages (:mod:`integration.recovery.home`) and a lost
home is copied exactly from a surviving mirror. Where the ladder cannot rebuild (adjacent losses, an
edge without swaps, the home stage without a surviving mirror), ``fallback`` decides: a named
degraded mode (``copy_neighbour``), a real rollback of every rank to the last complete DeepSpeed
checkpoint (``checkpoint`` with ``checkpoint_every``), or a clear error that stops the whole job
(``error``, or ``checkpoint`` with no checkpoint yet) - never a silent chain.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from . import rebuild as rb
from .checkpoint import Checkpointer
from .commit import StepCommit
from .context import RankContext
from .detect import ABORT_KEY, FailureMonitor, PeerFailure, failures_between, recovered_key
from .guard import StepGuard
from .events import EventLog
from .home import HomeMirror
from .inject import FailureInjector, parse_schedule, parse_straggler
from .replan import Replanner
from .rendezvous import settle_generation, store_all_gather
from .state import load_stage_state, stage_state
from .transfer import recv_state, send_state


@dataclass
class RecoverySettings:
    """The ``recovery`` config group."""

    fallback: str = "checkpoint"          # checkpoint | copy_neighbour | error
    lr_scale: float = 1.1
    weight_statistic: str = "clipped_l2"  # clipped_l2 | l2 | squared_l2
    swaps_on: bool | None = None          # None: from the plan (builder checkfree_plus)
    heartbeat_s: float = 0.5
    poll_s: float = 0.05
    rendezvous_timeout_s: float = 60.0
    confirm_timeout_s: float = 30.0       # wait for the agent's record after a connection error
    inject: str = ""                      # failure schedule, see integration.recovery.inject
    rate_per_hour: float = 0.0
    iteration_seconds: float = 0.0
    checkpoint_every: int = 0             # fallback=checkpoint: checkpoint every K steps (0: none)
    checkpoint_dir: str = ""              # "" : <output root>/checkpoints
    home_replica: bool = False            # CheckFree+: mirror home (E + H) on its neighbour stages, exact restore
    straggler: str = ""                   # tests/benchmarks: a slower rank (integration/recovery/inject.py)

    @classmethod
    def from_mapping(cls, m: Any) -> "RecoverySettings":
        known = set(cls.__dataclass_fields__)
        data = {k: m[k] for k in (m or {}) if k in known}
        unknown = [k for k in (m or {}) if k not in known and k not in ("name", "enabled")]
        if unknown:
            raise ValueError(f"recovery: unknown keys {unknown}; known: {sorted(known)}")
        s = cls(**data)
        if s.fallback not in rb.FALLBACKS:
            raise ValueError(f"recovery.fallback: {s.fallback!r} is not one of {rb.FALLBACKS}")
        if s.weight_statistic not in rb.STATISTICS:
            raise ValueError(f"recovery.weight_statistic: {s.weight_statistic!r} is not one of {rb.STATISTICS}")
        if not isinstance(s.home_replica, bool):
            raise ValueError(f"recovery.home_replica: must be true or false, got {s.home_replica!r}")
        return s


def _my_straggler(text: str, rank: int):
    """``recovery.straggler`` when it names this (job) rank, else None."""
    s = parse_straggler(text)
    return s if s is not None and s.rank == rank else None


_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")

def _drop_tracebacks(exc: BaseException | None) -> None:
    """Free the frames an exception keeps alive (the interrupted step's executor, its pending p2p
    work), so they are destroyed now, while the old group still exists, and not after the regroup
    (a pending gloo send destroyed after its group is gone can block its process)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


class JobStopped(rb.RecoveryError):
    """A planned job-wide stop (unrecoverable loss): every rank agreed and the store's ``abort`` is set."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


class RecoverableBackend(Protocol):
    """What the session needs from a backend (DeepSpeed and megatron-core implement it).

    ``engine`` drives steps (``global_steps`` and the other counters, ``set_batch_source``,
    ``train_batch`` raising :class:`PeerFailure` for an aborted step); ``module`` is the stage model
    whose state dict :func:`stage_state` reads; ``torch_optimizer`` the torch optimizer holding the
    state (surgery, lr_scale); ``scheduler`` has ``state_dict``/``load_state_dict``.
    """

    engine: Any
    module: Any
    scheduler: Any

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer: ...

    def release_groups(self) -> None:
        """Before the old group is destroyed: drop every object that references it."""

    def regroup(self) -> None:
        """On the new generation's group: recreate the backend's groups (collective, same order everywhere)."""

    def rebuild_engine(self) -> None:
        """A new engine around the kept module, optimizer and scheduler (collective)."""

    def validation_loss(self, batch_source: Any, microbatches_per_home: int) -> float: ...


# make_backend(guard, joining) -> backend: called once the process group exists.
BackendFactory = Callable[[StepGuard, bool], RecoverableBackend]


class FaultTolerantSession:
    """One rank of a fault-tolerant routed training job (see the module docstring).

    ``make_backend`` builds the rank's backend (module, optimizer, scheduler, engine; see
    :class:`RecoverableBackend`) on the current process group; the session keeps it across
    generations, has it regroup and rebuild its engine after every failure. ``checkpoints``
    enables the checkpoint fallback (DeepSpeed only).
    """

    def __init__(self, ctx: RankContext, plan, make_backend: BackendFactory, settings: RecoverySettings,
                 events: EventLog | None = None, on_recovered: Callable[[dict], None] | None = None,
                 checkpoints: Checkpointer | None = None, replan: Replanner | None = None, drift: Any = None):
        self.ctx, self.settings, self.plan = ctx, settings, plan
        self.replan = replan  # routing.replan: survivors continue on a smaller group (integration/recovery/replan.py)
        self.drift = drift  # routing.replan.drift: a DriftReplanner (integration/recovery/drift.py)
        self.members = list(range(ctx.world_size))  # ranks of the current group
        self.events = events or EventLog(None, ctx.rank)
        self.on_recovered = on_recovered
        self.checkpoints = checkpoints
        self.store = ctx.connect()
        self.stage, self.replica = plan.node_stage()[ctx.rank]
        injector = FailureInjector(self.stage, self.replica, parse_schedule(settings.inject),
                                   settings.rate_per_hour, settings.iteration_seconds, generation=ctx.generation,
                                   random_home=settings.home_replica)
        injector.at(0, "startup")
        # Every process settles, the first ranks too: a rank lost before the first group formed makes
        # generation 0 stale, and the others regroup with its replacement instead of waiting for it.
        # Before the first group every rank waits for all (re-planning starts once steps were applied).
        generation = settle_generation(self.store, ctx.world_size, ctx.generation, settings.rendezvous_timeout_s)
        t_settled = time.time()
        # An original rank whose first group never formed: a survivor that has applied nothing.
        self.restarted = not ctx.joining and generation > ctx.generation
        self.monitor = FailureMonitor(ctx.store_host, ctx.store_port, ctx.rank, generation,
                                      heartbeat_s=settings.heartbeat_s, poll_s=settings.poll_s,
                                      confirm_timeout_s=settings.confirm_timeout_s).start()
        injector.generation = generation
        self.guard = StepGuard(self.monitor, StepCommit(self.store, ctx.world_size, self.monitor), generation,
                               injector, straggler=_my_straggler(settings.straggler, ctx.rank))
        self.joining = ctx.joining
        self.pending: dict | None = None  # the recovery in progress (timings for the event)
        self.recoveries: list[dict] = []
        # The group's formation and the backend's construction hold plain collectives (gloo's
        # connect, new_group, DeepSpeed's parameter broadcast and count): a peer lost meanwhile ends
        # this process for the agent to start again (no step applied, nothing lost); the new
        # process settles on the newer generation like one whose first group never formed.
        with self.monitor.construction(f"the construction of generation {generation}'s group and backend"):
            self._meet(generation)
            ctx.init_group(self.store, generation, settings.rendezvous_timeout_s)
            t_group = time.time()
            self.backend = make_backend(self.guard, self.joining or self.restarted)
        # Where a replacement's time goes before the exchange (the recovery event's ``joiner_phases``).
        phases = {"settle_s": t_settled - ctx.started, "group_s": t_group - t_settled,
                  "backend_s": time.time() - t_group, **getattr(self.backend, "build_phases", {})}
        self.home: HomeMirror | None = None
        if settings.home_replica:
            if plan.num_stages < 2:
                raise ValueError(f"recovery.home_replica: needs a home stage and at least one body stage to hold its "
                                 f"mirror, the plan has {plan.num_stages} stage(s)")
            self.home = HomeMirror(plan.stage_nodes, ctx.rank, self.monitor)
            self.home.attach(self.module, self.optimizer)
            self.guard.home = self.home
        if self.joining or self.restarted:
            rec = failures_between(self.store, generation - 1, generation)[-1] if generation > 0 else None
            self.pending = {"generation": generation, "t_fail": rec.failed_at if rec else None, "t_detect": None,
                            "generations": [generation] if self.joining else list(range(1, generation + 1)),
                            "failed_ranks": None if self.joining else [rec.rank] if rec else None,
                            "reasons": None if self.joining else [rec.reason] if rec else None,
                            "t_regroup": time.time(), "joiner_phases": phases}
            if rec is not None:  # from the failure to this process holding its rank (a spare's wake-up)
                phases["assigned_s"] = ctx.started - rec.failed_at
            counters = None if self.joining else dict.fromkeys(_COUNTERS, 0)
            try:
                self._exchange_and_rebuild(counters=counters)
            except PeerFailure as again:  # a survivor died while this replacement was joining
                self._interrupted(again)
                self._regroup_until_rebuilt(generation, counters, dict(self.pending))

    # The state that survives engine rebuilds lives on the backend.
    @property
    def engine(self) -> Any:
        return self.backend.engine

    @property
    def module(self):
        return self.backend.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.torch_optimizer

    @property
    def scheduler(self):
        return self.backend.scheduler

    @property
    def swaps_on(self) -> bool:
        if self.settings.swaps_on is not None:
            return bool(self.settings.swaps_on)
        return self.plan.meta.get("builder") == "checkfree_plus"

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    # ------------------------------------------------------------------ training
    def train_step(self, batch_source) -> float | None:
        """Run the next step; returns its loss, or ``None`` after a recovery (the step is to be replayed).

        With checkpoints on, a due checkpoint is saved right after the step was applied.
        """
        if self.guard.injector is not None:
            self.guard.injector.at(self.engine.global_steps, "boundary")
        self.engine.set_batch_source(batch_source)
        t0 = time.time()
        try:
            loss = float(self.engine.train_batch())
            seconds = time.time() - t0
            if self.replan is not None:
                self.replan.observe_step(seconds)
            if self.drift is not None:
                self.drift.observe(seconds, self.engine.step_trace, self.guard.generation, self.engine.global_steps)
            if self.checkpoints is not None and self.checkpoints.due(self.engine.global_steps):
                self.checkpoints.save(self.engine, self.guard.generation)
        except PeerFailure as failure:
            self.recover(failure)
            return None
        if self.pending is not None:
            self._finish_event(loss)
        if self.drift is not None and self.drift.due(self.engine.global_steps):
            try:
                self.drift.boundary(self)
            except PeerFailure as failure:  # the step is applied; the next one runs on the new generation
                self.recover(failure)
        return loss

    # ------------------------------------------------------------------ recovery
    def recover(self, failure: PeerFailure) -> None:
        """Survivor side: abort the step, regroup on the newest generation, rebuild, new engine."""
        t_raise = time.time()
        _drop_tracebacks(failure)
        t_burst = self._supersede(failure) if self.pending is not None else None
        old = self.guard.generation
        step = self.engine.global_steps
        if self.guard.commit.abort(old, step):
            raise RuntimeError(f"rank {self.ctx.rank}: step {step} was committed but not applied here (bug)")
        counters = {k: getattr(self.engine, k) for k in _COUNTERS}
        self._regroup_until_rebuilt(old, counters, {"t_raise": t_raise, "cause": str(failure)[:300],
                                                    "loss_before": self.guard.last_loss, "t_burst": t_burst})
        self._clear_gradients()

    def _clear_gradients(self) -> None:
        """Before the replay: drop every gradient the aborted attempt accumulated.

        The optimizer step zeroes gradients only after a *committed* step; an attempt aborted
        mid-backward leaves partial sums in ``param.grad`` (DeepSpeed) or DDP's ``main_grad``
        buffers (megatron), which the replay would add to its own (a silently wrong update).
        """
        for p in self.module.parameters():
            p.grad = None
        zero_buffers = getattr(getattr(self.backend, "model", None), "zero_grad_buffer", None)
        if callable(zero_buffers):
            zero_buffers()  # megatron DDP: main_grad lives in contiguous buffers

    def _regroup_until_rebuilt(self, old: int, counters: dict | None, event: dict) -> None:
        """Regroup on the newest generation and rebuild; a failure *during* that (a survivor or the
        replacement dies in the exchange or a transfer) regroups again on the next generation,
        with every unit lost so far rebuilt together from the survivors (nothing applied on a
        survivor before the exchange completes, so nothing is lost or applied twice)."""
        first = old
        # A replacement or restarted process interrupted in its first exchange carries the records it
        # was started for (they precede ``old``): the event names them too.
        earlier = {k: list(event.get(k) or []) for k in ("generations", "failed_ranks", "reasons")}
        t_fail = event.get("t_fail")
        while True:
            self.monitor.wait_for_generation(old, self.settings.confirm_timeout_s)
            new = settle_generation(self.store, self.ctx.world_size, old + 1, self.settings.rendezvous_timeout_s,
                                    members_of=self._group_size)
            records = failures_between(self.store, first, new)
            t_fail = t_fail or min(r.failed_at for r in records)
            self.backend.release_groups()  # drop every reference to the old groups before tearing them down
            gc.collect()
            detected = self.monitor.detected_at  # set_generation resets it
            self.members = self._members(new)
            self.monitor.set_generation(new)
            self.guard.generation = new
            self.guard.commit.world_size = len(self.members)
            if counters is not None:  # a member lost before the new group formed (the round that failed)
                self.guard.injector.at(counters["global_steps"], "regroup")
            try:
                self._form_group(new)
            except PeerFailure as again:  # a member lost while the group formed: regroup on the next one
                self._interrupted(again)
                old = new
                continue
            t_regroup = time.time()
            if self.home is not None:
                self.home.attach(self.module, self.optimizer)  # a backend may have rebuilt its module
            if counters is not None:  # the "recovery" injection point belongs to the round that failed
                self.guard.injector.at(counters["global_steps"], "recovery")
            self.guard.injector.generation = new
            self.pending = {**event, "generation": new, "t_fail": t_fail, "t_regroup": t_regroup,
                            "t_detect": event.get("t_detect") or detected or event.get("t_raise"),
                            "failed_ranks": earlier["failed_ranks"] + [r.rank for r in records],
                            "reasons": earlier["reasons"] + [r.reason for r in records],
                            "generations": earlier["generations"] + [r.generation for r in records]}
            try:
                self._exchange_and_rebuild(counters)
                return
            except PeerFailure as again:
                self._interrupted(again)
                event = {k: v for k, v in self.pending.items()
                         if k in ("t_raise", "cause", "loss_before", "t_detect", "t_burst")}
                old = new

    def _form_group(self, generation: int) -> None:
        """The new generation's gloo group and the backend's groups on it, failure-aware.

        gloo's connect and ``new_group`` block in C++ until their timeout when a member is gone, so
        the members first meet in the store (a poll that sees a recorded failure at once); a member
        lost inside the formation itself surfaces as a ``RuntimeError``, which is that failure once
        the agents record it (else this process's own error, raised as it is)."""
        self._meet(generation)
        try:
            self.ctx.init_group(self.store, generation, self.settings.rendezvous_timeout_s, members=self.members)
            if self.replan is not None:  # the stages this group runs decide the module's topology
                layout = self.replan.layout_of(self.members)
                self.backend.use_layout(layout.program, layout.num_stages, layout.rules)
                why = self.replan.refused(generation)
                if why:
                    self.events.emit("replan_refused", step=None, generation=generation, reason=why)
            self.backend.regroup()
        except RuntimeError as exc:
            if isinstance(exc, PeerFailure):
                raise
            error = self.monitor.confirm_peer_failure(exc)
            raise PeerFailure(f"rank {self.ctx.rank}: a member was lost while generation {generation}'s group formed "
                              f"({error})", self.monitor.latest) from None

    def _meet(self, generation: int) -> None:
        """Every member of ``generation``'s group is alive and about to form it (a store barrier)."""
        store_all_gather(self.store, f"groups/g{generation}", None, self.members.index(self.ctx.rank),
                         len(self.members), self.monitor, self.settings.rendezvous_timeout_s)

    def _interrupted(self, failure: PeerFailure) -> None:
        _drop_tracebacks(failure)
        self.events.emit("recovery_interrupted", step=None, generation=self.guard.generation,
                         cause=str(failure)[:300])

    def _abort_job(self, message: str) -> None:
        """Unrecoverable: tell every agent to stop the job (no respawn loop), then raise.

        Every rank reaches the same decision (the ladder is computed from the same exchange); they
        wait for each other (a few seconds at most) before the stop, so every rank's log and
        events say why the job stopped, not only the fastest one's."""
        self.events.emit("recovery_failed", step=None, error=message)
        # The user-facing paragraph goes out before this rank says it is ready: the agents stop every
        # rank as soon as the abort key is set, which happens only once all ranks printed theirs.
        print(f"rank {self.ctx.rank}: job stopped: {message} (every rank stopped; events.jsonl has it as "
              f"'recovery_failed'; SKIPFREE_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        key = f"abort_ready/g{self.guard.generation}"
        self.store.add(key, 1)
        deadline = time.time() + 5.0
        while int(self.store.add(key, 0)) < len(self.members) and time.time() < deadline:
            time.sleep(0.02)
        self.store.set(ABORT_KEY, message[:500])
        raise JobStopped(message, self.ctx.rank)

    def _exchange_and_rebuild(self, counters: dict | None) -> None:
        """Gather -> check -> plan -> transfer -> apply -> rebuild, on every rank of the new generation."""
        t0 = time.time()
        infos = self._gather(counters)
        survivors, resume = self._check(infos)
        actions = self._plan(infos, survivors, resume)
        if self.replan is not None:
            self._agree_plan(infos, resume)
        if any(a.method == rb.CHECKPOINT for a in actions):
            self._rollback(actions, t0)
            return
        mine, sent = self._transfer(actions)
        t_transfer = time.time()
        if mine is not None:
            self._apply(mine[0], mine[1], survivors[0])
        counters = self._rebuild(counters if counters is not None else dict(survivors[0]["counters"]))
        self.pending.update({"t_exchange": t0, "t_transfer": t_transfer, "t_engine": time.time(),
                             "actions": [a.describe() for a in actions],
                             "methods": sorted({a.method for a in actions}), "bytes_sent": sent,
                             "resume_step": counters["global_steps"],
                             "loss_before": self.pending.get("loss_before") or survivors[0]["loss"],
                             "rebuilt_here": mine[0].method if mine else None})
        if self.on_recovered is not None:
            self.on_recovered({"actions": actions, "received": mine[1] if mine else None, "session": self})

    def _gather(self, counters: dict | None) -> list[dict]:
        """Failure-aware all-gather (through the store): who joins, counters, norms, scheduler, mirrors."""
        info = {"rank": self.ctx.rank, "stage": self.stage, "replica": self.replica, "joining": self.joining,
                "counters": counters, "grad_norm": self.guard.last_grad_norm,
                "scheduler": None if self.joining or self.scheduler is None else self.scheduler.state_dict(),
                "lrs": [g["lr"] for g in self.optimizer.param_groups], "loss": self.guard.last_loss,
                "home_mirrors": self.home.tags() if self.home is not None else {}}
        return store_all_gather(self.store, f"exchange/g{self.guard.generation}", info,
                                self.members.index(self.ctx.rank), len(self.members), self.monitor,
                                self.settings.rendezvous_timeout_s)

    # ------------------------------------------------------------------ re-planning (routing.replan)
    def _members(self, generation: int) -> list[int]:
        """The ranks of ``generation``'s group: every rank, or the survivors while re-planning."""
        if self.replan is None:
            return list(range(self.ctx.world_size))
        return self.replan.members_of(self.store, generation)

    def _group_size(self, generation: int) -> int:
        return len(self._members(generation))

    def _agree_plan(self, infos: list[dict], resume: int) -> None:
        """Every member switches to the generation's plan at ``resume``, or the job stops saying why."""
        absent = sorted(set(range(self.ctx.world_size)) - set(self.members))
        if absent and any(i["joining"] for i in infos):
            self._abort_job(f"re-plan: generation {self.guard.generation} has ranks {absent} absent and a replacement "
                            f"joining at once; the ladder rebuilds only in a full group (start delayed replacements "
                            f"together, launch.agent --respawn-delay)")
        layout, problems = self.replan.agree(self.store, self.guard.generation, self.members, self.monitor,
                                             self.settings.rendezvous_timeout_s, resume)
        if problems:
            self._abort_job("re-plan: the members did not accept the published plan: " + "; ".join(problems))
        if layout.program is not self.backend.program:  # e.g. a replacement joining after a drift switch
            self.backend.use_layout(layout.program, layout.num_stages, layout.rules)

    def _check(self, infos: list[dict]) -> tuple[list[dict], int]:
        """The survivors and the one step they all resume at."""
        survivors = [i for i in infos if not i["joining"]]
        if not survivors:
            self._abort_job("recovery: every rank is joining; nothing survived to rebuild from")
        steps = {i["counters"]["global_steps"] for i in survivors}
        if len(steps) != 1:
            raise RuntimeError(f"recovery: survivors disagree on the step to resume at ({sorted(steps)}); the "
                               f"commit protocol should make this impossible")
        return survivors, next(iter(steps))

    def _plan(self, infos: list[dict], survivors: list[dict], resume: int) -> list[rb.RebuildAction]:
        """The rebuild actions every rank computes alike (:func:`integration.recovery.rebuild.plan_rebuild`)."""
        plan = self.plan
        lost = {(i["stage"], i["replica"]) for i in infos if i["joining"]}
        replicas = [len(reps) for reps in plan.stage_nodes]
        home_mirrors = None
        if self.home is not None:
            # Usable mirrors: held by a survivor and tagged with the step everybody resumes at.
            held = {(i["stage"], i["replica"]): i["home_mirrors"] for i in survivors}
            home_mirrors = {r: [h for h in rb.home_holders(replicas, r) if held.get(h, {}).get(r) == resume]
                            for r in range(replicas[0])}
        if resume == 0:
            # No step was applied anywhere yet: a lost unit's own fresh build (weights depend only on
            # train.seed and the layer) is exactly what it lost; neighbours' states would not be.
            actions = [rb.RebuildAction(s, r, rb.FRESH_START) for s, r in sorted(lost)]
        else:
            try:
                actions = rb.plan_rebuild(lost, plan.num_stages, replicas, self.swaps_on, self.settings.fallback,
                                          self.settings.lr_scale, home_mirrors)
            except rb.RecoveryError as exc:
                self._abort_job(str(exc))
        for a in actions:
            if a.degraded:
                self.events.emit("recovery_fallback", step=resume, method=a.method, action=a.describe())
        return actions

    def _transfer(self, actions: list[rb.RebuildAction]) -> tuple[tuple[rb.RebuildAction, list[dict]] | None, int]:
        """Sources send in one global action order; returns (this rank's action and what it received, bytes sent)."""
        rank_of = {(s, r): n for s, reps in enumerate(self.plan.stage_nodes) for r, n in enumerate(reps)}
        sent = 0
        mine = None
        for a in actions:
            target = rank_of[(a.stage, a.replica)]
            received = []
            for src in a.sources:
                src_rank = rank_of[src]
                what = f"state of stage {src[0]} replica {src[1]} for {a.method}"
                if self.ctx.rank == src_rank and a.method == rb.HOME_MIRROR:
                    sent += send_state(self.home.payload(a.replica), target, self.monitor, what)
                elif self.ctx.rank == src_rank:
                    payload = {"model": stage_state(self.module), "grad_norm": self.guard.last_grad_norm}
                    if a.method == rb.REPLICA_COPY:
                        payload["optimizer"] = self.optimizer.state_dict()
                    sent += send_state(payload, target, self.monitor, what)
                elif self.ctx.rank == target:
                    received.append(recv_state(src_rank, self.monitor, what))
            if self.ctx.rank == target:
                mine = (a, received)
        return mine, sent

    def _rebuild(self, counters: dict) -> dict:
        """A new engine around the kept module/optimizer/scheduler, with the agreed counters."""
        self.backend.rebuild_engine()
        for k, v in counters.items():
            setattr(self.engine, k, v)
        self.joining = False
        return counters

    def _rollback(self, actions: list[rb.RebuildAction], t0: float) -> None:
        """Checkpoint fallback: every rank restores the last complete DeepSpeed checkpoint (real rollback)."""
        bad = [a.describe() for a in actions if a.method == rb.CHECKPOINT]
        latest = self.checkpoints.latest() if self.checkpoints is not None else None
        if latest is None:
            why = ("this run saves no checkpoints (set recovery.checkpoint_every=K)" if self.checkpoints is None
                   else "no checkpoint was completed yet")
            if any(a.stage == 0 for a in actions if a.method == rb.CHECKPOINT):
                # copy_neighbour cannot rebuild the home stage (plan_rebuild refuses it): do not suggest it.
                hint = "or set recovery.home_replica=true (with routing=checkfree_plus) to restore the home stage exactly"
            else:
                hint = "or set recovery.fallback=copy_neighbour for the named degraded mode"
            self._abort_job(f"recovery: falling back to the last checkpoint for {bad}, but there is no checkpoint "
                            f"to restore: {why}; {hint}")
        tag, step = latest
        t_transfer = time.time()
        self.backend.rebuild_engine()
        resumed = self.checkpoints.restore(self.engine, tag)
        rb.reattach_lr_scale(self.optimizer)  # restored groups keep their multiplier; hooks may be new
        self.guard.last_grad_norm = None  # a pre-rollback statistic would weight a later average wrongly
        self.joining = False
        self.events.emit("recovery_rollback", step=resumed, tag=tag, checkpoint_step=step)
        self.pending.update({"t_exchange": t0, "t_transfer": t_transfer, "t_engine": time.time(),
                             "actions": [a.describe() for a in actions], "methods": [rb.CHECKPOINT],
                             "bytes_sent": 0, "resume_step": resumed, "checkpoint": tag,
                             "rebuilt_here": rb.CHECKPOINT})
        if self.on_recovered is not None:
            self.on_recovered({"actions": actions, "received": None, "session": self})

    def _apply(self, action: rb.RebuildAction, received: list[dict], donor: dict) -> None:
        """The joiner applies its rebuild rule and the optimizer surgery."""
        if action.method == rb.FRESH_START:
            return  # its own initial state, optimizer and schedule are the right ones
        if action.method in (rb.REPLICA_COPY, rb.HOME_MIRROR):  # exact: weights + optimizer state
            load_stage_state(self.module, received[0]["model"])
            self.optimizer.load_state_dict(received[0]["optimizer"])
            rb.reattach_lr_scale(self.optimizer)
        else:
            if action.method == rb.CHECKFREE:
                prev, nxt = received
                w = [rb.stage_weight(r["grad_norm"] if r["grad_norm"] is not None else 1.0,
                                     self.settings.weight_statistic) for r in (prev, nxt)]
                state = rb.checkfree_average(prev["model"], nxt["model"], w[0], w[1])
            else:
                state = rb.partner_copy(received[0]["model"])
            load_stage_state(self.module, state)
            rb.fresh_optimizer_state(self.optimizer)
            rb.set_lr_scale(self.optimizer, action.lr_scale)
            norms = [r["grad_norm"] for r in received if r["grad_norm"] is not None]
            self.guard.last_grad_norm = sum(norms) / len(norms) if norms else None
        if self.scheduler is not None and donor["scheduler"] is not None:
            self.scheduler.load_state_dict(donor["scheduler"])
        for g, lr in zip(self.optimizer.param_groups, donor["lrs"]):
            g["lr"] = lr  # the schedule's value at the global step (lr_scale applies on top)

    def _supersede(self, failure: PeerFailure) -> float | None:
        """A new failure hit before the last recovery's first good step: that recovery still gets its
        one event (marked ``superseded``, no first good step); returns when its burst began."""
        p = self.pending
        self._finish_event(None, after=None, superseded_by=str(failure)[:300])
        return p.get("t_burst") or p.get("t_fail")

    def _finish_event(self, loss_after: float | None, after: str | None = "step", superseded_by: str | None = None
                      ) -> None:
        """Emit the pending recovery's event, once: at its first good ``step``, at a completed
        ``validation`` (a recovery during the final validation has no step after it), or
        ``superseded_by`` a newer failure (``after=None``). ``burst_s`` counts from the first
        failure not followed by a good step (several failures in a row)."""
        p, self.pending = self.pending, None
        now = time.time()
        if superseded_by is None:  # the agents refill their hot spares now (launch.agent), not during it
            self.store.set(recovered_key(p["generation"]), repr(now))
        t_fail = p.get("t_fail")
        good = None if superseded_by else ((now - t_fail) if t_fail else (now - p["t_regroup"]))
        rec = {
            "generation": p["generation"], "methods": p.get("methods"), "actions": p.get("actions"),
            "rebuilt_here": p.get("rebuilt_here"), "failed_ranks": p.get("failed_ranks"),
            "reasons": p.get("reasons"), "resume_step": p.get("resume_step"),
            # A survivor can see the connection reset before the agent's record: detection ~0 then.
            "detect_s": max(0.0, p["t_detect"] - t_fail) if t_fail and p.get("t_detect") else None,
            "regroup_s": (p["t_regroup"] - p.get("t_raise", p["t_regroup"])),
            "transfer_s": p["t_transfer"] - p["t_exchange"], "engine_rebuild_s": p["t_engine"] - p["t_transfer"],
            "first_good_step_s": good,
            "loss_before": p.get("loss_before"), "loss_after": loss_after, "bytes_sent": p.get("bytes_sent"),
            "generations": p.get("generations"), "first_good": after, "superseded": superseded_by is not None,
            "superseded_by": superseded_by,
            "burst_s": None if good is None or not p.get("t_burst") else now - p["t_burst"],
        }
        if p.get("joiner_phases"):
            rec["joiner_phases"] = {k: round(v, 3) for k, v in p["joiner_phases"].items()}
        self.recoveries.append(rec)
        self.events.emit("recovery", step=p.get("resume_step"), **rec)
