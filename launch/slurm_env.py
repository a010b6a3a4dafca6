"""The SLURM allocation as a training job sees it: nodes, addresses, ranks, master address and port.

Used by the batch scripts in ``launch/slurm/`` (nothing here imports torch, so a check costs ~1 s):

    python -m launch.slurm_env check --ranks-per-node 2 [--spare-hosts 1] -- <hydra overrides>
    python -m launch.slurm_env hostfile --ranks-per-node 2 > hostfile      # deepspeed's hostfile format
    python -m launch.slurm_env exec -- integration/train.py <overrides>    # one srun task = one rank (env://)
    python -m launch.slurm_env agent -- integration/train.py <overrides>   # one srun task = this node's agent

``check`` refuses, with one message naming the variable or field and the fix and exit code 2, an
allocation that cannot run the layout: no ``SLURM_JOB_NODELIST``, fewer hosts than the layout needs,
``parallel.stages x parallel.replicas [x parallel.tensor]`` not equal to training hosts x ranks per
host, or a master/store port already in use on this host. On success it prints shell assignments
(``MASTER_ADDR``, ``MASTER_PORT``, ``SKIPFREE_TRAIN_HOSTS``, ``SKIPFREE_SPARE_HOSTS``, ...) for ``eval``.

Hostnames need not resolve: a node's address is its ``NodeAddr`` from ``scontrol show node``
(the same name can mean another machine in each network namespace of a test cluster). Gloo picks
its interface from the hostname unless told; ``exec`` sets ``GLOO_SOCKET_IFNAME`` to the interface
that holds this node's address when the user has not set it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
EXIT_BAD_INPUT = 2


class AllocationError(ValueError):
    """The allocation or the environment cannot run the job; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------- node lists
def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist (``h[1-3,7],gpu[01-02],login``) into names, in order.

    The same grammar as ``scontrol show hostnames`` for one bracket group per name (what SLURM
    itself emits), zero padding kept. Raises :class:`AllocationError` for malformed input.
    """
    names: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", part)
        if not m:
            if not part or "[" in part or "]" in part:
                raise AllocationError(f"SLURM_JOB_NODELIST: cannot read {nodelist!r} (at {part!r})")
            names.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise AllocationError(f"SLURM_JOB_NODELIST: cannot read range {r!r} in {nodelist!r}")
            hi = hi or lo
            if int(hi) < int(lo):
                raise AllocationError(f"SLURM_JOB_NODELIST: empty range {r!r} in {nodelist!r}")
            width = len(lo) if lo.startswith("0") else 0
            names += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
    if not names:
        raise AllocationError("SLURM_JOB_NODELIST: empty; run inside an allocation (sbatch/salloc)")
    return names


def _split_top_level(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [p for p in out if p] if s else []


def node_address(name: str) -> str:
    """The address other nodes reach ``name`` at: SLURM's ``NodeAddr``, else DNS, else the name."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True,
                             timeout=10).stdout
        m = re.search(r"\bNodeAddr=(\S+)", out)
        if m:
            return m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def interface_for(address: str) -> str | None:
    """The local network interface that holds ``address`` (None if none does or ``ip`` is missing)."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 4 and f[2] == "inet" and f[3].split("/")[0] == address:
            return f[1]
    return None


def port_in_use(address: str, port: int) -> bool:
    """True if ``port`` cannot be bound on ``address`` here (someone listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return True
    return False


# ---------------------------------------------------------------------------------------- allocation
@dataclass
class Allocation:
    """The job's hosts (in SLURM order) and, inside a task, this task's place."""

    job_id: str
    nodes: list[str]
    addresses: list[str]
    proc_id: int | None = None
    local_id: int | None = None
    ntasks: int | None = None
    node_name: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, resolve: bool = True) -> "Allocation":
        env = os.environ if env is None else env
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise AllocationError("SLURM_JOB_NODELIST: not set; run inside a SLURM allocation (sbatch "
                                  "launch/slurm/<script>.sbatch, or salloc), or set it to the job's hosts")
        nodes = expand_nodelist(nodelist)
        addresses = [node_address(n) for n in nodes] if resolve else list(nodes)

        def num(key: str) -> int | None:
            v = env.get(key)
            if v is None:
                return None
            if not v.strip().isdigit():
                raise AllocationError(f"{key}: {v!r} is not a non-negative integer")
            return int(v)

        return cls(job_id=env.get("SLURM_JOB_ID", ""), nodes=nodes, addresses=addresses,
                   proc_id=num("SLURM_PROCID"), local_id=num("SLURM_LOCALID"), ntasks=num("SLURM_NTASKS"),
                   node_name=env.get("SLURMD_NODENAME"))

    def address_of(self, node: str) -> str:
        return self.addresses[self.nodes.index(node)]

    @property
    def this_address(self) -> str | None:
        return self.address_of(self.node_name) if self.node_name in self.nodes else None


@dataclass
class Layout:
    """Which hosts train (node rank = index) and which wait as spare hosts."""

    train_hosts: list[str]
    spare_hosts: list[str]
    ranks_per_host: int
    world_size: int


def plan_layout(alloc: Allocation, ranks_per_host: int, spare_hosts: int, world_size: int) -> Layout:
    """Split the allocation: the first ``spare_hosts`` nodes wait, the rest train.

    The batch script runs on the first node, which also runs the store: making it a spare keeps the
    store off every training host (losing any training host, rank 0's included, leaves it).
    """
    if ranks_per_host < 1:
        raise AllocationError(f"--ranks-per-node: must be >= 1, got {ranks_per_host}")
    if spare_hosts < 0:
        raise AllocationError(f"--spare-hosts: must be >= 0, got {spare_hosts}")
    n = len(alloc.nodes)
    train = n - spare_hosts
    if train < 1:
        raise AllocationError(f"SLURM_JOB_NODELIST: {n} hosts ({','.join(alloc.nodes)}) leave none to train with "
                              f"{spare_hosts} spare hosts; allocate more nodes (#SBATCH --nodes) or lower the spares")
    if train * ranks_per_host != world_size:
        hint = (f"#SBATCH --nodes={world_size // ranks_per_host + spare_hosts}" if world_size % ranks_per_host == 0
                else f"ranks per host dividing {world_size}")
        raise AllocationError(
            f"parallel: the layout needs {world_size} ranks but the allocation gives {train} training hosts x "
            f"{ranks_per_host} ranks = {train * ranks_per_host} (SLURM_JOB_NODELIST={','.join(alloc.nodes)}, "
            f"{spare_hosts} spare hosts); use {hint}, or change parallel.stages/replicas/tensor")
    return Layout(alloc.nodes[spare_hosts:], alloc.nodes[:spare_hosts], ranks_per_host, world_size)


def world_size_of(overrides: Sequence[str]) -> int:
    """World size the main job's config (Hydra defaults + ``overrides``) asks for, without computing."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    # registers the typed schema hydra_conf/config.yaml starts from (imports no torch)
    from integration.schema import quote_failure_schedule

    quoted = quote_failure_schedule(list(overrides))
    try:
        with initialize_config_dir(config_dir=str(ROOT / "hydra_conf"), version_base=None):
            cfg = compose(config_name="config", overrides=quoted)
    except HydraException as exc:
        raise AllocationError(f"overrides: {str(exc).splitlines()[0]}") from exc
    par = OmegaConf.to_container(cfg.parallel, resolve=True)
    megatron = str(cfg.backend.name) == "megatron"
    try:
        sizes = [int(par["stages"]), int(par["replicas"]), int(par.get("tensor", 1)) if megatron else 1]
    except (KeyError, TypeError, ValueError) as exc:
        raise AllocationError(f"parallel: stages/replicas/tensor must be integers, got {par}") from exc
    return sizes[0] * sizes[1] * sizes[2]


def shell_exports(values: Mapping[str, object]) -> str:
    return "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in values.items())


# ---------------------------------------------------------------------------------------- commands
def cmd_check(a: argparse.Namespace, overrides: list[str]) -> int:
    alloc = Allocation.from_env()
    layout = plan_layout(alloc, a.ranks_per_node, a.spare_hosts, world_size_of(overrides))
    master_node = layout.train_hosts[0] if a.master == "first-train" else alloc.nodes[0]
    master = alloc.address_of(master_node)
    if a.port <= 0 or a.port > 65535:
        raise AllocationError(f"--port: {a.port} is not a TCP port (1-65535)")
    local = alloc.this_address or "0.0.0.0"
    if master_node == alloc.node_name or not alloc.node_name:
        if port_in_use(local if alloc.this_address else "0.0.0.0", a.port):
            raise AllocationError(f"MASTER_PORT: port {a.port} is in use on {alloc.node_name or 'this host'} "
                                  f"({local}); pick a free one (MASTER_PORT=<port> sbatch ...)")
    print(shell_exports({
        "MASTER_ADDR": master, "MASTER_PORT": a.port,
        "SKIPFREE_WORLD_SIZE": layout.world_size, "SKIPFREE_RANKS_PER_HOST": layout.ranks_per_host,
        "SKIPFREE_TRAIN_HOSTS": ",".join(layout.train_hosts), "SKIPFREE_SPARE_HOSTS": ",".join(layout.spare_hosts),
        "SKIPFREE_NNODES": len(layout.train_hosts)}))
    return 0


def cmd_hostfile(a: argparse.Namespace, overrides: list[str]) -> int:
    alloc = Allocation.from_env(resolve=False)
    for n in alloc.nodes:
        print(f"{n} slots={a.ranks_per_node}")
    return 0


def exec_env(env: Mapping[str, str]) -> dict[str, str]:
    """env:// variables for one srun task (one rank) from SLURM's per-task variables."""
    alloc = Allocation.from_env(env)
    missing = [k for k, v in (("SLURM_PROCID", alloc.proc_id), ("SLURM_NTASKS", alloc.ntasks)) if v is None]
    if missing:
        raise AllocationError(f"{missing[0]}: not set; start this under srun (one task per rank)")
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise AllocationError("MASTER_ADDR/MASTER_PORT: not set; eval \"$(python -m launch.slurm_env check ...)\" "
                              "in the batch script first")
    out = dict(env)
    out.update({"RANK": str(alloc.proc_id), "WORLD_SIZE": str(alloc.ntasks),
                "LOCAL_RANK": str(alloc.local_id or 0)})
    if "GLOO_SOCKET_IFNAME" not in env and alloc.this_address:
        iface = interface_for(alloc.this_address)
        if iface:
            out["GLOO_SOCKET_IFNAME"] = iface
    return out


def cmd_exec(a: argparse.Namespace, command: list[str]) -> int:
    if not command:
        raise AllocationError("exec: nothing to run; usage: python -m launch.slurm_env exec -- script.py [args]")
    env = exec_env(os.environ)
    print(f"launch.slurm_env: rank {env['RANK']}/{env['WORLD_SIZE']} on node {env.get('SLURMD_NODENAME', '?')} "
          f"(gloo interface {env.get('GLOO_SOCKET_IFNAME', 'default')}), master {env['MASTER_ADDR']}:{env['MASTER_PORT']}",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *command], env)
    return 0  # not reached


def agent_argv(env: Mapping[str, str], command: list[str]) -> list[str]:
    """The ``launch.agent`` command line for this node of a fault-tolerant job (see train_ft.sbatch).

    Reads what ``check`` exported (``SKIPFREE_TRAIN_HOSTS`` ...) plus ``SKIPFREE_HOT_SPARES`` (per
    training host), ``SKIPFREE_SPARE_HOST_WORKERS`` (pre-started workers on a spare host: a waiting
    spare; 0: cold), ``SKIPFREE_RANK_ORDER`` (strided, default: a stage's replicas on different
    hosts; or block) and ``SKIPFREE_AGENT_ARGS`` (more agent flags).
    """
    node = env.get("SLURMD_NODENAME")
    if not node:
        raise AllocationError("SLURMD_NODENAME: not set; start this under srun (one task per node)")
    for key in ("SKIPFREE_TRAIN_HOSTS", "SKIPFREE_RANKS_PER_HOST", "MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key):
            raise AllocationError(f"{key}: not set; eval \"$(python -m launch.slurm_env check ...)\" first")
    train = env["SKIPFREE_TRAIN_HOSTS"].split(",")
    spares = [h for h in env.get("SKIPFREE_SPARE_HOSTS", "").split(",") if h]
    argv = [sys.executable, "-m", "launch.agent", "--external-store", "--store-host", env["MASTER_ADDR"],
            "--store-port", env["MASTER_PORT"], "--nnodes", str(len(train)),
            "--nproc", env["SKIPFREE_RANKS_PER_HOST"], "--host-name", node,
            "--rank-order", env.get("SKIPFREE_RANK_ORDER", "strided")]
    if node in train:
        argv += ["--node-rank", str(train.index(node)), "--hot-spares", env.get("SKIPFREE_HOT_SPARES", "1")]
    elif node in spares:
        argv += ["--spare-host", "--hot-spares",
                 env.get("SKIPFREE_SPARE_HOST_WORKERS", env["SKIPFREE_RANKS_PER_HOST"])]
    else:
        raise AllocationError(f"SLURMD_NODENAME: {node} is neither a training host ({','.join(train)}) nor a "
                              f"spare host ({','.join(spares) or 'none'})")
    return argv + shlex.split(env.get("SKIPFREE_AGENT_ARGS", "")) + ["--", *command]


def cmd_agent(a: argparse.Namespace, command: list[str]) -> int:
    if not command:
        raise AllocationError("agent: nothing to run; usage: python -m launch.slurm_env agent -- script.py [args]")
    argv = agent_argv(os.environ, command)
    os.chdir(ROOT)
    os.execv(argv[0], argv)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="launch.slurm_env", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("check", "hostfile"):
        s = sub.add_parser(name)
        s.add_argument("--ranks-per-node", type=int, required=True, help="training ranks on every training host")
        if name == "check":
            s.add_argument("--spare-hosts", type=int, default=0, help="hosts that wait to replace a lost one")
            s.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")),
                           help="master (plain) or store (fault-tolerant) port; default $MASTER_PORT or 29500")
            s.add_argument("--master", choices=("first-train", "first"), default="first-train",
                           help="which host serves the master address: the first training host (plain runs) "
                                "or the allocation's first host (the store of fault-tolerant runs)")
    sub.add_parser("exec")
    sub.add_parser("agent")
    a = p.parse_args(argv)
    try:
        return {"check": cmd_check, "hostfile": cmd_hostfile, "exec": cmd_exec, "agent": cmd_agent}[a.cmd](a, rest)
    except AllocationError as exc:
        print(f"launch.slurm_env: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
