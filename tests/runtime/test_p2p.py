"""Header-checked p2p between real gloo processes: round trips, and mismatches caught, not corrupted."""

import torch

from integration.runtime.spawn import run_workers


def _worker(rank: int, world: int) -> dict:
    from integration.runtime.p2p import RoutedP2P, TensorSpec, TransferMismatch

    p2p = RoutedP2P(rank)
    out = {}
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    labels = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    half = torch.linspace(0, 1, 8, dtype=torch.bfloat16).reshape(2, 4)
    if rank == 0:
        p2p.send(x, 1, "act", mb=5, step=3)
        p2p.send(labels, 1, "labels", mb=5, step=3)
        p2p.send(half, 1, "grad", mb=1, step=3)
        p2p.send(x, 1, "act", mb=6, step=3)                 # receiver expects mb 7
        p2p.send(x.reshape(3, 2, 4), 1, "act", mb=8, step=3)  # same bytes, other shape
        p2p.flush()
        out["bytes"] = p2p.bytes_sent
    else:
        out["act"] = torch.equal(p2p.recv(TensorSpec((2, 3, 4), torch.float32), 0, "act", 5, 3), x)
        out["labels"] = torch.equal(p2p.recv(TensorSpec((2, 3), torch.int64), 0, "labels", 5, 3), labels)
        out["bf16"] = torch.equal(p2p.recv(TensorSpec((2, 4), torch.bfloat16), 0, "grad", 1, 3), half)
        for mb in (7, 8):
            try:
                p2p.recv(TensorSpec((2, 3, 4), torch.float32), 0, "act", mb, 3)
                out[f"mismatch{mb}"] = None
            except TransferMismatch as exc:
                out[f"mismatch{mb}"] = str(exc)
    return out


def test_p2p_round_trip_and_mismatch_detection():
    sender, receiver = run_workers(_worker, 2)
    assert receiver["act"] and receiver["labels"] and receiver["bf16"]
    assert "expected act of microbatch 7" in receiver["mismatch7"] and "microbatch 6" in receiver["mismatch7"]
    assert "shape (2, 3, 4)" in receiver["mismatch8"] and "shape (3, 2, 4)" in receiver["mismatch8"]
    assert sender["bytes"] == 3 * 96 + 48 + 16  # payload bytes: 3 float32 acts, int64 labels, bf16 grad
