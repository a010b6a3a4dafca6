"""The job's rendezvous/coordination store as its own process, away from the training hosts.

    python -m launch.store --host 10.77.0.11 --port 29400 --nnodes 2     # on the batch script's host

A ``torch.distributed.TCPStore`` server and nothing else: every agent (``launch.agent
--external-store --store-host H --store-port P``) and every worker is a client. It holds the
generation counter, failure records, heartbeats, host ownership, spare assignments and the
``gen<G>/`` prefixes the process groups rendezvous under. It exits when the job is over: 0 once
``--nnodes`` training hosts reported their ranks finished, 1 when the job was aborted (key
``abort``), 128+N on signal N; it lingers ``--linger`` seconds first so that clients read the end.

Liveness: beside the store it listens on a second port (published under the key
``liveness/port``); every agent keeps one TCP connection open there. A connection that ends
without the agent's goodbye (its process died: the kernel closes its sockets; or its host went
silent: TCP keepalive, a few seconds) is recorded at once as ``agent/<id>/gone`` = the time, so a
spare host takes over a lost host within a fraction of a second instead of after the agents'
``--host-timeout`` (which stays the fallback). Kernel-level signals only: a busy or starved
agent process is not mistaken for a lost one.

The store is the job's remaining single point of failure: losing its host (or this process) loses
the job's coordination state, and the job stops. Put it on a host that does not train (the
fault-tolerant batch script uses a spare host), and see docs/slurm.md for what would remove it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from integration.recovery.detect import ABORT_KEY

FINISHED_KEY = "agents_finished"
EXIT_BAD_INPUT = 2
LIVENESS_PORT_KEY = "liveness/port"
GOODBYE = b"bye\n"
KEEPALIVE_S = (1, 1, 3)  # idle, interval, probes: a silent host's connection fails after about 4 s


def agent_gone_key(agent_id: str) -> str:
    """Set (to the time) when the agent's liveness connection ended without its goodbye."""
    return f"agent/{agent_id}/gone"


class LivenessListener:
    """Accepts one connection per agent (first line: its id) and records ``agent/<id>/gone`` the
    moment a connection ends without :data:`GOODBYE`. Its own store client (thread-safe use)."""

    def __init__(self, host: str, store_port: int):
        import torch.distributed as dist

        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.store = dist.TCPStore(host if host != "0.0.0.0" else "127.0.0.1", store_port, world_size=None,
                                   is_master=False, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
        self.lock = threading.Lock()
        self.gone: list[str] = []

    def start(self) -> "LivenessListener":
        threading.Thread(target=self._accept, name="liveness-accept", daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._watch, args=(conn,), name="liveness-conn", daemon=True).start()

    def _watch(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            for opt, v in zip((socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT), KEEPALIVE_S):
                conn.setsockopt(socket.IPPROTO_TCP, opt, v)
        buf = b""
        try:
            while b"\n" not in buf:
                chunk = conn.recv(256)
                if not chunk:
                    return
                buf += chunk
            agent_id, rest = buf.split(b"\n", 1)
            while True:
                if GOODBYE in rest:
                    return  # a clean exit: not a loss
                chunk = conn.recv(256)
                if not chunk:
                    break
                rest += chunk
        except OSError:  # reset, or keepalive gave up on a silent host
            pass
        finally:
            conn.close()
        if not buf or b"\n" not in buf:
            return
        name = agent_id.decode(errors="replace")
        with self.lock:
            self.gone.append(name)
            self.store.set(agent_gone_key(name), repr(time.time()))
        print("store: " + json.dumps({"event": "agent_gone", "agent": name, "time": round(time.time(), 3)}),
              file=sys.stderr, flush=True)


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
    live = LivenessListener(host, store.port).start()
    store.set(LIVENESS_PORT_KEY, str(live.port))
    print("store: " + json.dumps({"event": "listening", "host": host, "port": store.port, "nnodes": nnodes,
                                   "liveness_port": live.port, "time": round(time.time(), 3)}),
          file=sys.stderr, flush=True)
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
