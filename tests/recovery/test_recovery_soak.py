"""Soak: 50+ randomized real failures in one run per backend, every phase, then an independent check.

One seeded schedule of real SIGKILL / SIGSTOP signals (integration/recovery/inject.py) covers the
start-up, the first group's construction, forward and backward ops at random positions, iteration
boundaries, mid-run validation, the recovery itself (a survivor lost before the new group forms
and after it), bursts of two at once, hangs found by heartbeats, the final validation, the final
barrier and the exit after it; any stage, the home stage included (CheckFree+: home mirrored on its
neighbours). Every entry is pinned to its generation (one generation per failure record), so the
schedule is exact and the test knows how many failures to expect.

Checks: the job completes; every failure has its agent record and, on a rank that saw it, its
recovery event (superseded ones included); every step is applied exactly once per rank. The
independent reference: a run resumed without failures from the soak's own checkpoint written after
the last in-training failure (``train.save_every``) must reproduce the soak's per-step state
digests of every rank bitwise from there on, and its final weights, whose last losses were exact
home restores only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from integration.resume import tag_for
from tests.conftest import audit, events, run_agent

STAGES, STEPS, SAVE_EVERY, EVAL_EVERY, TAIL = 5, 36, 4, 6, 8
# Stage pairs lost at once that the ladder rebuilds without a fallback (no two adjacent body
# stages; the home is restored from the holder that survives).
PAIRS = [(1, 3), (2, 4), (0, 2), (0, 3)]
JOB = ["preset=recovery_test", "routing=checkfree_plus", "recovery=checkfree_plus", f"train.steps={STEPS}",
       f"train.save_every={SAVE_EVERY}", f"train.eval_every={EVAL_EVERY}", "recovery.rendezvous_timeout_s=300"]


def soak_schedule(seed: int) -> tuple[str, int, int]:
    """(the ``recovery.inject`` text, failure records it makes, the step of the last in-training failure)."""
    rng = random.Random(seed)
    items: list[str] = []
    gen = 0

    def add(mode: str, stage: int, step: int, phase: str, after: int = 0, at: int | None = None) -> None:
        items.append(f"{mode}:stage={stage},step={step},phase={phase},after_ops={after},gen={gen if at is None else at}")

    add("kill", rng.randrange(STAGES), 0, "startup")
    gen += 1
    add("kill", rng.randrange(STAGES), 0, "construction")  # every process builds generation 1's group
    gen += 1
    last = 0
    for step in range(1, STEPS - TAIL):
        for i in range(rng.choice([1, 1, 2, 2, 3])):
            kind = rng.choice(["op", "op", "op", "hang", "boundary", "burst", "recovery", "regroup", "validation"])
            if kind == "validation" and (step % EVAL_EVERY or i > 0):  # it runs before the step: first only
                kind = "op"
            if kind in ("op", "hang"):
                add("hang" if kind == "hang" else "kill", rng.randrange(STAGES), step,
                    rng.choice(["forward", "backward"]), rng.randint(0, 1))
                gen += 1
            elif kind == "boundary":
                add("kill", rng.randrange(STAGES), step, "boundary")
                gen += 1
            elif kind == "validation":  # the validation after ``step`` steps, before step ``step`` runs
                add("kill", rng.randrange(STAGES), step, "validation")
                gen += 1
            else:  # two at once: both at one boundary, or a survivor lost inside the first one's recovery
                a, b = rng.choice(PAIRS)
                if kind == "burst":
                    add("kill", a, step, "boundary")
                    add("kill", b, step, "boundary")
                else:
                    add("kill", a, step, rng.choice(["forward", "backward"]), rng.randint(0, 1))
                    add("kill", b, step, kind)
                gen += 2
            last = step
    # The end: the home (restored exactly) lost in the final validation and at the final barrier,
    # then any rank right after the barrier (the job is complete: no record, no recovery).
    add("kill", 0, STEPS, "validation")
    gen += 1
    add("kill", 0, STEPS, "final")
    gen += 1
    add("kill", rng.randrange(STAGES), STEPS, "exit")
    return ";".join(items), gen, last


def _run(out: Path, backend: str, *overrides: str, hot_spares: int = 2, timeout: int = 2400):
    return run_agent(("integration/train.py",), f"output_root={out}", f"backend={backend}", *JOB, *overrides,
                     nproc=STAGES, log_dir=out / "logs", hot_spares=hot_spares, heartbeat_timeout=3.0,
                     max_restarts=1000, timeout=timeout)


def _last_digest_per_step(out: Path, rank: int) -> dict[int, str]:
    return {row["step"]: row["digest"] for row in audit(out, rank)}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_soak_fifty_random_failures_then_equal_to_a_failure_free_resume(tmp_path, backend):
    text, failures, last = soak_schedule(seed=2026 if backend == "deepspeed" else 2027)
    assert failures >= 50
    soak = tmp_path / "soak"
    p = _run(soak, backend, f'recovery.inject="{text}"', "recovery.audit=true")
    agent = [json.loads(x[len("agent: "):]) for x in p.stderr.splitlines() if x.startswith("agent: {")]
    assert p.returncode == 0, p.stderr[-6000:]
    recorded = [e for e in agent if e["event"] == "failure"]
    assert len(recorded) == failures, [(e["rank"], e["reason"]) for e in recorded]
    assert [e["generation"] for e in recorded] == list(range(1, failures + 1))
    assert sum("hang" in e["reason"] for e in recorded) == text.count("hang:")
    assert len([e for e in agent if e["event"] == "failure_after_completion"]) == 1
    for r in range(STAGES):
        # Every step applied exactly once on every rank, across all its processes.
        assert [row["step"] for row in audit(soak, r)] == list(range(STEPS)), r
        assert not [e for e in events(soak, r) if e["event"] in ("recovery_failed", "recovery_fallback")], r
    # One event per failure: each rank's events name every generation at most once (a burst or an
    # interrupted recovery shares one event; a superseded one keeps its own), and together they
    # name every failure record.
    named: set[int] = set()
    for r in range(STAGES):
        gens = [g for e in events(soak, r) if e["event"] == "recovery" for g in e["generations"]]
        assert len(gens) == len(set(gens)), (r, gens)
        named |= set(gens)
        summary = json.loads((soak / f"rank{r}" / "summary.json").read_text())
        assert summary["generation"] == failures, r
    assert named == set(range(1, failures + 1)), sorted(set(range(1, failures + 1)) - named)

    # The reference: no failure from the first complete checkpoint after the last in-training failure.
    start = (last // SAVE_EVERY + 1) * SAVE_EVERY  # saved after the last failure's step (and its validation)
    ckpt = soak / "checkpoints" / tag_for(backend, start)
    assert ckpt.is_dir(), sorted(x.name for x in (soak / "checkpoints").iterdir())
    ref = tmp_path / "reference"
    q = _run(ref, backend, f"train.resume={ckpt}", "recovery.audit=true", "train.save_every=0", hot_spares=0,
             timeout=900)
    assert q.returncode == 0, q.stderr[-6000:]
    for r in range(STAGES):
        got, want = _last_digest_per_step(soak, r), _last_digest_per_step(ref, r)
        assert sorted(want) == list(range(start, STEPS)), r
        assert [got[s] for s in range(start, STEPS)] == [want[s] for s in range(start, STEPS)], r
        s_soak = json.loads((soak / f"rank{r}" / "summary.json").read_text())
        s_ref = json.loads((ref / f"rank{r}" / "summary.json").read_text())
        assert s_soak["state_digest"] == s_ref["state_digest"], r
        assert s_soak["val_loss_full_model"] == s_ref["val_loss_full_model"], r
