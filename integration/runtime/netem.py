"""In-process link latency (and optionally bandwidth) for emulated wide-area runs.

netem is absent on this machine class, so the one-way latency of a link is added here: a send to
rank ``j`` is handed to a delay thread that starts the real ``isend`` ``latency[i][j]`` seconds later,
while the caller (the rank's compute loop) goes on at once; the handle it gets waits for that start
and then for the transfer. Sends to one peer keep their order (same latency, FIFO by due time), so
gloo's per-pair message matching is unchanged. Receives start at once: the data simply arrives late.

Bandwidth is shaped by the kernel when the ranks run in :mod:`integration.runtime.wanhosts`
namespaces (``tc`` htb per destination; the gradient all-reduce crosses those shaped links too).
Without namespaces (``bandwidth=True``) the delay layer also serialises each directed link:
a message of ``b`` bytes occupies link i->j for ``b / bandwidth[i][j]`` seconds before its latency.

Collectives (``collectives=True``): ``torch.distributed.all_reduce`` (DeepSpeed's and megatron's
gradient all-reduce and grad-norm reductions call it by that name) first waits 2(k-1) x the group's
largest one-way latency, the latency part of gloo's ring over k ranks, then runs on the (shaped)
links. Every member waits the same, so the collective starts that much later everywhere.

Off by default and free when off: nothing is installed in the transfer path
(``integration.runtime.p2p._launch_hook`` stays ``None``, ``all_reduce`` is torch's own);
:func:`install` puts the layer there.
Driven by the cluster file the planner reads (node i = rank i): ``network.emulate=<cluster file>``.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch.distributed as dist

from . import p2p


class DelayedWork:
    """A send whose start is ``due`` seconds of the monotonic clock; ``wait`` blocks for both."""

    def __init__(self, due: float):
        self.due = due
        self._started = threading.Event()
        self._work: object | None = None
        self._error: BaseException | None = None

    def _start(self, start: Callable, args: tuple, kwargs: dict) -> None:
        try:
            self._work = start(*args, **kwargs)
        except RuntimeError as exc:  # the same rule as p2p.launch: a failed launch surfaces at wait
            self._work = p2p.FailedWork(exc)
        self._started.set()

    def wait(self, *args, **kwargs) -> bool:
        self._started.wait()
        return self._work.wait(*args, **kwargs)

    def is_completed(self) -> bool:
        return self._started.is_set() and self._work.is_completed()


class NetworkEmulator:
    """Delays every ``isend`` of this rank by the link's latency (and bandwidth, if asked)."""

    def __init__(self, rank: int, latency_s: Sequence[Sequence[float]],
                 bandwidth_Bps: Sequence[Sequence[float]] | None = None):
        self.rank = rank
        self.latency = np.asarray(latency_s, dtype=float)
        self.bandwidth = None if bandwidth_Bps is None else np.asarray(bandwidth_Bps, dtype=float)
        n = self.latency.shape[0]
        if self.latency.shape != (n, n) or not 0 <= rank < n:
            raise ValueError(f"network emulation: a {n} x {n} latency matrix does not cover rank {rank}; the cluster "
                             f"file needs one node per rank")
        self._heap: list[tuple[float, int, DelayedWork, Callable, tuple, dict]] = []
        self._seq = itertools.count()
        self._link_free: dict[int, float] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.delayed = 0
        self._thread = threading.Thread(target=self._loop, name=f"netem-rank{rank}", daemon=True)
        self._thread.start()

    def _global_peer(self, kwargs: dict, args: tuple) -> int:
        peer = kwargs.get("dst", args[1] if len(args) > 1 else None)
        group = kwargs.get("group")
        return peer if group is None else dist.get_global_rank(group, peer)

    def launch(self, start: Callable, args: tuple, kwargs: dict) -> object:
        """``p2p.launch``'s hook: sends are delayed, everything else starts now."""
        if start is not dist.isend:
            return start(*args, **kwargs)
        peer = self._global_peer(kwargs, args)
        now = time.monotonic()
        due = now + self.latency[self.rank][peer]
        if self.bandwidth is not None and np.isfinite(self.bandwidth[self.rank][peer]):
            tensor = args[0]
            occupy = tensor.numel() * tensor.element_size() / self.bandwidth[self.rank][peer]
            begin = max(now, self._link_free.get(peer, 0.0))
            self._link_free[peer] = begin + occupy
            due = begin + occupy + self.latency[self.rank][peer]
        work = DelayedWork(due)
        with self._cv:
            heapq.heappush(self._heap, (due, next(self._seq), work, start, args, kwargs))
            self._cv.notify()
        self.delayed += 1
        return work

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._closed and not self._heap:
                    return
                _, _, work, start, args, kwargs = heapq.heappop(self._heap)
            work._start(start, args, kwargs)

    def collective_delay_s(self, group=None) -> float:
        """Latency part of a ring all-reduce over ``group``: 2(k-1) x its largest one-way latency."""
        ranks = list(range(self.latency.shape[0])) if group is None or group is dist.GroupMember.WORLD \
            else dist.get_process_group_ranks(group)
        k = len(ranks)
        return 0.0 if k < 2 else 2 * (k - 1) * float(self.latency[np.ix_(ranks, ranks)].max())

    def wrap_all_reduce(self, all_reduce: Callable) -> Callable:
        """``all_reduce`` that first waits :meth:`collective_delay_s` of its group."""
        def delayed_all_reduce(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            time.sleep(self.collective_delay_s(group))
            return all_reduce(tensor, *args, **kwargs)
        delayed_all_reduce.__wrapped__ = all_reduce
        return delayed_all_reduce

    def close(self) -> None:
        """Start what is still queued, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()


_active: NetworkEmulator | None = None
_plain_all_reduce: Callable | None = None  # torch's own, while a delayed one is installed


def install(rank: int, latency_s: Sequence[Sequence[float]],
            bandwidth_Bps: Sequence[Sequence[float]] | None = None, collectives: bool = False) -> NetworkEmulator:
    """Put the delay layer into :func:`integration.runtime.p2p.launch` for this process
    (``collectives``: also into ``torch.distributed.all_reduce``)."""
    global _active, _plain_all_reduce
    uninstall()
    _active = NetworkEmulator(rank, latency_s, bandwidth_Bps)
    p2p._launch_hook = _active.launch
    if collectives:
        _plain_all_reduce = dist.all_reduce
        dist.all_reduce = _active.wrap_all_reduce(_plain_all_reduce)
    return _active


def install_from_cluster(rank: int, cluster_file: str, world_size: int, bandwidth: bool,
                         collectives: bool = False) -> NetworkEmulator:
    """The layer for ``rank`` from a planner cluster file (``bandwidth``: also shape in-process, for
    runs without :mod:`wanhosts` namespaces; ``collectives``: delay ``all_reduce`` too)."""
    from ..plan.cluster import load_cluster
    c = load_cluster(cluster_file, num_nodes=world_size)
    if c.num_nodes != world_size:
        raise ValueError(f"network.emulate: {cluster_file} describes {c.num_nodes} nodes but the job has "
                         f"{world_size} ranks; give one node per rank")
    if not c.has_links:
        raise ValueError(f"network.emulate: {cluster_file} has no links (only a cost matrix); emulation needs "
                         f"latency and bandwidth per pair")
    return install(rank, c.latency_matrix(), c.bandwidth_matrix() if bandwidth else None, collectives)


def uninstall() -> None:
    """Remove the layer (queued sends still start) and leave ``p2p.launch`` untouched again."""
    global _active, _plain_all_reduce
    p2p._launch_hook = None
    if _plain_all_reduce is not None:
        dist.all_reduce = _plain_all_reduce
        _plain_all_reduce = None
    if _active is not None:
        _active.close()
        _active = None
