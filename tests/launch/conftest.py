"""A real SLURM test cluster (launch/testing/cluster.sh), started once per test run for the tests that ask."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "launch" / "testing" / "cluster.sh"
HOSTS = 5  # h1: store + spare host, h2: a second spare host, h3..h5: training hosts (the tests pick --nodes)
CLUSTER_DIR = "/tmp/skipfree-cluster-tests"


class Cluster:
    def __init__(self, env: dict[str, str], up_s: float):
        self.env = env
        self.up_s = up_s

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def heal(self) -> None:
        """Restart the slurmd of any host a test killed, and wait until every node is idle again."""
        self.run(str(CLUSTER), "heal", timeout=180)

    def host_pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (network namespaces, slurmd); CI runs as root")
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "nsenter") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"{missing} not installed: run .ci/run (apt-get install -y slurm-wlm munge) first")
    env = dict(os.environ, SKIPFREE_CLUSTER_HOSTS=str(HOSTS), SKIPFREE_CLUSTER_DIR=CLUSTER_DIR,
               SLURM_CONF=f"{CLUSTER_DIR}/slurm.conf", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        env.pop(k)  # a test run inside an allocation must not leak its job into ours
    if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
        pytest.fail("a slurmctld is already running (another test cluster uses the same host names h1..hN): "
                    "stop it first, e.g. launch/testing/cluster.sh down")
    t0 = time.time()
    up = subprocess.run([str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=240)
    if up.returncode != 0:
        subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    cluster = Cluster(env, time.time() - t0)
    try:
        yield cluster
    finally:
        subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)
