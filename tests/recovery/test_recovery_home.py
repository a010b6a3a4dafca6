"""CheckFree+ home replication (E + H mirrored on the neighbouring stage nodes), spec section 3.

Real processes under ``launch.agent``, real SIGKILL, gloo, DeepSpeed: the home stage (rank 0) is
killed three times (mid-backward, mid-forward, and together with its neighbour stage 1) and is
rebuilt each time bitwise (weights + Adam state) from a surviving neighbour's mirror. Plus a pure
check that the mirror's replayed optimizer step equals the home's, and the announced fallback when
replication is off.
"""

from __future__ import annotations

from pathlib import Path

import torch

from integration.recovery.home import _build_mirror, _mirror_step
from integration.recovery.rebuild import set_lr_scale
from integration.recovery.state import digest_of, state_digest

from tests.conftest import rows, run_agent_job


def run_job(tmp: Path, *overrides: str, timeout: int = 400) -> tuple[int, str]:
    return run_agent_job(tmp, *overrides, max_restarts=6, timeout=timeout)


def test_home_mirror_step_is_bitwise_the_home_step():
    """The holder's replay (same grads, clip coefficient, lr x lr_scale) equals AdamW's step on the home."""
    torch.manual_seed(0)
    home = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 16))
    opt = torch.optim.AdamW(home.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    set_lr_scale(opt, 1.1)  # a home restored from a checkpoint keeps its multiplier: the mirror must too
    names = {id(p): n for n, p in home.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    mirror = _build_mirror({"step": 0, "model": {k: v.clone() for k, v in home.state_dict().items()},
                            "optimizer": opt.state_dict(), "names": [names[id(p)] for p in params],
                            "groups": [len(g["params"]) for g in opt.param_groups],
                            "optimizer_class": ("torch.optim.adamw", "AdamW")})
    for step in range(3):
        loss = home(torch.tensor([[1, 2, 3]])).square().mean()
        loss.backward()
        params[1].grad = None if step == 1 else params[1].grad  # a parameter without gradient is skipped
        flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).clone()
        coef = 0.5 if step != 2 else None
        header = {"step": step, "coef": coef, "mask": [p.grad is not None for p in params],
                  "lrs": [g["lr"] for g in opt.param_groups], "scales": [g["lr_scale"] for g in opt.param_groups]}
        for p in params:
            if p.grad is not None and coef is not None:
                p.grad.mul_(coef)
        opt.step()
        opt.zero_grad()
        _mirror_step(mirror, header, flat)
        assert digest_of(mirror.model, mirror.optimizer.state_dict()) == state_digest(home, opt), step
    assert mirror.optimizer.param_groups[0]["lr_scale"] == 1.1 and mirror.optimizer.param_groups[0]["lr"] == 3e-3


def test_home_killed_three_times_restored_exactly_from_neighbour_mirror(tmp_path):
    steps = 7
    kills = ("kill:stage=0,step=2,phase=backward;"                # round 1: mid-backward
             "kill:stage=0,step=4,phase=forward,after_ops=1;"     # round 2: mid-forward, home rebuilt once already
             "kill:stage=0,step=5,phase=boundary;kill:stage=1,step=5,phase=boundary")  # round 3: home + holder 1
    rc, log = run_job(tmp_path, "routing=checkfree_plus", f"train.steps={steps}", "recovery.home_replica=true",
                      f'recovery.inject="{kills}"')
    assert rc == 0, log
    assert log.count('"reason": "killed by SIGKILL"') == 4
    audit = {r: rows(tmp_path, r, "audit.jsonl") for r in range(5)}
    ev = [e for e in rows(tmp_path, 2, "events.jsonl") if e["event"] == "recovery"]  # rank 2 is never lost
    assert [e["resume_step"] for e in ev] == [2, 4, 5], ev
    assert not [e for e in rows(tmp_path, 2, "events.jsonl") if e["event"] in ("recovery_fallback",
                                                                                "recovery_failed")]
    # Rounds 1 and 2: the home from holder stage 1; round 3 (home and stage 1 lost together, one regroup):
    # the home from the other holder, stage L = 4 (stage 1 is no source: no chains), stage 1 from its partner.
    assert ev[0]["actions"] == ev[1]["actions"] == ["stage 0 replica 0: home_mirror from stage 1 replica 0"]
    assert sorted(ev[2]["failed_ranks"]) == [0, 1]
    assert ev[2]["actions"] == ["stage 0 replica 0: home_mirror from stage 4 replica 0",
                                "stage 1 replica 0: partner_copy from stage 2 replica 0"]
    assert all(e["loss_after"] is not None and e["first_good_step_s"] > 0 for e in ev)
    # Every step applied exactly once per rank; the home ran in 4 processes, stage 1 in 2, the rest in 1.
    for r in range(5):
        assert [row["step"] for row in audit[r]] == list(range(steps)), r
        assert len({row["pid"] for row in audit[r]}) == {0: 4, 1: 2}.get(r, 1), r
    for e in ev:
        g, resume = e["generation"], e["resume_step"]
        dump = torch.load(tmp_path / "rank0" / f"recovery_g{g}.pt", weights_only=False)
        lost_state = next(row for row in audit[0] if row["step"] == resume - 1)
        # Bitwise: weights AND Adam state equal the lost home's after its last committed step.
        assert dump["digest"] == lost_state["digest"], (g, resume)
        assert dump["lr_scale"] == 1.0 and not dump["optimizer_state_empty"]
        src = dump["received"][0]
        assert src["step"] == resume and all(torch.equal(dump["model"][k], v) for k, v in src["model"].items())
        for r in (2, 3):  # survivors untouched by the recovery
            before = [row for row in audit[r] if row["generation"] < g][-1]
            assert torch.load(tmp_path / f"rank{r}" / f"recovery_g{g}.pt", weights_only=False)["digest"] == \
                before["digest"]
    final = {r: torch.load(tmp_path / f"rank{r}" / "final.pt", weights_only=False) for r in range(5)}
    assert final[0]["opt_steps"] == [steps]  # Adam's step count continues: never a fresh optimizer
    # Both holders (stages 1 and 4) end with a mirror bitwise equal to the home's final state.
    for r in (1, 4):
        mirror = final[r]["home_mirror"]
        assert mirror["tags"] == {0: steps} and mirror["digests"][0] == audit[0][-1]["digest"], r
        assert mirror["stats"]["mirror_steps"] > 0
    assert final[2]["home_mirror"]["tags"] == {} and final[2]["home_mirror"]["stats"]["bytes_sent"] == 0
    home_stats = final[0]["home_mirror"]["stats"]
    assert home_stats["full_syncs"] == 1 and all(s["bytes_sent"] > 0 for s in home_stats["per_step"])


def test_home_killed_without_replication_announces_the_fallback(tmp_path):
    rc, log = run_job(tmp_path, "routing=checkfree_plus", "train.steps=3", "recovery.home_replica=false",
                      'recovery.inject="kill:stage=0,step=1,phase=forward"')
    assert rc == 1 and '"event": "abort"' in log, log  # job-wide stop, no respawn loop
    ev = [e for r in range(1, 5) for e in rows(tmp_path, r, "events.jsonl")]
    # Every survivor announces the fallback; the first to fail stops the job (others may be stopped first).
    fb = [e for e in ev if e["event"] == "recovery_fallback"]
    assert sorted(e["rank"] for e in fb) == [1, 2, 3, 4]
    assert all(e["method"] == "checkpoint" and "DEGRADED" in e["action"] and "home stage" in e["action"] for e in fb)
    failed = [e for e in ev if e["event"] == "recovery_failed"]
    assert failed and all("home stage (embedding + head)" in e["error"] and "recovery.home_replica=false" in e["error"]
                          and "no checkpoint to restore" in e["error"] for e in failed)
