"""Recovery cost on this machine: run a job under launch.agent, SIGKILL a stage, print the time breakdown.

    python benchmarks/recovery_bench.py [--job preset|main] [--backend deepspeed|megatron] [--spare hot,cold]
        [--phase forward] [--steps 6]
    python benchmarks/recovery_bench.py --home-sync-cost [--steps 20] [--model-sizes 128x32,8192x128]

``--job preset``: the main job with the recovery tests' preset (``preset=recovery_test``: ring model d=32, 5 ranks);
``--job main``: the main job (``integration/train.py recovery=checkfree``, default tiny model, 4 ranks).
``--spare hot``: a pre-started hot spare is promoted; ``cold``: the agent spawns a fresh process.
One table row per (job, spare) from rank 0's recovery event (rank 0 is a survivor): method,
detection, regroup, transfer (exchange + state, includes waiting for the joiner), engine rebuild,
failure -> first good step, loss before/after.

``--home-sync-cost``: the price of CheckFree+ home replication (``recovery.home_replica``) without
failures: the main job with ``preset=recovery_test`` (5 ranks, CheckFree+ routing) with replication off
and on, per model size (``VOCABxD_MODEL``; vocabulary 257 is the bytes tokenizer, any other a BPE of
that size): median seconds per step on rank 0 (steps after the first two), the home's bytes sent per
step (gradients to both holders), its sync seconds per step and the holders' seconds per step
(receive + mirror optimizer step), and the one-off full sync per generation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLS = ("methods", "detect_s", "regroup_s", "transfer_s", "engine_rebuild_s", "first_good_step_s",
        "loss_before", "loss_after")


def run(job: str, steps: int, phase: str, kill_stage: int, spare: bool, routing: str,
        home_replica: bool = False, backend: str = "deepspeed") -> list[dict]:
    """One run; returns the recovery events of rank 0 (of rank 2 when the home, rank 0, is the one killed)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
        env.pop("RANK", None)
        inject = f"kill:stage={kill_stage},step={steps // 2},phase={phase}"
        witness = f"rank{2 if kill_stage == 0 else 0}"
        if job == "preset":
            nproc, events = 5, Path(tmp) / witness / "events.jsonl"
            target = ["integration/train.py", "preset=recovery_test", f"output_root={tmp}", f"train.steps={steps}",
                      f"routing={routing}",
                      f'recovery.inject="{inject}"', f"recovery.home_replica={str(home_replica).lower()}",
                      f"backend={backend}"]
        else:
            nproc, events = 4, Path(tmp) / "out" / witness / "events.jsonl"
            target = ["integration/train.py", "recovery=checkfree", f"recovery.inject={inject}", f"output_root={tmp}/out",
                      f"train.steps={steps}", "progress=false", "tensorboard=false", f"backend={backend}"]
        cmd = [sys.executable, "-m", "launch.agent", "--nproc", str(nproc), "--hot-spares", "1" if spare else "0",
               "--heartbeat-timeout", "10", "--log-dir", f"{tmp}/logs", "--", *target]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"job failed ({p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-20:]))
        rows = [json.loads(x) for x in events.read_text().splitlines()]
        return [r for r in rows if r["event"] == "recovery"]


def home_sync_cost(steps: int, vocab: int, d_model: int, on: bool) -> dict:
    """One failure-free run of the recovery preset; per-step timings from the audit, replication traffic
    from final.pt."""
    import statistics

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
        env.pop("RANK", None)
        cmd = [sys.executable, "-m", "launch.agent", "--nproc", "5", "--heartbeat-timeout", "20", "--log-dir",
               f"{tmp}/logs", "--", "integration/train.py", "preset=recovery_test", f"output_root={tmp}",
               f"train.steps={steps}", "routing=checkfree_plus", f"recovery.home_replica={str(on).lower()}",
               *(["data.tokenizer=bytes"] if vocab == 257 else ["data.tokenizer=bpe", f"data.vocab_size={vocab}"]),
               f"model.d_model={d_model}"]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"job failed ({p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-20:]))
        times = [json.loads(x)["time"] for x in (Path(tmp) / "rank0" / "audit.jsonl").read_text().splitlines()]
        out = {"vocab": vocab, "d_model": d_model, "home_replica": on,
               "s_per_step": statistics.median(b - a for a, b in zip(times[2:], times[3:]))}
        final = {r: torch.load(Path(tmp) / f"rank{r}" / "final.pt", weights_only=False) for r in (0, 1, 4)}
        home = final[0]["model"]
        out["home_params"] = sum(v.numel() for v in home.values())
        if on:
            per = final[0]["home_mirror"]["stats"]["per_step"][2:]
            out["bytes_per_step"] = statistics.median(x["bytes_sent"] for x in per)
            out["home_sync_s_per_step"] = statistics.median(x["sync_s"] for x in per)
            out["holder_s_per_step"] = max(statistics.median(x["sync_s"] for x in final[r]["home_mirror"]["stats"]
                                                             ["per_step"][2:]) for r in (1, 4))
            stats = final[0]["home_mirror"]["stats"]
            out["full_sync_bytes"] = stats["bytes_sent"] - sum(x["bytes_sent"] for x in stats["per_step"])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="preset", choices=["preset", "main"])
    ap.add_argument("--spare", default="hot,cold", help="comma list of hot / cold")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--phase", default="forward", choices=["forward", "backward", "boundary"])
    ap.add_argument("--kill-stage", type=int, default=2)
    ap.add_argument("--routing", default="full", help="preset only")
    ap.add_argument("--backend", default="deepspeed", choices=["deepspeed", "megatron"])
    ap.add_argument("--home-replica", action="store_true", help="preset only: recovery.home_replica=true")
    ap.add_argument("--home-sync-cost", action="store_true", help="measure CheckFree+ home replication, no failure")
    ap.add_argument("--model-sizes", default="257x32,8192x128", help="--home-sync-cost: VOCABxD_MODEL list")
    a = ap.parse_args()
    if a.home_sync_cost:
        steps = max(a.steps, 8)
        print("| vocab x d_model | home params | home_replica | s/step (rank 0) | home bytes/step | home sync s/step "
              "| holder s/step | full sync bytes/generation |")
        print("|" + "---|" * 8)
        for size in a.model_sizes.split(","):
            vocab, d = (int(x) for x in size.split("x"))
            for on in (False, True):
                r = home_sync_cost(steps, vocab, d, on)
                cells = [f"{vocab} x {d}", str(r["home_params"]), str(on), f"{r['s_per_step']:.4f}",
                         str(r.get("bytes_per_step", 0)), f"{r.get('home_sync_s_per_step', 0.0):.4f}",
                         f"{r.get('holder_s_per_step', 0.0):.4f}", str(r.get("full_sync_bytes", 0))]
                print("| " + " | ".join(cells) + " |", flush=True)
        return
    print("| job | backend | spare | " + " | ".join(COLS) + " |")
    print("|" + "---|" * (len(COLS) + 3))
    for mode in a.spare.split(","):
        for e in run(a.job, a.steps, a.phase, a.kill_stage, mode == "hot", a.routing, a.home_replica, a.backend):
            cells = [f"{e[c]:.3f}" if isinstance(e[c], float) else str(e[c]) for c in COLS]
            print(f"| {a.job} | {a.backend} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
