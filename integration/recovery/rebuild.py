"""CheckFree / CheckFree+ recovery math and the recovery ladder (pure torch, no process groups).

What lives here (``shared/spec/checkfree.md`` sections 2, 3 and 6):

* :func:`stage_weight` - the per-stage scalar that weights a neighbour in the average;
* :func:`checkfree_average` - W_i = (w_prev W_{i-1} + w_next W_{i+1}) / (w_prev + w_next) on every state key;
* :func:`partner_copy` - CheckFree+ edge rule (and the copy_neighbour mode);
* optimizer surgery - :func:`fresh_optimizer_state` and :func:`set_lr_scale` (a per-group multiplier
  applied around ``optimizer.step`` so it never compounds and the LR schedule keeps its position);
* :func:`plan_rebuild` - which rule rebuilds each lost (stage, replica), with explicit fallbacks;
* :func:`home_holders` - which body stages keep CheckFree+'s mirror of the home stage (E + H).

Stage numbering is the ring layout's: stage 0 is home (embedding + head), body stages 1..L = S-1;
body stage 1 and body stage L are the edge stages (their outer neighbour is the home stage, whose
parameters have other shapes, so they cannot be averaged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

STATISTICS = ("clipped_l2", "l2", "squared_l2")
FALLBACKS = ("checkpoint", "copy_neighbour", "error")

# Methods of a RebuildAction.
REPLICA_COPY = "replica_copy"      # a data-parallel replica of the stage survives: exact copy incl. optimizer
CHECKFREE = "checkfree"            # weighted average of the two body neighbours
PARTNER_COPY = "partner_copy"      # CheckFree+: S1 <- S2, S_L <- S_{L-1}
COPY_NEIGHBOUR = "copy_neighbour"  # named degraded mode: copy a surviving adjacent body stage
HOME_MIRROR = "home_mirror"        # CheckFree+: home stage (E + H) from a neighbour's exact mirror
CHECKPOINT = "checkpoint"          # fall back to the last checkpoint (whole model rolls back)
FRESH_START = "fresh_start"        # lost before any step was applied: its own initial state is exact


class RecoveryError(RuntimeError):
    """A loss that the configured ladder cannot rebuild (and the fallback is ``error``)."""


# ------------------------------------------------------------------------------ statistics


def stage_weight(norm: float, statistic: str = "clipped_l2", clip: float = 1.0, eps: float = 1e-4) -> float:
    """The CheckFree weight of a stage from the L2 norm of its last gradient.

    ``clipped_l2`` (default, the reference code): norm after clipping the stage gradient to ``clip``,
    i.e. ``min(norm, clip) + eps``; ``l2``: ``norm + eps``; ``squared_l2``: ``norm**2 + eps`` (one
    reading of the paper's notation). ``eps`` keeps a converged (zero-gradient) pair averageable.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"recovery.weight_statistic: {statistic!r} is not one of {STATISTICS}")
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"stage_weight: gradient norm must be finite and >= 0, got {norm}")
    if statistic == "clipped_l2":
        return min(norm, clip) + eps
    if statistic == "l2":
        return norm + eps
    return norm * norm + eps


# ------------------------------------------------------------------------------ weights


def checkfree_average(prev_state: Mapping[str, torch.Tensor], next_state: Mapping[str, torch.Tensor],
                      w_prev: float, w_next: float) -> dict[str, torch.Tensor]:
    """CheckFree: ``(w_prev * prev + w_next * next) / (w_prev + w_next)`` for every state key.

    Covers every entry of the state dicts (weights, norm gains, buffers). Floating tensors are
    averaged in fp64 and cast back to their dtype (so bf16 neighbours do not lose the weights'
    low bits before rounding once); non-floating entries (counters) must agree and are copied.
    Linear and elementwise, so applying it to matching tensor-parallel shards equals sharding the
    average of the full weights.
    """
    if set(prev_state) != set(next_state):
        missing = sorted(set(prev_state) ^ set(next_state))
        raise ValueError(f"checkfree_average: neighbour stages have different state keys ({missing[:5]}...); "
                         f"CheckFree needs identical body stages")
    if not (w_prev > 0 and w_next > 0 and math.isfinite(w_prev) and math.isfinite(w_next)):
        raise ValueError(f"checkfree_average: weights must be finite and > 0, got {w_prev}, {w_next}")
    total = w_prev + w_next
    out: dict[str, torch.Tensor] = {}
    for key, a in prev_state.items():
        b = next_state[key]
        if a.shape != b.shape:
            raise ValueError(f"checkfree_average: {key} has shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.is_floating_point():
            avg = (a.double() * w_prev + b.double() * w_next) / total
            out[key] = avg.to(a.dtype)
        else:
            if not torch.equal(a, b):
                raise ValueError(f"checkfree_average: non-float entry {key} differs between neighbours")
            out[key] = a.clone()
    return out


def partner_copy(partner_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CheckFree+ edge rule (S1 <- S2, S_L <- S_{L-1}) and the copy_neighbour mode: a bitwise copy."""
    return {k: v.detach().clone() for k, v in partner_state.items()}


# ------------------------------------------------------------------------------ optimizer surgery


def fresh_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Fresh Adam state for the rebuilt stage: moments dropped and its own step count back to 0.

    torch's Adam/AdamW keep ``step`` per parameter and re-create zero moments with step 0 on the
    next ``step()``, so bias correction is active again (zero moments with a large kept step
    count would make the first update about 3x too large). Optimizers that keep ``step`` in the
    param group (some fused ones) get it reset too.
    """
    optimizer.state.clear()
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = 0


def _scale_lr(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        if scale != 1.0:
            group["_scheduled_lr"] = group["lr"]
            group["lr"] = group["lr"] * scale


def _unscale_lr(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        if "_scheduled_lr" in group:
            group["lr"] = group.pop("_scheduled_lr")


def set_lr_scale(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Run every later ``optimizer.step()`` at ``scale`` x the scheduled LR.

    The multiplier is a param-group entry (``lr_scale``) that is *set*, never multiplied, so a
    second failure of the same stage keeps 1.1x rather than 1.21x. It is applied by step pre/post
    hooks that scale ``group['lr']`` only for the duration of the step, so the LR scheduler sees
    and writes the unscaled schedule value and keeps its global position.
    """
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"recovery.lr_scale must be finite and > 0, got {scale}")
    for group in optimizer.param_groups:
        group["lr_scale"] = float(scale)
    if not getattr(optimizer, "_skipfree_lr_scale_hooks", False):
        optimizer.register_step_pre_hook(_scale_lr)
        optimizer.register_step_post_hook(_unscale_lr)
        optimizer._skipfree_lr_scale_hooks = True


def reattach_lr_scale(optimizer: torch.optim.Optimizer) -> None:
    """After an optimizer state was loaded: a multiplier its groups carry needs this optimizer
    object's step hooks (a copied or restored rebuilt stage keeps its ``lr_scale``)."""
    scale = optimizer.param_groups[0].get("lr_scale", 1.0)
    if scale != 1.0:
        set_lr_scale(optimizer, scale)


# ------------------------------------------------------------------------------ ladder


@dataclass(frozen=True)
class RebuildAction:
    """How to rebuild one lost (stage, replica).

    ``sources`` are surviving (stage, replica) units whose state is used, in the order the method
    needs them (CheckFree: previous then next neighbour). The method decides the optimizer: exact
    copies (replica, home mirror) load the source's state, the others start fresh at ``lr_scale``
    (``integration/recovery/session.py:FaultTolerantSession._apply``); ``degraded`` marks fallbacks
    that must be announced.
    """

    stage: int
    replica: int
    method: str
    sources: tuple[tuple[int, int], ...] = ()
    lr_scale: float = 1.0
    degraded: bool = False
    reason: str = ""

    def describe(self) -> str:
        src = ", ".join(f"stage {s} replica {r}" for s, r in self.sources) or "none"
        tag = " [DEGRADED]" if self.degraded else ""
        return f"stage {self.stage} replica {self.replica}: {self.method} from {src}{tag}" + \
            (f" ({self.reason})" if self.reason else "")


@dataclass
class _Layout:
    counts: list[int]
    lost: set[tuple[int, int]] = field(default_factory=set)

    def survivors(self, stage: int) -> list[int]:
        return [r for r in range(self.counts[stage]) if (stage, r) not in self.lost]


def home_holders(replicas: Sequence[int], home_replica: int) -> list[tuple[int, int]]:
    """The body units that keep the mirror of home unit (0, ``home_replica``): its ring neighbours.

    In the ring layout the home stage's neighbours are body stage 1 (after E) and body stage L (before
    H), taken in the same replica column (``home_replica`` modulo that stage's replica count). Two
    distinct holders when L >= 2, so losing one neighbour together with home still recovers exactly.
    """
    if len(replicas) < 2:
        raise ValueError(f"home_holders: need home + at least one body stage, got {len(replicas)} stages")
    L = len(replicas) - 1
    out: list[tuple[int, int]] = []
    for stage in (1, L):
        unit = (stage, home_replica % replicas[stage])
        if unit not in out:
            out.append(unit)
    return out


def plan_rebuild(lost: Iterable[tuple[int, int]], num_stages: int, replicas: int | Sequence[int],
                 swaps_on: bool, fallback: str = "checkpoint", lr_scale: float = 1.1,
                 home_mirrors: Mapping[int, Sequence[tuple[int, int]]] | None = None) -> list[RebuildAction]:
    """The recovery ladder: one action per lost (stage, replica), sorted by (stage, replica).

    1. a replica of the stage survives -> exact copy (weights + optimizer state, no lr_scale);
    2. home stage 0 lost entirely, ``home_mirrors`` given (``recovery.home_replica``) and a surviving
       holder has a current mirror of that home replica -> exact copy of the mirror (weights +
       optimizer state, no lr_scale, CheckFree+'s "E and H replicated on the neighbouring nodes");
    3. interior body stage (2..L-1), both body neighbours have a survivor -> CheckFree average;
    4. edge body stage (1 or L) with CheckFree+ swaps on -> copy of its partner (S2 resp. S_{L-1});
    5. anything else (home stage without a mirror, adjacent losses, an edge without swaps) -> ``fallback``:
       ``checkpoint`` (whole model from the last checkpoint), ``copy_neighbour`` (named degraded mode:
       copy a *surviving* adjacent body stage; never for the home stage, whose embedding and head
       have no counterpart in a body stage: :class:`RecoveryError`) or ``error`` (raise :class:`RecoveryError`).

    ``home_mirrors``: home replica -> the (stage, replica) units holding a mirror of it that is current
    (tagged with the step the survivors resume at); ``None`` means home replication is off.
    Only survivors are ever sources: a stage rebuilt in this round never feeds another (no chains),
    so a holder lost in the same round is not a source.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"recovery.fallback: {fallback!r} is not one of {FALLBACKS}")
    if num_stages < 2:
        raise ValueError(f"plan_rebuild: need home + at least one body stage, got {num_stages} stages")
    counts = [replicas] * num_stages if isinstance(replicas, int) else list(replicas)
    if len(counts) != num_stages:
        raise ValueError(f"plan_rebuild: {len(counts)} replica counts for {num_stages} stages")
    L = num_stages - 1
    if swaps_on and L < 4:
        raise ValueError(f"plan_rebuild: CheckFree+ swaps need at least 4 body stages, got {L}")
    layout = _Layout(counts, set())
    for s, r in lost:
        if not (0 <= s < num_stages and 0 <= r < counts[s]):
            raise ValueError(f"plan_rebuild: lost unit (stage {s}, replica {r}) is not in the layout {counts}")
        layout.lost.add((s, r))

    def alive(stage: int) -> bool:
        return 1 <= stage <= L and bool(layout.survivors(stage))

    def first_alive(stage: int) -> tuple[int, int]:
        return stage, layout.survivors(stage)[0]

    mirrors: dict[int, list[tuple[int, int]]] | None = None
    if home_mirrors is not None:
        mirrors = {}
        for hr, holders in home_mirrors.items():
            for hs, hq in holders:
                if not (1 <= hs < num_stages and 0 <= hq < counts[hs]):
                    raise ValueError(f"plan_rebuild: home mirror holder (stage {hs}, replica {hq}) is not a body "
                                     f"unit of the layout {counts}")
            mirrors[int(hr)] = [tuple(h) for h in holders if tuple(h) not in layout.lost]  # type: ignore[misc]

    actions: list[RebuildAction] = []
    for s, r in sorted(layout.lost):
        survivors = layout.survivors(s)
        if survivors:
            actions.append(RebuildAction(s, r, REPLICA_COPY, ((s, survivors[0]),), lr_scale=1.0))
            continue
        if s == 0 and mirrors is not None and mirrors.get(r):
            actions.append(RebuildAction(s, r, HOME_MIRROR, (mirrors[r][0],), lr_scale=1.0))
            continue
        if 2 <= s <= L - 1 and alive(s - 1) and alive(s + 1):
            actions.append(RebuildAction(s, r, CHECKFREE, (first_alive(s - 1), first_alive(s + 1)),
                                         lr_scale=lr_scale))
            continue
        partner = {1: 2, L: L - 1}.get(s) if swaps_on else None
        if partner is not None and alive(partner):
            actions.append(RebuildAction(s, r, PARTNER_COPY, (first_alive(partner),), lr_scale=lr_scale))
            continue
        reason = _why_not(s, L, swaps_on, alive, None if home_mirrors is None else home_mirrors.get(r, ()))
        if s == 0 and fallback != "checkpoint":
            # No body stage has the home's parameters (embedding, final norm, head): there is nothing to copy.
            raise RecoveryError(f"cannot rebuild the home stage 0 replica {r}: {reason}; copying a neighbour cannot "
                                f"rebuild it (a body stage has no embedding or head). To survive its loss set "
                                f"recovery.home_replica=true (exact restore from a mirror, with "
                                f"routing=checkfree_plus) or recovery.fallback=checkpoint recovery.checkpoint_every=K")
        if fallback == "error":
            raise RecoveryError(f"cannot rebuild stage {s} (all replicas lost): {reason}; set recovery.fallback "
                                f"to 'checkpoint' or 'copy_neighbour' to continue in a degraded mode")
        if fallback == "copy_neighbour":
            neighbours = [n for n in (s - 1, s + 1) if alive(n)]
            if not neighbours:
                raise RecoveryError(f"cannot rebuild stage {s}: {reason}, and no adjacent body stage survives "
                                    f"to copy (fallback copy_neighbour); restore from a checkpoint")
            actions.append(RebuildAction(s, r, COPY_NEIGHBOUR, (first_alive(neighbours[0]),), lr_scale=lr_scale,
                                         degraded=True, reason=reason))
        else:
            actions.append(RebuildAction(s, r, CHECKPOINT, (), lr_scale=1.0, degraded=True,
                                         reason=reason))
    return actions


def _why_not(stage: int, L: int, swaps_on: bool, alive, holders: Sequence[tuple[int, int]] | None) -> str:
    if stage == 0 and holders is None:
        return ("the home stage (embedding + head) lost every replica and has no replica elsewhere "
                "(recovery.home_replica=false; true mirrors it on its neighbour stages)")
    if stage == 0:
        return (f"the home stage (embedding + head) lost every replica and every neighbour holding a current "
                f"mirror of it ({', '.join(f'stage {a} replica {b}' for a, b in holders) or 'none'}) was lost too")
    if stage in (1, L) and not swaps_on:
        return f"stage {stage} is an edge stage and CheckFree+ swaps are off (routing.kind=checkfree_plus enables them)"
    if stage in (1, L):
        partner = 2 if stage == 1 else L - 1
        return f"edge stage {stage}'s CheckFree+ partner stage {partner} is lost too (adjacent losses)"
    dead = [n for n in (stage - 1, stage + 1) if not alive(n)]
    return f"adjacent stage(s) {dead} lost too; averaging would need a rebuilt neighbour (no chaining)"


# ------------------------------------------------------------------------------ failure rate


def per_iteration_probability(p_hour: float, iteration_seconds: float) -> float:
    """p_it = 1 - (1 - p_h)^(T_it / 3600): the chance a stage fails during one iteration."""
    if not 0.0 <= p_hour <= 1.0:
        raise ValueError(f"failure rate per hour must be in [0, 1], got {p_hour}")
    if iteration_seconds < 0:
        raise ValueError(f"iteration time must be >= 0, got {iteration_seconds}")
    return 1.0 - (1.0 - p_hour) ** (iteration_seconds / 3600.0)
