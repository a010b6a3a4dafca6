"""Multi-host on SLURM: the batch scripts on a real slurmctld/slurmd cluster whose nodes are separate
network hosts (namespaces), real processes, real gloo traffic between hosts, real host loss.

The allocation checks of launch/slurm_env.py are tested without a cluster."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from integration.runtime.spawn import free_port
from launch.slurm_env import AllocationError, Allocation, expand_nodelist, plan_layout

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["tensorboard=false", "progress=false"]


# ------------------------------------------------------------------------------ no cluster needed
def test_expand_nodelist_matches_slurm_grammar():
    assert expand_nodelist("h[1-3,7],gpu[08-10],login") == ["h1", "h2", "h3", "h7", "gpu08", "gpu09", "gpu10",
                                                            "login"]
    assert expand_nodelist("node1") == ["node1"]
    for bad in ("h[1-", "h[3-1]", "h[a-b]", ""):
        with pytest.raises(AllocationError, match="SLURM_JOB_NODELIST"):
            expand_nodelist(bad)


def test_layout_must_fit_the_allocation():
    alloc = Allocation("1", ["h1", "h2", "h3"], ["a1", "a2", "a3"])
    lay = plan_layout(alloc, ranks_per_host=2, spare_hosts=1, world_size=4)
    assert (lay.spare_hosts, lay.train_hosts) == (["h1"], ["h2", "h3"])
    with pytest.raises(AllocationError, match=r"parallel: the layout needs 6 ranks .* --nodes=4"):
        plan_layout(alloc, ranks_per_host=2, spare_hosts=1, world_size=6)
    with pytest.raises(AllocationError, match="leave none to train"):
        plan_layout(alloc, ranks_per_host=2, spare_hosts=3, world_size=4)


def _check(env: dict, *args: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    e.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "launch.slurm_env", "check", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=120)


def test_check_refuses_bad_allocations_with_one_message():
    r = _check({}, "--ranks-per-node", "2")
    assert r.returncode == 2 and "SLURM_JOB_NODELIST: not set" in r.stderr and "Traceback" not in r.stderr
    r = _check({"SLURM_JOB_NODELIST": "localhost,127.0.0.1"}, "--ranks-per-node", "2", "--", "parallel=pp6")
    assert r.returncode == 2 and "parallel: the layout needs 6 ranks" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:  # a port in use on this host
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _check({"SLURM_JOB_NODELIST": "localhost,127.0.0.1"}, "--ranks-per-node", "2", "--port", str(port))
    assert r.returncode == 2 and f"MASTER_PORT: port {port} is in use" in r.stderr
    assert r.stdout == ""  # nothing for the batch script to eval: it stops


# ------------------------------------------------------------------------------ on the cluster
def sbatch(cluster, script: str, out: Path, *overrides: str, args: tuple[str, ...] = (),
           env: dict | None = None) -> subprocess.Popen:
    exports = ",".join(["ALL", *(f"{k}={v}" for k, v in (env or {}).items())])
    cmd = ["sbatch", "--wait", "-o", str(out), f"--export={exports}", *args, f"launch/slurm/{script}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def summary(root: Path, rank: int) -> dict:
    return json.loads((root / f"rank{rank}" / "summary.json").read_text())


def test_cluster_is_separate_hosts(slurm_cluster):
    r = slurm_cluster.run("srun", "-N5", "-n5", "bash", "-c",
                          "echo $SLURMD_NODENAME $(ip -o -4 addr show | grep -o '10\\.77\\.0\\.[0-9]*')")
    seen = dict(line.split() for line in r.stdout.splitlines())
    assert seen == {f"h{i}": f"10.77.0.1{i}" for i in range(1, 6)}  # each node in its own network namespace
    assert slurm_cluster.up_s < 120


def test_plain_sbatch_two_hosts_equals_one_host(slurm_cluster, tmp_path):
    """2 hosts x 2 ranks through deepspeed's SLURM launcher == the same job on one host (deepspeed launcher)."""
    job = [*QUIET, "train.steps=4"]
    multi = sbatch(slurm_cluster, "train.sbatch", tmp_path / "multi.out", *job, f"output_root={tmp_path}/multi")
    ref_env = dict(slurm_cluster.env, PATH=f"{ROOT}/.venv/bin:{os.environ['PATH']}")
    ref = subprocess.run([f"{ROOT}/.venv/bin/deepspeed", "--no_local_rank", "--num_gpus", "4",
                          "--master_port", str(free_port()), "integration/train.py",
                          *job, f"output_root={tmp_path}/one"], cwd=ROOT, env=ref_env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert multi.wait(timeout=600) == 0, (tmp_path / "multi.out").read_text()[-3000:]
    log = (tmp_path / "multi.out").read_text()
    placed = {r: (h, i) for r, h, i in re.findall(r"rank (\d)/4 on node (h\d) \(gloo interface (\S+)\)", log)}
    assert placed == {"0": ("h1", "sfe1"), "1": ("h1", "sfe1"), "2": ("h2", "sfe2"), "3": ("h2", "sfe2")}, log[-2000:]
    for r in range(4):
        multi_losses = summary(tmp_path / "multi", r)["loss_history"]
        assert len(multi_losses) == 4
        assert multi_losses == summary(tmp_path / "one", r)["loss_history"]  # bitwise: same floats


def test_plain_sbatch_refuses_an_allocation_that_does_not_fit(slurm_cluster, tmp_path):
    job = sbatch(slurm_cluster, "train.sbatch", tmp_path / "bad.out", *QUIET, f"output_root={tmp_path}/bad",
                 args=("--nodes=3",))
    assert job.wait(timeout=300) == 2
    log = (tmp_path / "bad.out").read_text()
    assert "parallel: the layout needs 4 ranks but the allocation gives 3 training hosts" in log
    assert "Traceback" not in log and not (tmp_path / "bad").exists()  # nothing trained, nothing written


@contextmanager
def _stopped_and_healed(job: subprocess.Popen, cluster):
    """Whatever the test body does, the job ends and every host the test killed is back afterwards."""
    try:
        yield job
    finally:
        if job.poll() is None:
            job.kill()
        cluster.heal()


def _wait_for(path: Path, pattern: str, timeout: float, job: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        if job.poll() is not None:
            raise AssertionError(f"job ended before {pattern!r}: {job.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {path} within {timeout} s")


def _check_every_step_once(res: Path, steps: int, world: int = 4) -> list[dict]:
    """Every process of a rank appends to the same train.log: each step appears at most once per rank
    (applied steps only; an interrupted step is replayed, not applied twice), the same loss on every
    rank, and the loss goes down. A lost rank may miss exactly one line: the step committed as its
    host died (it had voted, the survivors applied it, its process was killed before logging; its
    replacement starts after it). Returns every rank's events."""
    events = [json.loads(x) for r in range(world) for x in (res / f"rank{r}" / "events.jsonl").read_text().splitlines()]
    committed_at_loss: dict[int, set[int]] = {r: set() for r in range(world)}
    for e in events:
        if e["event"] == "recovery" and e.get("failed_ranks"):
            for r in e["failed_ranks"]:
                committed_at_loss[r].add(e["resume_step"] - 1)
    losses = {}
    for r in range(world):
        text = (res / f"rank{r}" / "train.log").read_text()
        logged = [(int(a), float(b)) for a, b in re.findall(r"step (\d+) loss ([\d.]+)", text)]
        order = [st for st, _ in logged]
        assert order == sorted(set(order)), (r, order)  # once each, in order
        assert set(range(steps)) - set(order) <= committed_at_loss[r], (r, order, committed_at_loss[r])
        losses[r] = dict(logged)
    by_step = {st: {losses[r][st] for r in range(world) if st in losses[r]} for st in range(steps)}
    assert all(len(v) == 1 for v in by_step.values()), by_step  # every step logged, one loss on every rank
    first3, last3 = (sum(next(iter(by_step[st])) for st in sts) for sts in ((0, 1, 2), range(steps - 3, steps)))
    assert last3 < first3
    return events


def _recoveries(events: list[dict]) -> list[set]:
    """One entry per generation recovered from a loss: {(failed ranks, reasons, methods)} as the ranks saw it."""
    recs: dict[int, set] = {}
    for e in events:
        if e["event"] == "recovery" and e.get("failed_ranks"):
            recs.setdefault(e["generation"], set()).add((tuple(sorted(e["failed_ranks"])), tuple(e["reasons"]),
                                                          tuple(e["methods"])))
    return [recs[g] for g in sorted(recs)]


@contextmanager
def _partitioned(host: str, cluster):
    """Cut ``host``'s link on the bridge (its sockets stay open: no FIN, no RST reaches anybody, as
    after a power loss or a network partition); on leaving, its processes are killed while it is
    still cut off (a lost host comes back empty) and the link is restored."""
    link = f"sfv{host[1:]}"
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        yield time.time()
    finally:
        subprocess.run(["kill", "-9", *map(str, cluster.host_pids(host))], check=False)
        subprocess.run(["ip", "link", "set", link, "up"], check=True)


def _agent_events(text: str, event: str) -> list[dict]:
    return [json.loads(x[len("agent: "):]) for x in text.splitlines()
            if x.startswith("agent: ") and f'"event": "{event}"' in x]


def test_ft_sbatch_survives_a_lost_host_a_lost_agent_and_a_silent_host(slurm_cluster, tmp_path):
    """5 hosts: h1 (store + spare host), h2, h3 (spare hosts), h4 + h5 train (2 ranks each, strided: a
    stage's replicas on different hosts). Kill every process of h5 mid-run; later kill only the agent
    of h4, the host of rank 0 (the store lives on h1); then cut the link of a spare host that took
    over a node (not h1): a silent host whose connections never close. Each time a spare host takes
    over; the silent one is found by TCP keepalive on its agent's store connection, within
    --host-timeout of the cut; one recovery event per loss names the host and its ranks; every step
    is applied once; the loss goes down."""
    out, res = tmp_path / "ft.out", tmp_path / "ft"
    steps, host_timeout = 20, 8.0
    job = sbatch(slurm_cluster, "train_ft.sbatch", out, *QUIET, "recovery=checkfree", "parallel.stages=2",
                 "parallel.replicas=2", f"train.steps={steps}", f"output_root={res}", args=("--nodes=5",),
                 env={"SPARE_HOSTS": "3", "HOT_SPARES": "0", "AGENT_ARGS": f"--host-timeout {host_timeout:g}"})
    with _stopped_and_healed(job, slurm_cluster):
        log0 = res / "rank0" / "train.log"
        _wait_for(log0, r"step 2 loss", 400, job)
        lost = slurm_cluster.host_pids("h5")
        subprocess.run(["kill", "-9", *map(str, lost)], check=True)  # host h5 is gone: ranks, agent, slurmd
        _wait_for(log0, r"step 8 loss", 400, job)
        agents = [p for p in slurm_cluster.host_pids("h4")
                  if b"launch.agent" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(agents) == 1
        ranks_h4 = [p for p in slurm_cluster.host_pids("h4") if b"integration/train.py" in
                    Path(f"/proc/{p}/cmdline").read_bytes() and b"launch.agent" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.kill(agents[0], 9)  # only the agent of rank 0's host
        _wait_for(log0, r"step 14 loss", 400, job)
        took_over = {e["replaced_by"]: e["node"] for e in _agent_events(out.read_text(), "host_lost")}
        silent = sorted(h for h in took_over if h != "h1")[0]  # h1 holds the store: keep it reachable
        with _partitioned(silent, slurm_cluster) as t_cut:
            deadline = time.time() + 120
            while len(_agent_events(out.read_text(), "host_lost")) < 3:
                assert time.time() < deadline and job.poll() is None, out.read_text()[-4000:]
                time.sleep(0.2)
        assert job.wait(timeout=600) == 0, out.read_text()[-4000:]
    text = out.read_text()
    for p in ranks_h4:  # the agent's ranks died with it (no orphans)
        assert not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split(")")[-1][:3]
    lost_events = _agent_events(text, "host_lost")
    silent_ranks = [0, 2] if took_over[silent] == 0 else [1, 3]
    assert [(e["host"], e["ranks"]) for e in lost_events] == [("h5", [1, 3]), ("h4", [0, 2]), (silent, silent_ranks)]
    assert sorted(e["replaced_by"] for e in lost_events) == ["h1", "h2", "h3"]
    # The silent host: its agent's store connection ended by keepalive (launch.store.KEEPALIVE_S, about
    # 4 s), not by a close, and before the --host-timeout fallback would have fired.
    quiet = lost_events[2]
    gone_after = quiet["time"] - quiet["silent_s"] - t_cut
    print(f"silent host {silent}: its store connection ended {gone_after:.2f} s after the cut")  # pytest -s
    assert quiet["detected_by"] == "connection" and 2.0 <= gone_after <= host_timeout, (gone_after, quiet)
    assert quiet["time"] - t_cut <= host_timeout + 1.0, quiet
    events = _check_every_step_once(res, steps)
    # One recovery per loss, seen by the survivors, naming the host and its ranks.
    recs = _recoveries(events)
    assert len(recs) == 3, recs
    (first,), (second,), (third,) = recs
    assert first[0] == (1, 3) and all("host h5 lost" in x for x in first[1]) and first[2] == ("replica_copy",)
    assert second[0] == (0, 2) and all("host h4 lost" in x for x in second[1]) and second[2] == ("replica_copy",)
    assert third[0] == tuple(silent_ranks) and all(f"host {silent} lost" in x for x in third[1])
    assert third[2] == ("replica_copy",)


@contextmanager
def _frozen(host: str, cluster):
    """SIGSTOP every process of ``host``: its kernel still answers (keepalive probes are acknowledged,
    no socket closes), nothing of it runs. On leaving, its processes are killed (SIGKILL ends a
    stopped process): a lost host comes back empty."""
    pids = cluster.host_pids(host)
    subprocess.run(["kill", "-STOP", *map(str, pids)], check=True)
    try:
        yield time.time()
    finally:
        subprocess.run(["kill", "-9", *map(str, pids + cluster.host_pids(host))], check=False)


@pytest.mark.slow  # ~1.5 min; the default run has the silent host whose link is cut (found by keepalive)
def test_ft_sbatch_frozen_host_is_found_by_the_host_timeout(slurm_cluster, tmp_path):
    """4 hosts: h1, h2 spare, h3 + h4 train (2 ranks each, strided). Every process of h4 is frozen
    after step 3: its agent's store connection stays open (the kernel answers keepalive), so only
    the --host-timeout fallback finds it (its heartbeat stops). A spare host takes over within
    --host-timeout + 2 s of the freeze; one recovery names h4 and its ranks; every step is applied once."""
    out, res = tmp_path / "frozen.out", tmp_path / "frozen"
    steps, host_timeout = 10, 6.0
    job = sbatch(slurm_cluster, "train_ft.sbatch", out, *QUIET, "recovery=checkfree", "parallel.stages=2",
                 "parallel.replicas=2", f"train.steps={steps}", f"output_root={res}", args=("--nodes=4",),
                 env={"SPARE_HOSTS": "2", "HOT_SPARES": "0", "AGENT_ARGS": f"--host-timeout {host_timeout:g}",
                      "STORE_PORT": "29412"})
    with _stopped_and_healed(job, slurm_cluster):
        _wait_for(res / "rank0" / "train.log", r"step 3 loss", 400, job)
        with _frozen("h4", slurm_cluster) as t_freeze:
            deadline = time.time() + 120
            while not _agent_events(out.read_text(), "host_lost"):
                assert time.time() < deadline and job.poll() is None, out.read_text()[-4000:]
                time.sleep(0.2)
        assert job.wait(timeout=600) == 0, out.read_text()[-4000:]
    (lost,) = _agent_events(out.read_text(), "host_lost")
    assert (lost["host"], lost["ranks"], lost["detected_by"]) == ("h4", [1, 3], "timeout"), lost
    assert host_timeout <= lost["silent_s"] and lost["time"] - t_freeze <= host_timeout + 2.0, (lost, t_freeze)
    ((rec,),) = _recoveries(_check_every_step_once(res, steps))
    assert rec[0] == (1, 3) and all("host h4 lost" in x and "silent" in x for x in rec[1]), rec


@pytest.mark.slow  # ~2 min on a 5-host cluster; the default run keeps the single-host-loss scenario
def test_ft_sbatch_two_hosts_lost_at_once_fall_back_to_the_checkpoint(slurm_cluster, tmp_path):
    """megatron backend, 5 hosts: h1 (store + spare host), h2 (spare host), h3..h5 train one rank
    each (parallel.stages=3: rank 0 home on h3, ranks 1 and 2 on h4 and h5). Kill every process of
    h4 and h5 at once: adjacent stages lost, so the ladder falls back to the last checkpoint
    (recovery.checkpoint_every=4: the kill lands after step 4, so the rollback is to step 4 and
    step 4 runs twice) and every rank rolls back; both spare hosts take a node. The job completes,
    every step is applied, the replayed step reproduces the first run's loss."""
    out, res = tmp_path / "two.out", tmp_path / "two"
    steps = 10
    job = sbatch(slurm_cluster, "train_ft.sbatch", out, *QUIET, "backend=megatron", "recovery=checkfree",
                 "parallel.stages=3", "parallel.replicas=1", f"train.steps={steps}", "recovery.fallback=checkpoint",
                 "recovery.checkpoint_every=4", f"output_root={res}", args=("--nodes=5",),
                 env={"SPARE_HOSTS": "2", "HOT_SPARES": "0", "RANKS_PER_NODE": "1", "AGENT_ARGS": "--host-timeout 30",
                      "STORE_PORT": "29411"})  # not the previous job's port (its store may linger)
    with _stopped_and_healed(job, slurm_cluster):
        log0 = res / "rank0" / "train.log"
        _wait_for(log0, r"step 4 loss", 600, job)
        lost = slurm_cluster.host_pids("h4") + slurm_cluster.host_pids("h5")
        subprocess.run(["kill", "-9", *map(str, lost)], check=True)  # two hosts at once
        assert job.wait(timeout=900) == 0, out.read_text()[-4000:]
    text = out.read_text()
    lost_events = [json.loads(x[len("agent: "):]) for x in text.splitlines()
                   if x.startswith("agent: ") and '"event": "host_lost"' in x]
    # Found from the agents' store connections (--host-timeout 30 would be far slower than the job).
    assert sorted((e["host"], tuple(e["ranks"])) for e in lost_events) == [("h4", (1,)), ("h5", (2,))], lost_events
    assert {e["replaced_by"] for e in lost_events} == {"h1", "h2"}
    assert {e["detected_by"] for e in lost_events} == {"connection"}
    ev0 = [json.loads(x) for x in (res / "rank0" / "events.jsonl").read_text().splitlines()]
    recs = [e for e in ev0 if e["event"] == "recovery" and e.get("failed_ranks")]
    assert recs and set().union(*(e["failed_ranks"] for e in recs)) == {1, 2}, recs
    assert recs[-1]["methods"] == ["checkpoint"], recs[-1]
    (rb,) = [e for e in ev0 if e["event"] == "recovery_rollback"]
    resumed = rb["step"]
    assert resumed == 4 and rb["checkpoint_step"] == 4, rb
    for r in range(3):
        st = [(int(a), float(b)) for a, b in re.findall(r"step (\d+) loss ([\d.]+)", (res / f"rank{r}" / "train.log").read_text())]
        assert [s for s, _ in st][-(steps - resumed):] == list(range(resumed, steps)), (r, st)
        assert {s for s, _ in st} == set(range(steps)), (r, st)
    st0 = [(int(a), float(b)) for a, b in re.findall(r"step (\d+) loss ([\d.]+)", log0.read_text())]
    cut = len(st0) - (steps - resumed)  # the replay: the last steps - resumed lines
    first, replay = dict(st0[:cut]), dict(st0[cut:])
    both = sorted(set(first) & set(replay))
    assert both and both[0] == resumed, (first, replay)  # step 4 ran before the loss and again after
    for s in both:  # the same batch on the same restored state
        assert replay[s] == pytest.approx(first[s], rel=1e-6), (s, first, replay)
    assert sum(replay[s] for s in (steps - 2, steps - 1)) < first[0] + first[1]
