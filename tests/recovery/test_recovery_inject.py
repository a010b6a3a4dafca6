"""Failure injection: schedule parsing, matching, random rate, and a real SIGKILL / SIGSTOP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from integration.recovery.inject import FailureInjector, ScheduledFailure, parse_schedule


def test_parse_schedule():
    got = parse_schedule("kill:stage=2,step=3,phase=backward; hang:stage=1,step=5,replica=any,after_ops=2")
    assert got == [ScheduledFailure(2, 3, "backward", "kill", 0, 0),
                   ScheduledFailure(1, 5, "forward", "hang", None, 2)]
    assert parse_schedule("") == [] and parse_schedule(None) == []
    assert parse_schedule("kill:stage=2,step=0,phase=construction") == [ScheduledFailure(2, 0, "construction")]
    with pytest.raises(ValueError, match=r"cannot read.*phase=forward\|.*\|construction\|final\|exit\|regroup\|drift\]"):
        parse_schedule("kill:stage=2,when=3")
    with pytest.raises(ValueError, match="phase 'build' is not one of"):
        parse_schedule("kill:stage=2,step=0,phase=build")
    with pytest.raises(ValueError, match="needs stage"):
        parse_schedule("kill:step=3")
    with pytest.raises(ValueError, match="mode"):
        parse_schedule("explode:stage=1,step=1")


def test_injector_fires_only_at_its_point():
    fired = []
    inj = FailureInjector(2, 0, parse_schedule("kill:stage=2,step=3,phase=backward,after_ops=1"),
                          signal_self=fired.append)
    inj.at(3, "forward")
    inj.at(3, "backward")
    assert fired == []
    inj.at(3, "backward")
    assert fired == [signal.SIGKILL]
    other = FailureInjector(2, 1, parse_schedule("hang:stage=2,step=0"), signal_self=fired.append)
    other.at(0, "forward")
    assert fired == [signal.SIGKILL]  # replica 1 is not the target (replica defaults to 0)
    inactive = FailureInjector(2, 0, parse_schedule("kill:stage=2,step=0"), active=False, signal_self=fired.append)
    inactive.at(0, "forward")
    assert len(fired) == 1


def test_home_stage_can_be_targeted():
    fired = []
    inj = FailureInjector(0, 0, parse_schedule("kill:stage=0,step=1,phase=boundary"), signal_self=fired.append)
    inj.at(0, "boundary")
    inj.at(1, "forward")
    assert fired == []
    inj.at(1, "boundary")
    assert fired == [signal.SIGKILL]


def test_random_rate_is_same_draw_for_every_rank_of_a_stage():
    hits = {}
    for replica in (0, 1):
        fired = []
        inj = FailureInjector(1, replica, rate_per_hour=0.9, iteration_seconds=600, seed=7, signal_self=fired.append)
        for step in range(200):
            inj.at(step, "boundary")
        hits[replica] = len(fired)
    assert hits[0] == hits[1] and 40 < hits[0] < 120  # p_it = 1 - 0.1**(1/6) ~ 0.32


def test_random_failures_reach_the_home_only_when_it_is_replicated():
    def hits(random_home: bool) -> int:
        fired = []
        inj = FailureInjector(0, 0, rate_per_hour=0.9, iteration_seconds=600, seed=7, signal_self=fired.append,
                              random_home=random_home)
        for step in range(200):
            inj.at(step, "boundary")
        return len(fired)

    assert hits(False) == 0 and hits(True) > 40


@pytest.mark.parametrize("mode,check", [("kill", "killed"), ("hang", "stopped")])
def test_real_signal(mode, check):
    code = ("from integration.recovery.inject import FailureInjector, parse_schedule;"
            f"FailureInjector(1, 0, parse_schedule('{mode}:stage=1,step=0')).at(0, 'forward');"
            "print('survived', flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        if check == "killed":
            assert proc.wait(timeout=30) == -signal.SIGKILL
            assert proc.stdout.read() == b""
        else:
            deadline = time.time() + 30
            while time.time() < deadline:
                with open(f"/proc/{proc.pid}/stat") as f:
                    if f.read().split(") ")[1][0] == "T":
                        break
                time.sleep(0.05)
            else:
                pytest.fail("process did not stop")
    finally:
        proc.kill()
        proc.wait()


def test_schedule_rounds_fire_once_each_in_their_generation():
    fired = []
    sched = parse_schedule("kill:stage=2,step=1,phase=boundary;kill:stage=3,step=1,phase=boundary;"
                           "kill:stage=2,step=4,phase=forward")
    two = FailureInjector(2, 0, sched, signal_self=fired.append)
    three = FailureInjector(3, 0, sched, signal_self=fired.append)
    two.at(1, "boundary")
    three.at(1, "boundary")  # both entries of step 1 fire in generation 0: killed at once
    assert fired == [signal.SIGKILL, signal.SIGKILL]
    replay = FailureInjector(2, 0, sched, signal_self=fired.append, generation=2)
    replay.at(1, "boundary")  # the replacement replays step 1 in generation 2: no second death
    assert len(fired) == 2
    replay.at(4, "forward")  # the next round belongs to generation 2 (two failures before it)
    assert len(fired) == 3
    late = FailureInjector(2, 0, sched, signal_self=fired.append, generation=3)
    late.at(4, "forward")
    assert len(fired) == 3


def test_after_ops_counts_within_one_attempt_of_the_step():
    # A survivor replays step 3 in generation 1 after another rank's failure: the pinned entry counts
    # that attempt's ops from 0, not the aborted attempt's too (which would never match again).
    fired = []
    inj = FailureInjector(1, 0, parse_schedule("kill:stage=1,step=3,phase=forward,after_ops=1,gen=1"),
                          signal_self=fired.append)
    inj.at(3, "boundary")
    inj.at(3, "forward")
    inj.at(3, "forward")  # generation 0's attempt: not this entry's
    inj.generation = 1
    inj.at(3, "boundary")
    inj.at(3, "forward")
    assert fired == []
    inj.at(3, "forward")  # the second forward op of generation 1's attempt
    assert fired == [signal.SIGKILL]
