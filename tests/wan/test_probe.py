"""``python -m integration.plan probe``: measured links reproduce an emulated network; bad input is named.

Reference: the emulated network's own link table (tests/wan/test_netem.py's 3-host cluster, shaped
by tc and the in-process delay layer); the written file must give it back within 10%.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from integration.runtime.spawn import free_port
from tests.wan.test_netem import CLUSTER, MB, needs_root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAT = np.array([[0, 40, 15], [40, 0, 25], [15, 25, 0]]) * 1e-3
BW = np.array([[np.inf, 4, 10], [4, np.inf, 2], [10, 2, np.inf]]) * MB


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    from integration.plan.probe import ProbeSettings, probe_local, write_cluster
    d = tmp_path_factory.mktemp("probe")
    (d / "wan3.yaml").write_text(CLUSTER)
    res = probe_local(3, ProbeSettings(), emulate=str(d / "wan3.yaml"))
    return res, write_cluster(res, d / "probed.json")


@needs_root
def test_probe_reproduces_the_emulated_links(probed):
    from integration.plan.cluster import load_cluster
    res, path = probed
    c = load_cluster(str(path))
    off = ~np.eye(3, dtype=bool)
    lat = c.latency_matrix()
    assert np.all(np.abs(lat[off] - LAT[off]) <= 0.10 * LAT[off]), lat
    bw = np.array(res.bandwidth_Bps)  # directed measurements
    assert np.all(np.abs(bw[off] - BW[off]) <= 0.10 * BW[off]), bw / MB
    want_cost = LAT + c.workload.activation_bytes / BW
    assert np.all(np.abs(c.cost_matrix()[off] - want_cost[off]) <= 0.10 * want_cost[off])
    assert all(0 < w < 5 for w in c.stage_times()) and all(b > 0 for b in res.backward_s)
    assert len(res.forward_contended_s) == 3 and all(f > 0 for f in res.forward_contended_s)
    assert res.wall_s < 20, "probing 3 ranks must take seconds"


@needs_root
def test_planner_plans_from_the_probed_file(probed):
    from integration.plan.planner import plan_for_training
    from integration.plan.rules import Rules, validate
    _, path = probed
    plan = plan_for_training(str(path), [[0], [1], [2]], 3, 2, 2, 0)
    assert plan.routes and not validate(plan, Rules(memory=2, path_length=3))


def _cli(*args, env=None, timeout=60):
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "integration.plan", "probe", *args], env=e, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_probe_input_is_named(tmp_path):
    port = str(free_port())
    out = str(tmp_path / "c.json")
    procs = {"ranks1": _cli("--ranks", "1", "--out", out),
             "world1": _cli("--out", out, env={"RANK": "0", "WORLD_SIZE": "1"}),
             "noenv": _cli("--out", out)}
    # Rank 2 of 3 never comes: ranks 0 and 1 must name it, not hang in gloo's rendezvous.
    for r in (0, 1):
        procs[f"missing{r}"] = _cli("--out", out, "--timeout", "3", env={
            "RANK": str(r), "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    res = {k: (p.wait(timeout=60), p.communicate()[1]) for k, p in procs.items()}
    for k in ("ranks1", "world1"):
        assert res[k][0] == 2 and "world size 1" in res[k][1] and "at least 2 ranks" in res[k][1], res[k]
    assert res["noenv"][0] == 2 and "no RANK/WORLD_SIZE" in res["noenv"][1], res["noenv"]
    for r in (0, 1):
        rc, err = res[f"missing{r}"]
        assert rc == 2 and "rank(s) [2] of 3 did not reach the store" in err, err
    assert not os.path.exists(out)
