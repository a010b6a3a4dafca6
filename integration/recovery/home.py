"""CheckFree+ home replication: E and H (home stage 0) mirrored exactly on the neighbouring body stages.

``shared/spec/checkfree.md`` section 3: "E and H are replicated on the neighbouring stage nodes so
their loss is recovered exactly" (the reference code never implemented it). Home unit (0, r) is
mirrored on its ring neighbours, body units (1, r) and (L, r) (:func:`rebuild.home_holders`); each
holder keeps a CPU copy of the home stage's weights *and* optimizer state, tagged with the number of
steps applied to it. When every home replica is lost, the ladder copies that mirror to the joiner
(:data:`rebuild.HOME_MIRROR`: exact, no lr_scale, no fresh optimizer).

Protocol (all p2p on the current generation's group, tag :data:`TAG`, failure-aware waits, the same
deterministic order on every involved rank; ranks that are neither home nor holder do nothing):

* **full sync** at the first step of every generation (:meth:`HomeMirror.begin_step`, before any
  pipeline op): each home sends module state + optimizer state + its parameter order to its holders,
  which replace their mirror only once the whole payload arrived. Every generation, because a
  replaced holder starts without a mirror; a failure here aborts the step like any other.
* **gradient sync** of every step *before the commit vote* (:meth:`HomeMirror.exchange_gradients`,
  after the gradient reductions and the pre-vote collectives): the home sends its final (pre-clip)
  gradients, the clip coefficient and the LRs of the step; holders keep them pending.
* after the vote: on **commit** every holder applies the same optimizer step to its mirror
  (:meth:`HomeMirror.apply_committed`: same optimizer class, same state, same gradients, same float
  ops, so the mirror stays bitwise equal to the home); on **abort** the pending gradients are dropped.

Why gradients before the vote, not the post-step state after it: the commit needs every rank's
``ready`` vote, and a holder votes only after its gradients arrived, so *a committed step is always
in every surviving holder's hands*, even when the home dies right after the vote. Syncing the new
state after the step would leave a window (home dies after the commit, before the sync) where the
mirror is one step behind the survivors; replaying the step locally closes it. An aborted step
leaves the mirror untouched (its pending gradients are discarded), so the mirror is never ahead
either. The mirror's tag must equal the step the survivors resume at, or it is not used.

Cost per step: the home's gradients (|E| + |H| floats) to each holder plus one optimizer step of the
home stage on each holder; per generation: the full state (weights + 2 Adam moments) once.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..runtime.p2p import launch
from .detect import FailureMonitor
from .rebuild import home_holders
from .state import local_key, stage_state
from .transfer import pack_state, recv_state, send_packed

TAG = 0x4E  # p2p tag of mirror traffic, apart from pipeline and recovery transfers (tag 0)


@dataclass
class _Mirror:
    """A holder's copy of one home unit: weights (sharing storage with ``params``) and optimizer."""

    step: int                      # steps applied: the step a resume from this mirror continues at
    model: dict[str, torch.Tensor]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer


@dataclass
class HomeMirrorStats:
    """Traffic and time of the replication on this rank (the sync cost)."""

    bytes_sent: int = 0
    seconds: float = 0.0           # wall time inside full syncs, gradient syncs and mirror steps
    full_syncs: int = 0
    gradient_syncs: int = 0
    mirror_steps: int = 0
    per_step: list[dict] = field(default_factory=list)


class HomeMirror:
    """One rank's part in home replication (see the module docstring).

    ``stage_nodes[s][r]`` is the rank of (stage s, replica r). :meth:`attach` gives the home rank its
    module and optimizer (the backend's, kept across engine rebuilds).
    """

    def __init__(self, stage_nodes: Sequence[Sequence[int]], rank: int, monitor: FailureMonitor):
        counts = [len(reps) for reps in stage_nodes]
        self.rank_of = {(s, r): n for s, reps in enumerate(stage_nodes) for r, n in enumerate(reps)}
        self.rank = rank
        self.monitor = monitor
        # (home replica, home rank, holder ranks) in a fixed order shared by every rank.
        self.pairs = [(r, stage_nodes[0][r], [self.rank_of[h] for h in home_holders(counts, r)])
                      for r in range(counts[0])]
        self.mirrors: dict[int, _Mirror] = {}
        self.pending: dict[int, tuple[dict, torch.Tensor]] = {}
        self.synced_generation: int | None = None
        self.module: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.stats = HomeMirrorStats()

    @property
    def is_home(self) -> bool:
        return any(home == self.rank for _, home, _ in self.pairs)

    @property
    def is_holder(self) -> bool:
        return any(self.rank in holders for _, _, holders in self.pairs)

    def attach(self, module: Any, optimizer: torch.optim.Optimizer) -> None:
        """The stage's module and optimizer (used by a home rank to send its state and gradients)."""
        self.module, self.optimizer = module, optimizer
        if self.is_home:
            dtypes = {p.dtype for p in self._params()}
            if len(dtypes) > 1:
                raise ValueError(f"recovery.home_replica: the home stage's parameters mix dtypes "
                                 f"{sorted(map(str, dtypes))}; home replication supports one parameter dtype")

    def tags(self) -> dict[int, int]:
        """home replica -> step tag of the mirror this rank holds (exchanged at recovery)."""
        return {r: m.step for r, m in self.mirrors.items()}

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ full sync
    def begin_step(self, generation: int, step: int) -> None:
        """At the start of a step: the full sync, once per generation (home -> holders)."""
        self.pending.clear()
        if self.synced_generation == generation:
            return
        t0 = time.time()
        new: dict[int, _Mirror] = {}
        for r, home, holders in self.pairs:
            if self.rank == home:
                payload = pack_state(self._full_state(step))
                for dst in holders:
                    self.stats.bytes_sent += send_packed(payload, dst, self.monitor,
                                                         f"home mirror full sync to rank {dst}", TAG)
            elif self.rank in holders:
                state = recv_state(home, self.monitor, f"home mirror full sync from rank {home}", TAG)
                new[r] = _build_mirror(state)
        self.mirrors.update(new)  # only whole payloads replace a mirror
        self.synced_generation = generation
        if self.is_home or self.is_holder:
            self.stats.full_syncs += 1
            self.stats.seconds += time.time() - t0

    def _full_state(self, step: int) -> dict:
        start = getattr(self.module, "_local_start", 0)
        names = {id(p): local_key(n, start) for n, p in self.module.named_parameters()}
        opt = self.optimizer
        state = {"step": step, "model": stage_state(self.module), "optimizer": opt.state_dict(),
                 "names": [names[id(p)] for p in self._params()],
                 "groups": [len(g["params"]) for g in opt.param_groups],
                 "optimizer_class": (type(opt).__module__, type(opt).__qualname__)}
        return state

    # ------------------------------------------------------------------ per step
    def exchange_gradients(self, step: int, clip_coef: float | None) -> None:
        """Before the commit vote: the home sends this step's gradients, holders keep them pending."""
        self.pending.clear()
        t0 = time.time()
        sent = 0
        for r, home, holders in self.pairs:
            if self.rank == home:
                params = self._params()
                grads = [p.grad for p in params]
                flat = torch.cat([g.detach().reshape(-1).cpu() for g in grads if g is not None]) if any(
                    g is not None for g in grads) else torch.zeros(0)
                header = pack_state({"step": step, "coef": clip_coef, "numel": flat.numel(), "dtype": flat.dtype,
                                     "mask": [g is not None for g in grads],
                                     "lrs": [g["lr"] for g in self.optimizer.param_groups],
                                     "scales": [g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]})
                for dst in holders:
                    what = f"home mirror gradients to rank {dst}"
                    sent += send_packed(header, dst, self.monitor, what, TAG)
                    self.monitor.wait(launch(dist.isend, flat, dst, tag=TAG), what)
                    sent += flat.numel() * flat.element_size()
            elif self.rank in holders:
                what = f"home mirror gradients from rank {home}"
                header = recv_state(home, self.monitor, what, TAG)
                flat = torch.empty(header["numel"], dtype=header["dtype"])
                self.monitor.wait(launch(dist.irecv, flat, home, tag=TAG), what)
                self.pending[r] = (header, flat)
        if self.is_home or self.is_holder:
            dt = time.time() - t0
            self.stats.bytes_sent += sent
            self.stats.gradient_syncs += 1
            self.stats.seconds += dt
            self.stats.per_step.append({"step": step, "bytes_sent": sent, "sync_s": dt})

    def apply_committed(self, step: int) -> None:
        """After a commit: every holder applies the home's step to its mirror (local, no communication)."""
        t0 = time.time()
        for r, (header, flat) in sorted(self.pending.items()):
            mirror = self.mirrors.get(r)
            if mirror is None or mirror.step != header["step"] or header["step"] != step:
                self.mirrors.pop(r, None)  # a mirror that missed a step is never used
                continue
            _mirror_step(mirror, header, flat)
            mirror.step = step + 1
            self.stats.mirror_steps += 1
        self.pending.clear()
        if self.is_holder:
            dt = time.time() - t0
            self.stats.seconds += dt
            if self.stats.per_step and self.stats.per_step[-1]["step"] == step:
                self.stats.per_step[-1]["sync_s"] += dt

    # ------------------------------------------------------------------ recovery
    def payload(self, home_replica: int) -> dict:
        """The mirror of (0, ``home_replica``) for a joiner: weights and optimizer state, exact."""
        m = self.mirrors[home_replica]
        return {"model": m.model, "optimizer": m.optimizer.state_dict(), "step": m.step, "grad_norm": None}


def _build_mirror(state: dict) -> _Mirror:
    """A holder's mirror from a full-sync payload: parameters share storage with the model dict."""
    model = {k: v.cpu() for k, v in state["model"].items()}  # the mirror lives in the holder's CPU memory
    params = [torch.nn.Parameter(model[n]) for n in state["names"]]
    groups, start = [], 0
    for n in state["groups"]:
        groups.append({"params": params[start:start + n]})
        start += n
    module_name, qualname = state["optimizer_class"]
    cls: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    optimizer = cls(groups, lr=state["optimizer"]["param_groups"][0]["lr"])
    optimizer.load_state_dict(state["optimizer"])  # every hyperparameter and the moments, as on the home
    return _Mirror(int(state["step"]), model, params, optimizer)


def _mirror_step(mirror: _Mirror, header: dict, flat: torch.Tensor) -> None:
    """The home's optimizer step, replayed on the mirror with the same inputs and the same float ops."""
    offset = 0
    for p, has_grad in zip(mirror.params, header["mask"]):
        if has_grad:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if header["coef"] is not None:
                p.grad.mul_(header["coef"])  # the commit's clipping: same Python float, same op
        else:
            p.grad = None
    groups = mirror.optimizer.param_groups
    for g, lr, scale in zip(groups, header["lrs"], header["scales"]):
        g["lr"] = lr * scale if scale != 1.0 else lr  # what rebuild.set_lr_scale's pre-hook computes
    mirror.optimizer.step()
    for g, lr, scale in zip(groups, header["lrs"], header["scales"]):
        g["lr"] = lr
        if scale != 1.0 or "lr_scale" in g:
            g["lr_scale"] = scale
    for p in mirror.params:
        p.grad = None
