"""The job's rendezvous/coordination store as its own process, away from the training hosts.

    python -m launch.store --host 10.77.0.11 --port 29400 --nnodes 2     # on the batch script's host

A ``torch.distributed.TCPStore`` server and nothing else: every agent (``launch.agent
--external-store --store-host H --store-port P``) and every worker is a client. It holds the
generation counter, failure records, heartbeats, host ownership, spare assignments and the
``gen<G>/`` prefixes the process groups rendezvous under. It exits when the job is over: 0 once
``--nnodes`` training hosts reported their ranks finished, 1 when the job was aborted (key
``abort``), 128+N on signal N; it lingers ``--linger`` seconds first so that clients read the end.

The store is the job's remaining single point of failure: losing its host (or this process) loses
the job's coordination state, and the job stops. Put it on a host that does not train (the
fault-tolerant batch script uses a spare host), and see docs/slurm.md for what would remove it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import time
from pathlib import Path

from integration.recovery.detect import ABORT_KEY

FINISHED_KEY = "agents_finished"
EXIT_BAD_INPUT = 2


def serve(host: str, port: int, nnodes: int, linger_s: float = 2.0, poll_s: float = 0.2,
          ready_file: str | None = None) -> int:
    """Run the store until the job ends; returns the exit code (see the module docstring)."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore(host, port, world_size=None, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=60))
    except (RuntimeError, OSError) as exc:
        print(f"launch.store: --port: cannot listen on {host}:{port} ({str(exc).splitlines()[0][:160]}); "
              f"pick a free port or stop what uses it", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    stop: list[int] = []

    def on_signal(signum, _frame) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("store: " + json.dumps({"event": "listening", "host": host, "port": store.port, "nnodes": nnodes,
                                   "time": round(time.time(), 3)}), file=sys.stderr, flush=True)
    if ready_file:
        Path(ready_file).write_text(f"{host}:{store.port}\n")
    rc = 0
    while True:
        if stop:
            rc = 128 + stop[0]
            store.set(ABORT_KEY, f"the store was stopped by {signal.Signals(stop[0]).name}")
            break
        if store.check([ABORT_KEY]):
            rc = 1
            break
        if int(store.add(FINISHED_KEY, 0)) >= nnodes:
            break
        time.sleep(poll_s)
    reason = store.get(ABORT_KEY).decode() if store.check([ABORT_KEY]) else ""
    print("store: " + json.dumps({"event": "job_end", "rc": rc, "abort": reason, "time": round(time.time(), 3)}),
          file=sys.stderr, flush=True)
    time.sleep(linger_s)  # let agents and workers read the final keys before the server goes
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch.store", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    p.add_argument("--nnodes", type=int, required=True, help="training hosts whose agents must finish")
    p.add_argument("--linger", type=float, default=2.0, help="seconds to stay up after the job ended")
    p.add_argument("--ready-file", default=None, help="write host:port here once listening")
    a = p.parse_args(argv)
    if not 1 <= a.port <= 65535:
        p.error(f"--port: {a.port} is not a TCP port (1-65535)")
    if a.nnodes < 1:
        p.error(f"--nnodes: must be >= 1, got {a.nnodes}")
    return serve(a.host, a.port, a.nnodes, a.linger, ready_file=a.ready_file)


if __name__ == "__main__":
    sys.exit(main())
