"""Agree on the generation to regroup on, so failures that land close together are coalesced.

Two ranks killed at once produce two failure records (generations g+1 and g+2) and two
replacements started with different generations. Every process of the job (survivors and
replacements) therefore announces itself for the latest generation it knows and waits until
either everybody arrived (the generation is *closed*) or a newer failure was recorded (the
generation is *stale*: announce again for the newer one). The decision is a first-write-wins
compare-and-set in the store, like the step commit, so no process regroups on a generation that
another one abandoned.
"""

from __future__ import annotations

import pickle
import time
from typing import Any, Callable

import torch.distributed as dist

from .detect import COMPLETE_KEY, FailureMonitor, read_generation

CLOSED = "closed"
STALE = "stale"


class JobCompleted(Exception):
    """The job finished (a rank passed the final barrier) while this process waited to regroup: a
    rank died after the final barrier, or one that had contributed to it died inside it."""


def _key(generation: int) -> str:
    return f"settle/g{generation}"


def settle_generation(store: dist.Store, world_size: int, generation: int, timeout_s: float = 60.0,
                      poll_s: float = 0.01, members_of: Callable[[int], int] | None = None) -> int:
    """Block until every rank announced the same generation (>= ``generation``); return it.

    ``members_of(g)``: how many ranks generation ``g``'s group has (default ``world_size``; fewer
    while survivors re-plan around ranks that have no process, :mod:`integration.recovery.replan`)."""
    deadline = time.time() + timeout_s
    g = max(generation, read_generation(store))
    store.add(f"{_key(g)}/arrived", 1)
    while True:
        decision_key = f"{_key(g)}/decision"
        if int(store.add(f"{_key(g)}/arrived", 0)) >= (members_of(g) if members_of else world_size):
            store.compare_set(decision_key, "", CLOSED)
        elif read_generation(store) > g:
            store.compare_set(decision_key, "", STALE)
        if store.check([decision_key]):
            if store.get(decision_key).decode() == CLOSED:
                return g
            g = read_generation(store)  # stale: move to the newest failure and announce again
            store.add(f"{_key(g)}/arrived", 1)
            continue
        if store.check([COMPLETE_KEY]):
            raise JobCompleted(f"the job completed while waiting to regroup on generation {g}")
        if time.time() > deadline:
            raise TimeoutError(f"recovery: only {int(store.add(f'{_key(g)}/arrived', 0))} of {world_size} ranks "
                               f"arrived for generation {g} within {timeout_s:.0f} s")
        time.sleep(poll_s)


def store_all_gather(store: dist.Store, key: str, obj: Any, rank: int, world_size: int, monitor: FailureMonitor,
                     timeout_s: float = 60.0, poll_s: float = 0.01) -> list[Any]:
    """All-gather of small picklable objects through the store, failure-aware.

    Used for the recovery exchange instead of a gloo collective: a gloo group cannot be destroyed
    while one of its collectives is pending (its destructor waits for the work), so a rank dying
    during the exchange would hold every survivor's regroup for the op timeout. A store poll has
    nothing pending: on a new failure it raises :class:`PeerFailure` and the group goes at once.
    ``key`` must be unique per exchange (e.g. include the generation).
    """
    store.set(f"{key}/{rank}", pickle.dumps(obj))
    keys = [f"{key}/{r}" for r in range(world_size)]
    deadline = time.time() + timeout_s
    while not store.check(keys):
        monitor.check(f"store exchange {key}")
        if time.time() > deadline:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            raise TimeoutError(f"recovery: ranks {missing} did not publish {key} within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return [pickle.loads(store.get(k)) for k in keys]
