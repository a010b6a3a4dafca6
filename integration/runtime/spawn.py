"""Launch real multi-process torch.distributed (gloo) jobs on one machine (tests, benchmarks).

Workers are spawned processes; each initialises gloo through a TCP rendezvous on a free port,
runs ``fn(rank, world_size, *args)`` and pickles its return value for the parent.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple,
            wan: bool = False) -> None:
    addr = "127.0.0.1"
    if wan:  # rank i runs on emulated host i (integration/runtime/wanhosts.py), rank 0's host has the store
        from .wanhosts import IFNAME, enter_host, host_address
        enter_host(rank)
        addr = host_address(0)
        os.environ["GLOO_SOCKET_IFNAME"] = IFNAME
    os.environ.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(world_size),
                       "MASTER_ADDR": addr, "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # report any failure to the parent, then exit non-zero
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    path.write_bytes(pickle.dumps(result))
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    if result[0] != "ok":
        raise SystemExit(1)


def run_workers(fn: Callable, world_size: int, *args: Any, wan: bool = False) -> list[Any]:
    """Run ``fn`` on ``world_size`` ranks; return per-rank results or raise with every rank's error.
    ``wan``: rank i runs in the network namespace of emulated host i (a live ``wanhosts.WanHosts``)."""
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        ctx = mp.start_processes(_worker, args=(world_size, port, out, fn, args, wan), nprocs=world_size,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join():
                pass
        except Exception:
            pass
        results, errors = [], []
        for r in range(world_size):
            p = Path(out) / f"rank{r}.pkl"
            if not p.exists():
                errors.append(f"rank {r}: no result (crashed)")
                results.append(None)
                continue
            status, value = pickle.loads(p.read_bytes())
            if status != "ok":
                errors.append(f"rank {r}: {value}")
            results.append(value)
        if errors:
            raise RuntimeError("distributed workers failed:\n" + "\n".join(errors))
        return results
