"""Host loss on the SLURM test cluster: failure to first good step with a waiting spare host vs a cold one.

    sudo launch/testing/cluster.sh up      # SKIPFREE_CLUSTER_HOSTS=3 (default): h1 spare + store, h2, h3 train
    .venv/bin/python benchmarks/host_loss_bench.py [--steps 16] [--backend deepspeed]

Each job (launch/slurm/train_ft.sbatch, 2 training hosts x 2 ranks, stages=2 replicas=2, strided)
first loses one rank (rank 3 SIGKILLs itself at step 3 by the failure injector: the agent promotes a
hot spare on the same host, the single-rank recovery of the same run), then a whole host (every process of h3). "waiting": the
spare host pre-started its workers; "cold": it starts them when it takes over. Prints a table of the
recovery events' timings (seconds; first good step is counted from the failure: the rank's death, or
the moment the store saw the lost host's agent connection end; "found by": the agent's waitpid, the
store connection, or the --host-timeout fallback), then the joining ranks' own phases (from the
failure record to holding the rank, settle, group, backend, exchange + transfer, engine) and the
load average at each host kill (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait(path: Path, pattern: str, timeout: float, job: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        if job.poll() is not None:
            raise SystemExit(f"job ended ({job.returncode}) before {pattern!r}")
        time.sleep(0.2)
    raise SystemExit(f"{pattern!r} not seen in {path} within {timeout} s")


def _netns_pids(host: str) -> list[int]:
    return [int(p) for p in subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split()]


def run_job(out: Path, mode: str, steps: int, backend: str, env: dict) -> list[dict]:
    res = out / mode
    cmd = ["sbatch", "--wait", "-o", str(out / f"{mode}.out"),
           f"--export=ALL,SPARE_HOSTS=1,HOT_SPARES=1,SPARE_HOST_WORKERS={2 if mode == 'waiting' else 0},"
           f"STORE_PORT={29420 + (mode == 'cold')},"  # a port per job: the last job's may still be in TIME_WAIT
           f"AGENT_ARGS=--host-timeout 5", "--nodes=3", "launch/slurm/train_ft.sbatch", "tensorboard=false",
           "progress=false", "recovery=checkfree", f"backend={backend}", "parallel.stages=2", "parallel.replicas=2",
           f"train.steps={steps}", f"output_root={res}",
           "recovery.inject=kill:stage=1,replica=1,step=3,phase=backward"]  # rank 3 (on h3) kills itself
    job = subprocess.Popen(cmd, cwd=ROOT, env=env)
    log0 = res / "rank0" / "train.log"
    _wait(log0, r"step 7 loss", 600, job)
    subprocess.run(["kill", "-9", *map(str, _netns_pids("h3"))], check=False)  # the whole host h3
    load = Path("/proc/loadavg").read_text().split()[0]  # the machine is shared: its load beside each number
    if job.wait(timeout=900) != 0:
        raise SystemExit(f"{mode} job failed: see {out / (mode + '.out')}")
    subprocess.run([str(ROOT / "launch/testing/cluster.sh"), "heal"], env=env, check=True, capture_output=True)
    events = [json.loads(x) for x in (res / "rank0" / "events.jsonl").read_text().splitlines()]
    recs = [e for e in events if e["event"] == "recovery" and e.get("failed_ranks")]
    for e in recs:  # the joiners' own view of the same recovery: where their time went
        e["load"] = load
        e["joiners"] = [j for r in e["failed_ranks"] for j in _events(res, r)
                        if j["event"] == "recovery" and j["generation"] == e["generation"] and j.get("joiner_phases")]
    return recs


def _events(res: Path, rank: int) -> list[dict]:
    path = res / f"rank{rank}" / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--backend", default="deepspeed", choices=("deepspeed", "megatron"))
    p.add_argument("--out", default="/tmp/skipfree-host-loss-bench")
    p.add_argument("--modes", default="waiting,cold", help="spare-host modes to run, comma-separated")
    a = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               SLURM_CONF=os.environ.get("SLURM_CONF", "/tmp/skipfree-cluster/slurm.conf"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, joiners = [], []
    for mode in a.modes.split(","):
        for e in run_job(out, mode, a.steps, a.backend, env):
            kind = "host" if any("host" in r for r in e["reasons"]) else "rank"
            found = ("connection" if any("connection dropped" in r for r in e["reasons"]) else "timeout") \
                if kind == "host" else "waitpid"
            rows.append((mode, kind, found, e["failed_ranks"], e.get("detect_s") or 0.0, e["regroup_s"],
                         e["transfer_s"], e["engine_rebuild_s"], e["first_good_step_s"], e["load"]))
            joiners.extend((mode, kind, j) for j in e["joiners"])
    print(f"\nhost loss vs single-rank loss, backend={a.backend}, 2 hosts x 2 ranks + 1 spare host (seconds)")
    print(f"{'spare host':<10} {'failure':<8} {'found by':<10} {'ranks':<8} {'detect':>7} {'regroup':>8} "
          f"{'transfer':>9} {'engine':>7} {'first good':>11} {'load':>5}")
    for mode, kind, found, ranks, d, r, t, en, f, load in rows:
        print(f"{mode:<10} {kind:<8} {found:<10} {str(ranks):<8} {d:7.2f} {r:8.2f} {t:9.2f} {en:7.2f} {f:11.2f} "
              f"{load:>5}")
    print("\nthe joining ranks' side (seconds from the failure record to holding the rank, then each phase)")
    print(f"{'spare host':<10} {'failure':<8} {'rank':>4} {'assigned':>9} {'settle':>7} {'group':>6} {'backend':>8} "
          f"{'exchange+transfer':>18} {'engine':>7} {'first good':>11}")
    for mode, kind, j in joiners:
        ph = j["joiner_phases"]
        print(f"{mode:<10} {kind:<8} {j['rank']:>4} {ph.get('assigned_s', 0.0):9.2f} {ph['settle_s']:7.2f} "
              f"{ph['group_s']:6.2f} {ph['backend_s']:8.2f} {j['transfer_s']:18.2f} {j['engine_rebuild_s']:7.2f} "
              f"{j['first_good_step_s'] or 0.0:11.2f}")
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    single = {m: f for m, k, *_, f, _ in rows if k == "rank"}
    for mode, kind, *_, f, _ in rows:
        if kind == "host" and mode in single:
            print(f"{mode}: host loss - single-rank loss = {f - single[mode]:+.2f} s (goal: within 1 s)")


if __name__ == "__main__":
    sys.exit(main())
