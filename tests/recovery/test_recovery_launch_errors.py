"""A peer already gone makes gloo raise at ``isend``/``irecv``/collective *launch* time, before any
wait starts; every failure-aware transfer must turn that into :class:`PeerFailure` (one failure
path), not let the raw gloo ``RuntimeError`` kill the survivor (which made one kill two failures)."""

from __future__ import annotations

import json

import torch.distributed as dist

from tests.conftest import start_ranks
from tests.dist_utils import free_port


# Rank 1 SIGKILLs itself after the group formed; rank 0 then uses every failure-aware transfer
# towards it. Gloo closes the pair on the first error, so each later launch raises at once.
RANK = r"""
from integration.recovery.transfer import recv_state, send_state
from integration.runtime.p2p import RoutedP2P, TensorSpec
all_reduce(torch.zeros(1), mon, "warm-up")
if ctx.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(1.0)
p2p = RoutedP2P(0, wait=mon.wait)
calls = {
    "first receive": lambda: p2p.recv(TensorSpec((2, 3), torch.float32), 1, "act", 0, 0),
    "routed send": lambda: p2p.send(torch.ones(2, 3), 1, "act", 0, 0),
    "routed receive": lambda: p2p.recv(TensorSpec((2, 3), torch.float32), 1, "act", 0, 0),
    "state send": lambda: send_state({"w": torch.ones(3)}, 1, mon, "state"),
    "state receive": lambda: recv_state(1, mon, "state"),
    "all-reduce": lambda: all_reduce(torch.zeros(1), mon, "all-reduce"),
    "all-gather": lambda: all_gather_object(1, mon, "all-gather", 2),
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = "returned"
    except PeerFailure as exc:
        out[name] = "PeerFailure: " + str(exc)[:200]
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
with open(os.path.join(os.environ["OUT"], "r0.json"), "w") as f:
    json.dump(out, f)
os._exit(0)
"""


def test_launch_error_to_a_dead_peer_is_a_peer_failure(tmp_path):
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=True, wait_for_workers=False)
    procs = start_ranks(RANK, 2, tmp_path, port)
    try:
        assert procs[0].wait(timeout=120) == 0
        assert procs[1].wait(timeout=30) == -9
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    del master
    out = json.loads((tmp_path / "r0.json").read_text())
    assert len(out) == 7
    for name, result in out.items():
        assert result.startswith("PeerFailure: "), (name, result)
