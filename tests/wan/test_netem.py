"""Emulated wide-area links: real processes in real network namespaces, htb bandwidth, in-process latency.

Reference: the link table of the cluster file (X ms, Y MB/s): a transfer of b bytes must take
X + b/Y; the sender's compute loop must not wait for the latency.
"""

import os
import time

import pytest
import torch

from integration.runtime.spawn import run_workers

MB = 1e6
# 3 hosts, asymmetric links: 0->1 40 ms / 4 MB/s, 0->2 15 ms / 10 MB/s, 1->2 25 ms / 2 MB/s.
CLUSTER = """
name: wan-test-3
nodes: [{region: a}, {region: b}, {region: c}]
links:
  - {a: a, b: b, latency_ms: 40, bandwidth_GiB_per_s: %r}
  - {a: a, b: c, latency_ms: 15, bandwidth_GiB_per_s: %r}
  - {a: b, b: c, latency_ms: 25, bandwidth_GiB_per_s: %r}
""" % (4 * MB / 2 ** 30, 10 * MB / 2 ** 30, 2 * MB / 2 ** 30)
NBYTES = 1_000_000
SLACK_S = 0.02  # on top of 10%: process wake-ups on 2 shared cores
PAIRS = [(0, 1), (0, 2), (1, 2), (2, 0)]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def _worker(rank: int, world: int, cluster_file: str, inproc_bw: bool) -> dict:
    import torch.distributed as dist

    from integration.runtime import netem, p2p
    plain = dist.all_reduce
    out = {"hook_before": p2p._launch_hook}
    netem.install_from_cluster(rank, cluster_file, world, bandwidth=inproc_bw, collectives=True)
    x = torch.ones(NBYTES // 4)
    for a, b in PAIRS:
        dist.barrier()
        dist.barrier()  # twice: every rank leaves the first within a short time of the others
        if rank == a:
            t0 = time.monotonic()
            w = p2p.launch(dist.isend, x, dst=b)
            out[f"launch {a}{b}"] = time.monotonic() - t0
            out[f"t0 {a}{b}"] = t0
            w.wait()
        elif rank == b:
            buf = torch.empty_like(x)
            p2p.launch(dist.irecv, buf, src=a).wait()
            out[f"t1 {a}{b}"] = time.monotonic()
    out["all_reduce"] = _timed_all_reduce()
    netem.uninstall()
    out["all_reduce off"] = _timed_all_reduce()
    out["all_reduce restored"] = dist.all_reduce is plain
    out["hook_after"] = p2p._launch_hook
    out["plain_work"] = type(p2p.launch(dist.all_reduce, torch.ones(1), async_op=True)).__name__
    return out


def _timed_all_reduce() -> float:
    import torch.distributed as dist
    dist.barrier()
    dist.barrier()
    t0 = time.monotonic()
    dist.all_reduce(torch.ones(4))
    return time.monotonic() - t0


def _check_all_reduce(results) -> None:
    """gloo's ring over 3 ranks: 2(k-1) = 4 steps, each at least the slowest link's 40 ms."""
    want = 4 * 0.040
    for r in results:
        assert want - 0.005 <= r["all_reduce"] <= 2 * want + SLACK_S, r["all_reduce"]  # upper: loaded cores
        assert r["all_reduce off"] < 0.5 * want and r["all_reduce restored"]


def _elapsed(results) -> dict:
    return {(a, b): results[b][f"t1 {a}{b}"] - results[a][f"t0 {a}{b}"] for a, b in PAIRS}


def _expect(a, b):
    lat = {(0, 1): 0.040, (0, 2): 0.015, (1, 2): 0.025}
    bw = {(0, 1): 4 * MB, (0, 2): 10 * MB, (1, 2): 2 * MB}
    k = (min(a, b), max(a, b))
    return lat[k] + NBYTES / bw[k]


@needs_root
def test_transfer_takes_latency_plus_size_over_bandwidth(tmp_path):
    from integration.plan.cluster import load_cluster
    from integration.runtime.wanhosts import WanHosts
    f = tmp_path / "wan3.yaml"
    f.write_text(CLUSTER)
    with WanHosts(3, load_cluster(str(f)).bandwidth_matrix()):
        res = run_workers(_worker, 3, str(f), False, wan=True)
    for (a, b), t in _elapsed(res).items():
        want = _expect(a, b)
        assert abs(t - want) <= 0.10 * want + SLACK_S, f"{a}->{b}: {t * 1e3:.1f} ms, configured {want * 1e3:.1f} ms"
        assert res[a][f"launch {a}{b}"] < 0.005, "the send must not block the sender for the latency"
    _check_all_reduce(res)
    assert all(r["hook_before"] is None and r["hook_after"] is None for r in res)


def test_in_process_bandwidth_and_off_leaves_no_trace(tmp_path):
    """Without namespaces (loopback) the layer shapes bandwidth itself; off, launch is the plain call."""
    f = tmp_path / "wan3.yaml"
    f.write_text(CLUSTER)
    res = run_workers(_worker, 3, str(f), True)
    for (a, b), t in _elapsed(res).items():
        want = _expect(a, b)
        assert abs(t - want) <= 0.10 * want + SLACK_S, f"{a}->{b}: {t * 1e3:.1f} ms, configured {want * 1e3:.1f} ms"
    assert all(r["plain_work"] != "DelayedWork" for r in res)
    _check_all_reduce(res)
    assert all(r["hook_before"] is None and r["hook_after"] is None for r in res)
