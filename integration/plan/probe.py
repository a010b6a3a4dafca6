"""Measure a cluster with the job's own processes: links (latency, bandwidth) and stage compute.

Every rank takes part (``torch.distributed``, gloo). Links are measured in rounds of a round-robin
tournament (every round pairs each rank with one other, so the pairs of a round share no host and
run at once): N ranks need N-1 rounds (N even) instead of N(N-1)/2 sequential pair tests.
Per pair (a, b):

* latency: the fastest of ``pings`` round trips of a tiny message, halved (links are taken as
  symmetric in latency; bandwidth is measured per direction);
* bandwidth a->b: a sends ``nbytes`` (grown until the transfer is long against the latency), b
  answers with a tiny message; the round trip minus both latencies is the transfer time (no clock
  shared across hosts is needed), median of ``reps``.

Compute: every rank times the forward and backward of one body stage (``layers_per_stage`` decoder
blocks on one microbatch), once alone (the others wait: ``stage_time_s``, what an op costs in a
network-bound job) and once with all ranks at once (the contention of a fully busy job; kept in
``<out>.probe.json``). The result is a cluster file in the planner's schema (``docs/planner.md``): one
region per rank, a link per pair, ``stage_time_s`` per node, the workload, and a measured ``cost_s``
matrix (directed latency + activation bytes / bandwidth); ``<out>.probe.json`` beside it keeps the raw
measurements (directed bandwidths, backward times).
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024 ** 3
TINY = 8
MIN_TRANSFER_S = 0.05     # a bandwidth sample lasts at least this long (and 4x the latency)
MAX_PROBE_BYTES = 64 * 1024 * 1024


class ProbeError(RuntimeError):
    """The probe cannot run or cannot complete (names the cause and the fix)."""


@dataclass
class ProbeSettings:
    """What the probe sends and computes; the model sizes must match the job's."""

    nbytes: int = 1_000_000
    pings: int = 5
    reps: int = 3
    d_model: int = 128
    n_heads: int = 4
    layers_per_stage: int = 1
    seq_len: int = 64
    micro_batch_size: int = 4
    vocab_size: int = 1024
    compute_reps: int = 5
    timeout_s: float = 30.0

    def check(self, world_size: int) -> None:
        if world_size < 2:
            raise ProbeError(f"probe: world size {world_size}; measuring links needs at least 2 ranks (start the "
                             f"probe on every rank of the job, or give --ranks N >= 2)")
        for k in ("nbytes", "pings", "reps", "compute_reps", "d_model", "n_heads", "layers_per_stage", "seq_len",
                  "micro_batch_size", "vocab_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProbeError(f"probe.{k}: must be an integer >= 1 (got {v!r})")
        if self.nbytes < 1024:
            raise ProbeError(f"probe.nbytes: {self.nbytes}; bandwidth needs a message of >= 1024 bytes")


@dataclass
class ProbeResult:
    """Rank 0's view: symmetric latency, directed bandwidth, per-rank forward/backward seconds."""

    latency_s: list[list[float]]
    bandwidth_Bps: list[list[float]]
    forward_s: list[float]
    backward_s: list[float]
    settings: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    forward_contended_s: list[float] = field(default_factory=list)   # every rank computing at once
    backward_contended_s: list[float] = field(default_factory=list)


def round_robin(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair of ``range(n)`` once (circle method)."""
    ids = list(range(n)) + ([None] if n % 2 else [])
    m = len(ids)
    rounds = []
    for _ in range(m - 1):
        pairs = [(ids[i], ids[m - 1 - i]) for i in range(m // 2)]
        rounds.append([(min(a, b), max(a, b)) for a, b in pairs if a is not None and b is not None])
        ids = [ids[0], ids[-1]] + ids[1:-1]
    return rounds


def _xfer(tensor, peer: int, send: bool) -> None:
    import torch.distributed as dist

    from ..runtime.p2p import launch  # through launch: an emulated network delays these too
    work = launch(dist.isend if send else dist.irecv, tensor, peer)
    work.wait()


def _measure_pair(rank: int, peer: int, s: ProbeSettings) -> dict[str, float]:
    """Both sides call this; the lower rank leads. Returns latency and this rank's outgoing bandwidth.

    Latency: the fastest of ``pings`` round trips, halved (scheduling noise on busy hosts only ever
    adds). Bandwidth: the sender grows the message until the transfer lasts at least
    ``max(MIN_TRANSFER_S, 4 x latency)``, so latency noise is a small part of it; it tells the
    receiver each size first (a tiny message; 0 ends the direction).
    """
    import torch
    lead = rank < peer
    tiny = torch.zeros(TINY // 4)
    rtts = []
    for _ in range(s.pings + 1):  # the first round trip opens the pair: not timed
        t0 = time.perf_counter()
        _xfer(tiny, peer, send=lead)
        _xfer(tiny, peer, send=not lead)
        rtts.append(time.perf_counter() - t0)
    lat = min(rtts[1:]) / 2
    out = {"latency": lat}
    target = max(MIN_TRANSFER_S, 4 * lat)
    for direction in (0, 1):  # 0: lead -> other, 1: other -> lead
        sender = lead if direction == 0 else not lead
        size = torch.tensor([s.nbytes], dtype=torch.int64)
        while True:
            _xfer(size, peer, send=sender)  # the receiver learns the size (0: done)
            n = int(size.item())
            if n == 0:
                break
            big = torch.zeros(n // 4)
            took = []
            for _ in range(s.reps):
                t0 = time.perf_counter()
                _xfer(big, peer, send=sender)
                _xfer(tiny, peer, send=not sender)
                took.append(time.perf_counter() - t0)
            if sender:
                transfer = max(statistics.median(took) - 2 * lat, 1e-6)
                out["bw"] = n / transfer
                grow = transfer < target and n < MAX_PROBE_BYTES
                size = torch.tensor([min(MAX_PROBE_BYTES, int(n * 1.5 * target / transfer)) if grow else 0])
    return out


def _time_stage(s: ProbeSettings) -> tuple[float, float]:
    import torch

    from ..models.llama import BlockStack, LlamaConfig
    cfg = LlamaConfig(vocab_size=s.vocab_size, d_model=s.d_model, n_heads=s.n_heads, seq_len=s.seq_len).validate()
    stack = BlockStack(cfg, s.layers_per_stage)
    x = torch.randn(s.micro_batch_size, s.seq_len, s.d_model, requires_grad=True)
    g = torch.randn(s.micro_batch_size, s.seq_len, s.d_model)
    fwd, bwd = [], []
    for i in range(s.compute_reps + 1):
        t0 = time.perf_counter()
        y = stack(x)
        t1 = time.perf_counter()
        y.backward(g)
        t2 = time.perf_counter()
        if i:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


def probe_rank(rank: int, world: int, s: ProbeSettings) -> ProbeResult | None:
    """Run the probe on this rank of an initialised process group; rank 0 gets the result."""
    import torch
    import torch.distributed as dist
    s.check(world)
    t_start = time.perf_counter()
    n = world
    lat_row = [0.0] * n
    bw_row = [float("inf")] * n  # bw_row[j]: this rank -> j
    for rnd in round_robin(n):
        dist.barrier()
        for a, b in rnd:
            if rank in (a, b):
                peer = b if rank == a else a
                m = _measure_pair(rank, peer, s)
                lat_row[peer] = m["latency"]
                bw_row[peer] = m["bw"]
    dist.barrier()
    cfwd, cbwd = _time_stage(s)  # all ranks at once: the CPU contention of a fully busy job
    fwd = bwd = 0.0
    for r in range(n):  # one rank at a time: what an op costs while the others wait on the network
        dist.barrier()
        if r == rank:
            fwd, bwd = _time_stage(s)
    mine = torch.tensor([*lat_row, *bw_row, fwd, bwd, cfwd, cbwd], dtype=torch.float64)
    rows = [torch.zeros_like(mine) for _ in range(n)]
    dist.all_gather(rows, mine)
    if rank != 0:
        return None
    lat = [[(rows[a][b].item() + rows[b][a].item()) / 2 if a != b else 0.0 for b in range(n)] for a in range(n)]
    bw = [[rows[a][n + b].item() for b in range(n)] for a in range(n)]
    return ProbeResult(lat, bw, [r[2 * n].item() for r in rows], [r[2 * n + 1].item() for r in rows],
                       asdict(s), time.perf_counter() - t_start, [r[2 * n + 2].item() for r in rows],
                       [r[2 * n + 3].item() for r in rows])


def cluster_dict(res: ProbeResult, name: str = "probed", memory: int = 3) -> dict[str, Any]:
    """The planner's cluster schema from a probe: region ``r<i>`` per rank, measured ``cost_s``."""
    s = ProbeSettings(**res.settings)
    n = len(res.forward_s)
    act = 4 * s.d_model * s.seq_len  # fp32 activation bytes per sample
    nodes = [{"region": f"r{i}", "memory": memory, "stage_time_s": res.forward_s[i]} for i in range(n)]
    links = []
    for a in range(n):
        for b in range(a + 1, n):
            # The schema's links are undirected: the slower direction (cost_s keeps both).
            links.append({"a": f"r{a}", "b": f"r{b}", "latency_ms": res.latency_s[a][b] * 1e3,
                          "bandwidth_GiB_per_s": min(res.bandwidth_Bps[a][b], res.bandwidth_Bps[b][a]) / GIB})
    nbytes = act * s.micro_batch_size
    cost = [[0.0 if a == b else res.latency_s[a][b] + nbytes / res.bandwidth_Bps[a][b] for b in range(n)]
            for a in range(n)]
    return {"name": name,
            "workload": {"samples_per_microbatch": s.micro_batch_size, "seq_len": s.seq_len, "d_model": s.d_model,
                         "layers_per_stage": s.layers_per_stage, "bytes_per_value": 4, "vocab_size": s.vocab_size,
                         # measured latency already holds the per-message software cost
                         "overhead_s": 0.0, "activation_bytes_per_sample": act},
            "same_region": {"latency_ms": 0.05, "bandwidth_GiB_per_s": 2.0},
            "nodes": nodes, "links": links, "cost_s": cost}


def write_cluster(res: ProbeResult, out: str | Path, name: str | None = None) -> Path:
    """Write the cluster file (JSON) and ``<out>.probe.json`` with the raw measurements."""
    from .cluster import cluster_from_dict
    out = Path(out)
    data = cluster_dict(res, name or out.stem)
    cluster_from_dict(data)  # what the planner will read must load
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    out.with_name(out.name + ".probe.json").write_text(json.dumps(asdict(res), indent=1))
    return out


def _spawned_rank(rank: int, world: int, s: ProbeSettings, emulate: str | None) -> ProbeResult | None:
    if emulate:
        from ..runtime import netem
        netem.install_from_cluster(rank, emulate, world, bandwidth=False)
    return probe_rank(rank, world, s)


def probe_local(world: int, s: ProbeSettings, emulate: str | None = None) -> ProbeResult:
    """Probe ``world`` ranks spawned here; ``emulate``: on namespace hosts shaped like that cluster file."""
    from ..runtime.spawn import run_workers
    s.check(world)
    if emulate is None:
        return run_workers(probe_rank, world, s)[0]
    from ..runtime.wanhosts import WanHosts
    from .cluster import load_cluster
    c = load_cluster(emulate, num_nodes=world)
    if c.num_nodes != world:
        raise ProbeError(f"probe --emulate: {emulate} has {c.num_nodes} nodes but --ranks is {world}")
    with WanHosts(world, c.bandwidth_matrix()):
        return run_workers(_spawned_rank, world, s, emulate, wan=True)[0]


def join_or_explain(rank: int, world: int, addr: str, port: int, timeout_s: float) -> None:
    """Initialise gloo, first checking through the store that every rank is there; a missing rank
    is named on every rank that came (instead of gloo's timeout deep inside the rendezvous)."""
    import torch.distributed as dist
    try:
        s = dist.TCPStore(addr, port, world, rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        raise ProbeError(f"probe: rank {rank} cannot reach rank 0's store at {addr}:{port} ({exc}); rank 0 is "
                         f"unreachable or was not started (check MASTER_ADDR/MASTER_PORT)") from None
    s.set(f"probe/alive/{rank}", "1")
    deadline = time.monotonic() + timeout_s
    while True:
        if rank != 0 and s.check(["probe/missing"]):
            missing = s.get("probe/missing").decode()
            s.add("probe/told", 1)
            break
        missing = [r for r in range(world) if not s.check([f"probe/alive/{r}"])]
        if not missing:
            missing = ""
            break
        if rank == 0 and time.monotonic() > deadline:
            s.set("probe/missing", str(missing))
            present = world - len(missing) - 1
            until = time.monotonic() + 5.0  # keep the store up until the others have read the verdict
            while s.add("probe/told", 0) < present and time.monotonic() < until:
                time.sleep(0.05)
            break
        time.sleep(0.05)
    if missing:
        raise ProbeError(f"probe: rank(s) {missing} of {world} did not reach the store at {addr}:{port} within "
                         f"{timeout_s:.0f} s: they are unreachable or were not started; check that every rank "
                         f"runs the probe and can reach MASTER_ADDR")
    dist.init_process_group("gloo", store=dist.PrefixStore("probe/pg", s), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
