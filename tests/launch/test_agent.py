"""launch.agent with real processes: several agents on one store, respawn of only the dead rank,
hot-spare promotion, hang detection by heartbeat, give-up after max restarts, arguments passed through,
orderly SIGTERM stop, no orphans after SIGKILL of the agent, exit code 2 never respawned, exit code 75
(a peer failed during a rank's construction) restarted and not counted, flags validated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[2]

# A tiny worker: no process group, just the agent's contract (env, store, generation, spare wait).
WORKER = r"""
import json, os, signal, sys, time
from pathlib import Path
from integration.recovery.context import RankContext
from integration.recovery.detect import FailureMonitor, read_generation
t0 = time.time()
ctx = RankContext.from_env()
out = Path(os.environ["OUT"])
rec = {"rank": ctx.rank, "world": ctx.world_size, "generation": ctx.generation, "joining": ctx.joining,
       "pid": os.getpid(), "spare": os.environ.get("SKIPFREE_SPARE"), "argv": sys.argv[1:], "waited": time.time() - t0}
with open(out / f"rank{ctx.rank}.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\n")
mode = os.environ.get("MODE", "ok")
store = ctx.connect()
if mode == "crash_always":
    sys.exit(3)
if mode == "bad_input":
    print("config: train.lr: must be a finite number; set train.lr=3e-3", file=sys.stderr)
    sys.exit(2)
if mode == "sleep":
    time.sleep(600)
mon = FailureMonitor(ctx.store_host, ctx.store_port, ctx.rank, ctx.generation, heartbeat_s=0.2).start()
victim = int(os.environ.get("VICTIM", "1"))
if mode == "construction" and ctx.rank != victim and read_generation(store) == 0:
    # a first start "building its backend" when the victim dies: rank 0 blocked (as in a collective),
    # the others failing on a peer's reset connection; either way the process ends with exit code 75
    with mon.construction("a test backend's construction"):
        if ctx.rank == 0:
            time.sleep(600)
        raise RuntimeError("Connection reset by peer")
if ctx.rank == victim and ctx.generation == 0 and mode in ("kill", "hang", "kill_delayed", "construction"):
    time.sleep(0.6)
    os.kill(os.getpid(), signal.SIGKILL if mode != "hang" else signal.SIGSTOP)
if mode in ("kill", "hang", "kill_delayed", "construction") and ctx.rank != victim:
    # survivors wait until the failure was recorded (kill_delayed: and the delayed replacement joined)
    while read_generation(store) < (2 if mode == "kill_delayed" else 1):
        time.sleep(0.05)
if ctx.joining and os.environ.get("RECOVERED_AFTER"):  # a replacement's first good step, some time later
    time.sleep(float(os.environ["RECOVERED_AFTER"]))
    store.set(f"recovered/g{ctx.generation}", repr(time.time()))
    time.sleep(0.6)  # the agent sees it while this rank still runs
mon.stop()
"""


def agent(tmp: Path, *args: str, env: dict | None = None, node: int = 0, port: int | None = None,
          overrides: tuple[str, ...] = ()) -> subprocess.Popen:
    e = dict(os.environ, OUT=str(tmp), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    port_args = ["--store-port", str(port)] if port else []
    cmd = [sys.executable, "-m", "launch.agent", "--node-rank", str(node), *port_args, *args, "--", "-c", WORKER,
           *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stderr=subprocess.PIPE, text=True)


def rows(tmp: Path, rank: int) -> list[dict]:
    p = tmp / f"rank{rank}.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_two_agents_one_store_and_args_pass_through(tmp_path):
    port = free_port()
    overrides = ("train.steps=3", "+recovery.inject='kill:stage=1,step=2'", "model=small")
    a0 = agent(tmp_path, "--nproc", "2", "--nnodes", "2", port=port, overrides=overrides)
    time.sleep(0.5)
    a1 = agent(tmp_path, "--nproc", "2", "--nnodes", "2", node=1, port=port, overrides=overrides)
    assert a0.wait(timeout=120) == 0 and a1.wait(timeout=120) == 0, a0.stderr.read() + a1.stderr.read()
    for r in range(4):
        (rec,) = rows(tmp_path, r)
        assert rec["world"] == 4 and rec["generation"] == 0 and not rec["joining"]
        assert rec["argv"] == list(overrides)


def test_respawns_only_the_dead_rank(tmp_path):
    a = agent(tmp_path, "--nproc", "3", env={"MODE": "kill"})
    assert a.wait(timeout=120) == 0
    log = a.stderr.read()
    assert '"event": "failure"' in log and "killed by SIGKILL" in log
    assert [len(rows(tmp_path, r)) for r in range(3)] == [1, 2, 1]
    first, second = rows(tmp_path, 1)
    assert (first["generation"], first["joining"]) == (0, False)
    assert (second["generation"], second["joining"]) == (1, True) and second["pid"] != first["pid"]


def test_exit_75_in_construction_restarts_the_rank_as_started_without_counting_it(tmp_path):
    # --max-restarts 1: the victim's failure is the one failure allowed; the two restarts are not failures
    a = agent(tmp_path, "--nproc", "3", "--max-restarts", "1", "--log-dir", str(tmp_path / "logs"),
              env={"MODE": "construction"})
    assert a.wait(timeout=120) == 0
    recs = [json.loads(x[len("agent: "):]) for x in a.stderr.read().splitlines() if x.startswith("agent: {")]
    assert [(r["rank"], r["generation"]) for r in recs if r["event"] == "failure"] == [(1, 1)]
    assert sorted(r["rank"] for r in recs if r["event"] == "restart") == [0, 2]
    for r in (0, 2):  # started again exactly as first started: an original rank of generation 0
        first, again = rows(tmp_path, r)
        assert [(x["generation"], x["joining"]) for x in (first, again)] == [(0, False)] * 2
        assert again["pid"] != first["pid"]
        log = (tmp_path / "logs" / f"rank{r}-g0.log").read_text()
        assert "during a test backend's construction" in log and "exiting with code 75" in log
    assert [(x["generation"], x["joining"]) for x in rows(tmp_path, 1)] == [(0, False), (1, True)]


def test_respawn_delay_holds_the_replacement_back_then_joins_it(tmp_path):
    a = agent(tmp_path, "--nproc", "3", "--respawn-delay", "1.5", env={"MODE": "kill_delayed"})
    assert a.wait(timeout=120) == 0
    recs = [json.loads(x[len("agent: "):]) for x in a.stderr.read().splitlines() if x.startswith("agent: {")]
    (fail,) = [r for r in recs if r["event"] == "failure"]
    (back,) = [r for r in recs if r["event"] == "replaced"]
    assert fail["rank"] == 1 and fail["respawn"] == "delayed 1.5 s" and fail["absent"] == [1]
    assert back["rank"] == 1 and back["generation"] == 2 and back["after_delay"]
    assert back["time"] - fail["time"] >= 1.5  # no process for rank 1 meanwhile
    assert [len(rows(tmp_path, r)) for r in range(3)] == [1, 2, 1]
    replacement = rows(tmp_path, 1)[1]  # booted as a spare at the end of the delay, joined once ready
    assert replacement["spare"] and replacement["joining"] and replacement["generation"] == 2


def test_hot_spare_is_promoted(tmp_path):
    a = agent(tmp_path, "--nproc", "2", "--hot-spares", "1", env={"MODE": "kill", "VICTIM": "0",
                                                                 "RECOVERED_AFTER": "1.0"})
    assert a.wait(timeout=120) == 0
    log = a.stderr.read()
    assert "promoted hot spare 0" in log
    replacement = rows(tmp_path, 0)[1]
    assert replacement["spare"] and replacement["joining"] and replacement["generation"] == 1
    # The replacement is the pre-started spare process itself (launched as a spare, no new spawn).
    assert f"promoted hot spare 0 (pid {replacement['pid']})" in log
    assert "spawned pid" not in log
    # The used spare is replaced only once the recovery reached its first good step (the store's
    # recovered/g1), not while the joining rank still needs the CPU.
    ev = {e["event"]: e for e in (json.loads(x[len("agent: "):]) for x in log.splitlines() if x.startswith("agent: "))}
    refill = ev["spares_refilled"]
    assert refill["started"] == 1 and refill["generation"] == 1
    assert refill["after_s"] >= 1.0 and refill["time"] - ev["failure"]["time"] >= 1.0, (refill, ev["failure"])


def test_hang_detected_by_heartbeat(tmp_path):
    t0 = time.time()
    a = agent(tmp_path, "--nproc", "2", "--heartbeat-timeout", "1.5", env={"MODE": "hang", "VICTIM": "1"})
    assert a.wait(timeout=120) == 0
    log = a.stderr.read()
    assert '"event": "hang"' in log and "hang (no heartbeat" in log
    hang = next(json.loads(x[len("agent: "):]) for x in log.splitlines() if '"event": "hang"' in x)
    assert 1.5 <= hang["silent_s"] < 3.0
    assert len(rows(tmp_path, 1)) == 2 and time.time() - t0 < 100


def test_gives_up_after_max_restarts(tmp_path):
    a = agent(tmp_path, "--nproc", "1", "--max-restarts", "2", env={"MODE": "crash_always"})
    assert a.wait(timeout=120) == 1
    assert '"event": "give_up"' in a.stderr.read()
    assert len(rows(tmp_path, 0)) == 3


def _wait_rows(tmp: Path, ranks: range, timeout: float = 120) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = [rows(tmp, r) for r in ranks]
        if all(got):
            return [g[0] for g in got]
        time.sleep(0.1)
    raise AssertionError(f"workers did not start within {timeout} s")


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def test_sigterm_is_an_orderly_stop(tmp_path):
    a = agent(tmp_path, "--nproc", "2", "--log-dir", str(tmp_path / "logs"), env={"MODE": "sleep"})
    workers = _wait_rows(tmp_path, range(2))
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=30) == 128 + signal.SIGTERM
    log = a.stderr.read()
    stop = next(json.loads(x[len("agent: "):]) for x in log.splitlines() if '"event": "stopped"' in x)
    assert stop["signal"] == "SIGTERM" and stop["ranks"] == [0, 1]
    summary = json.loads((tmp_path / "logs" / "agent0.json").read_text())
    assert summary["outcome"] == "stopped" and "SIGTERM" in summary["reason"]
    assert all(_gone(w["pid"]) for w in workers), "a worker outlived the stopped agent"


def test_agent_sigkill_leaves_no_orphan_ranks(tmp_path):
    a = agent(tmp_path, "--nproc", "2", env={"MODE": "sleep"})
    workers = _wait_rows(tmp_path, range(2))
    a.kill()
    a.wait(timeout=30)
    assert all(_gone(w["pid"]) for w in workers), "a rank outlived its SIGKILLed agent"


def test_bad_input_exit_code_2_is_never_respawned(tmp_path):
    a = agent(tmp_path, "--nproc", "2", "--max-restarts", "5", env={"MODE": "bad_input"})
    assert a.wait(timeout=120) == 2
    log = a.stderr.read()
    assert '"event": "bad_input"' in log and '"event": "failure"' not in log
    assert [len(rows(tmp_path, r)) for r in range(2)] == [1, 1]  # nobody started twice


def test_agent_flags_are_validated():
    for args, field in ((["--nproc", "0"], "--nproc"), (["--nproc", "1", "--nnodes", "2", "--node-rank", "2",
                                                         "--store-port", "1"], "--node-rank"),
                        (["--nproc", "1", "--hot-spares", "-1"], "--hot-spares"),
                        (["--nproc", "1", "--spare-host", "--store-port", "5"], "--spare-host"),
                        (["--nproc", "1", "--heartbeat-timeout", "nan"], "--heartbeat-timeout"),
                        (["--nproc", "1", "--respawn-delay", "-1"], "--respawn-delay")):
        r = subprocess.run([sys.executable, "-m", "launch.agent", *args, "--", "-c", "pass"], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert field in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    h = subprocess.run([sys.executable, "-m", "launch.agent", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert h.returncode == 0 and "--max-restarts" in h.stdout and "--restart-window" in h.stdout


def test_spare_host_takes_over_at_once_when_an_agent_dies(tmp_path):
    """External store + one training agent + one spare-host agent, all real processes on loopback.
    SIGKILL the training agent: the store sees its liveness connection end without a goodbye, and
    the spare takes the node long before --host-timeout (60 s); its rank died with its agent."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    store = subprocess.Popen([sys.executable, "-m", "launch.store", "--host", "127.0.0.1", "--port", str(port),
                              "--nnodes", "1", "--linger", "0.2"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    common = ("--nproc", "1", "--external-store", "--store-host", "127.0.0.1", "--host-timeout", "60")
    train = spare = None
    try:
        train = agent(tmp_path, *common, "--host-name", "hA", port=port, env={"MODE": "sleep"})
        (first,) = _wait_rows(tmp_path, range(1))
        spare = agent(tmp_path, *common, "--spare-host", "--host-name", "hB", port=port, env={"MODE": "sleep"})
        seen = []
        while not any('"event": "waiting"' in x for x in seen):  # the spare is up and polling
            line = spare.stderr.readline()
            assert line, "the spare agent ended: " + "".join(seen)
            seen.append(line)
        time.sleep(0.5)
        killed = time.time()
        train.kill()
        train.wait(timeout=30)
        deadline = time.time() + 60
        while len(rows(tmp_path, 0)) < 2 and time.time() < deadline:  # the joining rank 0 on hB
            time.sleep(0.1)
        assert len(rows(tmp_path, 0)) == 2, "the spare host did not take over"
        assert _gone(first["pid"]), "the rank outlived its SIGKILLed agent"
        spare.send_signal(signal.SIGTERM)
        assert spare.wait(timeout=60) == 128 + signal.SIGTERM
        log = "".join(seen) + spare.stderr.read()
        assert store.wait(timeout=60) == 1  # the spare's stop stopped the job
    finally:
        for p in (train, spare, store):
            if p is not None and p.poll() is None:
                p.kill()
    (ev,) = [json.loads(x[len("agent: "):]) for x in log.splitlines() if '"event": "host_lost"' in x]
    assert ev["host"] == "hA" and ev["ranks"] == [0] and ev["replaced_by"] == "hB"
    assert ev["detected_by"] == "connection" and ev["time"] - killed < 3.0, ev
    joined = rows(tmp_path, 0)[-1]
    assert joined["joining"] and joined["generation"] == 1
    assert '"event": "agent_gone"' in store.stderr.read()
