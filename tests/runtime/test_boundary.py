"""Boundary payloads (flatten/unflatten) and the per-plan handshake between real gloo processes."""

import pytest
import torch

from integration.runtime.boundary import BoundaryLayout, flatten, single, unflatten
from integration.runtime.p2p import TensorSpec
from integration.runtime.spawn import run_workers


def test_flatten_round_trips_nested_payloads_and_describes_them():
    payload = {"tokens": torch.arange(6).reshape(2, 3), "mask": None,
               "pair": (torch.ones(2, 3, 4), [torch.zeros(1, dtype=torch.bool)])}
    tensors, layout = flatten(payload)
    assert [tuple(t.shape) for t in tensors] == [(2, 3), (2, 3, 4), (1,)]
    assert layout.carries_grad == (False, True, False)
    assert layout.describe() == "{tokens: int64[2, 3], mask: None, pair: (float32[2, 3, 4], [bool[1]])}"
    back = unflatten([t.clone() for t in tensors], layout)
    assert back.keys() == payload.keys() and back["mask"] is None and isinstance(back["pair"], tuple)
    assert torch.equal(back["pair"][0], payload["pair"][0]) and torch.equal(back["tokens"], payload["tokens"])
    assert BoundaryLayout.from_key(layout.key()) == layout
    assert single(TensorSpec((2, 3), torch.float32)).describe() == "float32[2, 3]"
    with pytest.raises(TypeError, match="cannot send a str"):
        flatten({"name": "x"})
    with pytest.raises(ValueError, match="2 tensors for a layout of 3"):
        unflatten(tensors[:2], layout)


def _worker(rank: int, world: int) -> dict:
    from integration.runtime.boundary import BoundaryMismatch, handshake, recv_payload, send_payload
    from integration.runtime.p2p import RoutedP2P

    def name(r: int) -> str:
        return f"stage {r}"

    out = {}
    batch = {"flags": torch.tensor([True, False, True]), "tokens": torch.arange(8).reshape(2, 4),
             "loss_mask": torch.linspace(0, 1, 8).reshape(2, 4), "attention_mask": None}  # odd-sized bool first
    tensors, lay = flatten(batch)
    act = single(TensorSpec((4, 2, 8), torch.float32)).key()
    # 1. agreement: rank 0 sends the batch (rank 1 adopts its layout) and activations both ways.
    if rank == 0:
        got = handshake({(1, "batch"): lay.key(), (1, "act"): act}, {(1, "act"): act}, describe_rank=name)
        p2p = RoutedP2P(rank)
        send_payload(p2p, tensors, 1, "batch", 0, 1)
        p2p.flush()
    else:
        got = handshake({(0, "act"): act}, {(0, "batch"): None, (0, "act"): act}, describe_rank=name)
        received = unflatten(recv_payload(RoutedP2P(rank), got[(0, "batch")], 0, "batch", 0, 1), got[(0, "batch")])
        out["batch_equal"] = (torch.equal(received["tokens"], batch["tokens"]) and received["attention_mask"] is None
                              and torch.equal(received["loss_mask"], batch["loss_mask"])
                              and torch.equal(received["flags"], batch["flags"]))
    out["layouts"] = sorted(got)
    # 2. rank 1 expects another activation shape; 3. rank 1 expects a batch rank 0 does not send;
    # 4. a local refusal on rank 1 only. Every rank must raise the same error.
    other = single(TensorSpec((4, 2, 16), torch.float32)).key()
    cases = {"shape": ({(1, "act"): act}, {}) if rank == 0 else ({}, {(0, "act"): other}),
             "missing": ({}, {}) if rank == 0 else ({}, {(0, "batch"): None}),
             "problem": ({}, {})}
    for case, (sends, expects) in cases.items():
        try:
            handshake(sends, expects, describe_rank=name, hints={"act": "check hidden_size"},
                      problem="model does not fit" if case == "problem" and rank == 1 else None)
            out[case] = None
        except BoundaryMismatch as exc:
            out[case] = str(exc)
    return out


def test_handshake_agrees_or_every_rank_raises_the_same_clear_error():
    a, b = run_workers(_worker, 2)
    assert b["batch_equal"] and b["layouts"] == [(0, "act"), (0, "batch")] and a["layouts"] == [(1, "act")]
    for case in ("shape", "missing", "problem"):
        assert a[case] is not None and a[case] == b[case], case
    assert "stage 0 sends act float32[4, 2, 8] but stage 1 expects float32[4, 2, 16] (check hidden_size)" in a["shape"]
    assert "stage 1 expects batch from stage 0, which sends none" in a["missing"]
    assert a["problem"] == "stage 1: model does not fit"
