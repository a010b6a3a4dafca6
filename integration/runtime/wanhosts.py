"""Emulated wide-area hosts on this machine: one network namespace per rank, a bridge, per-link rates.

Host ``i`` is namespace ``wan<i+1>`` with address ``10.78.0.<11+i>`` on interface ``wan0`` (the same
name in every namespace, so ``GLOO_SOCKET_IFNAME=wan0`` fits every rank), joined by the bridge
``sfwan0`` (10.78.0.1) in the root namespace. Egress bandwidth per destination is shaped on each
host's ``wan0`` with an htb class per peer (``tc``; the bytes really queue in the kernel). Latency is
not added here (netem is absent on this machine class): :mod:`integration.runtime.netem` delays
each transfer in-process. Needs root; :class:`WanHosts` is a context manager that always tears
down what it created, also on failure. These names and addresses are this module's own; they are
distinct from the SLURM test cluster's (``launch/testing/cluster.sh``: h1..hN, sfbr0, 10.77.0.0/24).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from dataclasses import dataclass
from typing import Sequence

import numpy as np

BRIDGE = "sfwan0"
NET = "10.78.0"
IFNAME = "wan0"
CLONE_NEWNET = 0x40000000
MAX_HOSTS = 200


class WanSetupError(RuntimeError):
    """The emulated network could not be built (not root, no ``ip``/``tc``, leftovers in the way)."""


def _run(*cmd: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise WanSetupError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")


def host_name(i: int) -> str:
    return f"wan{i + 1}"


def host_address(i: int) -> str:
    return f"{NET}.{11 + i}"


def enter_host(i: int) -> None:
    """Move the calling process (single-threaded, before any socket) into host ``i``'s namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{host_name(i)}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise WanSetupError(f"setns into {host_name(i)}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def enter_from_env() -> None:
    """``SKIPFREE_WAN_HOSTS=1`` (tests, benchmarks): the job's rank ``$RANK`` moves into host ``wan<RANK+1>``
    and gloo uses its interface. Called first thing by ``integration/train.py``, before any socket;
    the agent then runs in the root namespace with ``--store-host 10.78.0.1`` (the bridge)."""
    rank = os.environ.get("RANK", "")
    if not rank.isdigit():
        raise WanSetupError("SKIPFREE_WAN_HOSTS=1: every process needs its RANK to pick its host (no hot spares)")
    enter_host(int(rank))
    os.environ["GLOO_SOCKET_IFNAME"] = IFNAME


def set_rate(i: int, j: int, bandwidth_Bps: float) -> None:
    """Change the i -> j egress rate of a live emulated network (a link slowing down mid-run)."""
    bits = max(8000, int(bandwidth_Bps * 8))
    burst = max(1600, int(bandwidth_Bps * 0.002))
    _run("ip", "netns", "exec", host_name(i), "tc", "class", "change", "dev", IFNAME, "parent", "1:", "classid",
         f"1:{10 + j}", "htb", "rate", f"{bits}bit", "burst", str(burst), "cburst", str(burst))


@dataclass
class WanHosts:
    """``n`` namespace hosts with per-destination egress rates ``bandwidth_Bps[i][j]`` (bytes/s;
    ``inf`` or ``None``: unshaped)."""

    n: int
    bandwidth_Bps: Sequence[Sequence[float]] | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.n <= MAX_HOSTS:
            raise WanSetupError(f"WanHosts.n: {self.n}; emulate 2..{MAX_HOSTS} hosts")
        if os.geteuid() != 0:
            raise WanSetupError("network emulation needs root (network namespaces, tc); run the benchmark as root")
        self._created: list[tuple[str, str]] = []

    @property
    def addresses(self) -> list[str]:
        return [host_address(i) for i in range(self.n)]

    def __enter__(self) -> "WanHosts":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        clash = [host_name(i) for i in range(self.n) if host_name(i) in existing]
        if clash or subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0:
            raise WanSetupError(f"emulated network already present ({', '.join(clash) or BRIDGE}): another run is "
                                f"using it, or one crashed; remove it with `python -m integration.runtime.wanhosts "
                                f"down {self.n}`")
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._created.append(("link", BRIDGE))
        _run("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i in range(self.n):
            ns, peer, outer = host_name(i), f"wanv{i + 1}", f"wane{i + 1}"
            _run("ip", "netns", "add", ns)
            self._created.append(("netns", ns))
            _run("ip", "link", "add", peer, "type", "veth", "peer", "name", outer)
            self._created.append(("link", peer))
            _run("ip", "link", "set", outer, "netns", ns)
            _run("ip", "link", "set", peer, "master", BRIDGE)
            _run("ip", "link", "set", peer, "up")
            x = ["ip", "netns", "exec", ns]
            _run(*x, "ip", "link", "set", outer, "name", IFNAME)
            _run(*x, "ip", "addr", "add", f"{host_address(i)}/24", "dev", IFNAME)
            _run(*x, "ip", "link", "set", IFNAME, "up")
            _run(*x, "ip", "link", "set", "lo", "up")
            if self.bandwidth_Bps is not None:
                self._shape(i)

    def _shape(self, i: int) -> None:
        """htb on host i's egress: class 1:(10+j) at the i->j rate, matched by destination address."""
        x = ["ip", "netns", "exec", host_name(i), "tc"]
        rates = np.asarray(self.bandwidth_Bps, dtype=float)
        _run(*x, "qdisc", "add", "dev", IFNAME, "root", "handle", "1:", "htb", "default", "1")
        _run(*x, "class", "add", "dev", IFNAME, "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit")
        for j in range(self.n):
            if j == i or not np.isfinite(rates[i][j]):
                continue
            bits = max(8000, int(rates[i][j] * 8))
            # burst of ~2 ms at the rate (>= one MTU frame): htb meters smoothly at these rates.
            burst = max(1600, int(rates[i][j] * 0.002))
            _run(*x, "class", "add", "dev", IFNAME, "parent", "1:", "classid", f"1:{10 + j}", "htb", "rate",
                 f"{bits}bit", "burst", str(burst), "cburst", str(burst))
            _run(*x, "filter", "add", "dev", IFNAME, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match",
                 "ip", "dst", f"{host_address(j)}/32", "flowid", f"1:{10 + j}")

    def down(self) -> None:
        for kind, name in reversed(self._created):
            cmd = ["ip", "netns", "del", name] if kind == "netns" else ["ip", "link", "del", name]
            subprocess.run(cmd, capture_output=True)
        self._created.clear()


def teardown(n: int) -> None:
    """Remove every leftover of an emulated network of up to ``n`` hosts (after a crash)."""
    for i in range(n):
        subprocess.run(["ip", "netns", "del", host_name(i)], capture_output=True)
        subprocess.run(["ip", "link", "del", f"wanv{i + 1}"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 3 or sys.argv[1] != "down":
        sys.exit("usage: python -m integration.runtime.wanhosts down <hosts>")
    teardown(int(sys.argv[2]))
