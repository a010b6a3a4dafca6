"""Soak: 20 real SIGKILLs at random stages and moments (forward, backward, iteration boundary) in one run."""

from __future__ import annotations

import random

import pytest

from tests.conftest import audit, events, run_agent_job


def schedule(n: int, steps: int, body_stages: int, seed: int) -> str:
    """``n`` kills on distinct steps, random body stage, phase and microbatch position."""
    rng = random.Random(seed)
    items = []
    for step in sorted(rng.sample(range(1, steps - 1), n)):
        stage = rng.randint(1, body_stages)
        phase = rng.choice(["forward", "backward", "boundary"])
        after = 0 if phase == "boundary" else rng.randint(0, 1)
        items.append(f"kill:stage={stage},step={step},phase={phase},after_ops={after}")
    return ";".join(items)


@pytest.mark.slow
def test_twenty_random_failures_twenty_recoveries(tmp_path):
    n, steps = 20, 24
    rc, agent = run_agent_job(tmp_path, "routing=checkfree_plus", f"train.steps={steps}",
                              f'recovery.inject="{schedule(n, steps, 4, seed=11)}"', heartbeat_timeout=20,
                              max_restarts=n, timeout=1500)
    assert rc == 0, agent
    assert agent.count("killed by SIGKILL") == n
    for r in range(5):
        ev = events(tmp_path, r)
        if r == 0:  # home stage, never killed: it saw every recovery
            rec = [e for e in ev if e["event"] == "recovery"]
            assert len(rec) == n and [e["generation"] for e in rec] == list(range(1, n + 1))
            assert {m for e in rec for m in e["methods"]} <= {"checkfree", "partner_copy"}
            assert all(e["loss_after"] == e["loss_after"] for e in rec)  # finite
        rows = audit(tmp_path, r)
        assert [row["step"] for row in rows] == list(range(steps))  # each step applied exactly once
