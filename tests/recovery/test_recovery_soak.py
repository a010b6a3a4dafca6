"""Soak: 20 real SIGKILLs at random stages and moments (forward, backward, iteration boundary) in one run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "launch.agent", "--nproc", "5", "--hot-spares", "1", "--heartbeat-timeout", "20",
           "--max-restarts", str(n), "--log-dir", str(tmp_path / "logs"), "--", "-m", "integration.recovery.worker",
           f"out={tmp_path}", "routing=checkfree_plus", f"train.steps={steps}",
           f'recovery.inject="{schedule(n, steps, 4, seed=11)}"']
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    agent = "\n".join(x for x in p.stderr.splitlines() if x.startswith("agent: "))
    assert p.returncode == 0, agent
    assert agent.count("killed by SIGKILL") == n
    for r in range(5):
        ev = [json.loads(x) for x in (tmp_path / f"rank{r}" / "events.jsonl").read_text().splitlines()]
        if r == 0:  # home stage, never killed: it saw every recovery
            rec = [e for e in ev if e["event"] == "recovery"]
            assert len(rec) == n and [e["generation"] for e in rec] == list(range(1, n + 1))
            assert {m for e in rec for m in e["methods"]} <= {"checkfree", "partner_copy"}
            assert all(e["loss_after"] == e["loss_after"] for e in rec)  # finite
        rows = [json.loads(x) for x in (tmp_path / f"rank{r}" / "audit.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(steps))  # each step applied exactly once
