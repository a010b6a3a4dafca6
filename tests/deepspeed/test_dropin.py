"""The DeepSpeed drop-in (issue 14): user-style PipelineModules, stock DeepSpeed vs ``initialize_routed``.

One 4-rank launch runs every scenario (tests/deepspeed/ds_dropin_workers.py); each test reads its own.
The reference is a stock ``deepspeed.initialize`` run of the same model, data and config.
"""

import re

import pytest

from integration.runtime.spawn import run_workers
from tests.deepspeed.ds_dropin_workers import STEPS, dropin_checks
from tests.dist_utils import scenario


@pytest.fixture(scope="module")
def results():
    return run_workers(dropin_checks, 4)


@pytest.mark.parametrize("name", ["linear_stack", "conv_net", "tuple_model", "regression", "inplace_first", "ckpt",
                                  "zero1"])
def test_full_plan_bitwise_equal_to_stock(results, name):
    """Float first-stage input, boundaries of changing shapes, (hidden, mask) tuples, float labels with
    training_data=, an in-place first layer, activation checkpointing, ZeRO-1 (rule all): per-step
    losses and every final weight bitwise equal to stock DeepSpeed."""
    per_rank = scenario(results, name)
    for rank, res in enumerate(per_rank):
        assert len(res["stock"]) == STEPS
        assert res["stock"] == res["routed"], f"rank {rank}: losses differ {res['stock']} vs {res['routed']}"
        assert res["n_weights"] > 0
        assert res["weights_equal"], f"rank {rank}: weights differ (max {res['weights_max_diff']})"
        assert res["returned_len"] == 4 and res["returned_optimizer"]
    assert len(set(per_rank[0]["stock"])) == STEPS, "the model did not train (losses did not change)"
    assert {(r["stage"], r["replica"]) for r in per_rank} == (
        {(s, 0) for s in range(4)} if name in ("conv_net", "tuple_model", "inplace_first", "ckpt")
        else {(s, d) for s in range(2) for d in range(2)})


def test_tensor_parallel_in_stage_bitwise_equal_to_stock(results):
    """TP2 x PP2 (PipeModelDataParallelTopology, column- then row-parallel linears per stage, GAS 4):
    every rank's per-step losses and final weight shards bitwise equal to stock DeepSpeed."""
    per_rank = scenario(results, "tp2_pp2")
    for rank, res in enumerate(per_rank):
        assert len(res["stock"]) == STEPS and res["stock"] == res["routed"], (rank, res["stock"], res["routed"])
        assert res["n_weights"] > 0 and res["weights_equal"], f"rank {rank}: weights differ ({res['weights_max_diff']})"
    assert len(set(per_rank[0]["stock"])) == STEPS, "the model did not train (losses did not change)"
    by_coord = {(r["stage"], r["tensor_rank"]): r for r in per_rank}
    assert set(by_coord) == {(s, t) for s in range(2) for t in range(2)} and all(r["replica"] == 0 for r in per_rank)
    for s in range(2):  # the TP ranks of a stage hold different shards of it, and agree on the loss
        w0, w1 = by_coord[(s, 0)]["weights"], by_coord[(s, 1)]["weights"]
        assert w0.keys() == w1.keys() and any(w0[k] != w1[k] for k in w0)
        assert by_coord[(s, 0)]["routed"] == by_coord[(s, 1)]["routed"]


def test_training_data_and_steps_per_print_as_stock(results):
    per_rank = scenario(results, "regression")
    assert all(r["dataloader"] for r in per_rank), "training_data= gives a dataloader, as deepspeed.initialize"
    stock, routed = per_rank[0]["stdout"]
    pattern = re.compile(r"steps: (\d+) loss: ([0-9.]+) ")
    got_stock, got_routed = pattern.findall(stock), pattern.findall(routed)
    assert got_stock == [(str(i + 1), f"{loss:0.4f}") for i, loss in enumerate(per_rank[0]["stock"])]
    assert got_routed == got_stock
    assert all(not r["stdout"][1] for r in per_rank[1:]), "only rank 0 logs, as stock"


def test_bad_settings_refused_before_build(results):
    for res in scenario(results, "refusals"):
        assert "linear PipelineModule but the plan has layout='ring'" in res["ring_plan"]
        assert "routing.skip_rate is not a routing setting" in res["unknown_key"]
        assert "give them once" in res["twice"]
        assert "FaultTolerantEngine: tensor parallelism inside a stage" in res["tensor_parallel"]


def test_zero1_visited_refused(results):
    for res in scenario(results, "zero1_visited"):
        assert res["refused"] and "gradient_rule=all" in res["refused"]


def test_bf16_gradients_match_stock(results):
    per_rank = scenario(results, "bf16")
    if not per_rank[0]["stock_runs"]:
        pytest.fail(f"DeepSpeed's bf16 path does not run here: {per_rank[0]['stock_error']}")
    for res in per_rank:
        assert res["bf16_optimizer"] == "BF16_Optimizer"
        stock_norms, routed_norms = res["norms"]
        for s, r in zip(stock_norms, routed_norms):
            assert abs(r / s - 1.0) < 2e-2, (stock_norms, routed_norms)  # issue 14: 2.77 at GAS 4 before
        for s, r in zip(res["stock"], res["routed"]):
            assert abs(s - r) < 2e-2 * abs(s), (res["stock"], res["routed"])
        assert res["weights_max_diff"] < 5e-2


def test_skip_plan_from_config_trains(results):
    per_rank = scenario(results, "skip")
    res = per_rank[0]
    assert res["hops"] and min(res["hops"]) < 3, f"the skip plan skips nothing: hops {res['hops']}"
    assert res["visits"][0] == res["visits"][3] and min(res["visits"][1:3]) < res["visits"][0]
    losses = res["losses"]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert all(r["losses"] == losses for r in per_rank)


def test_skip_across_unequal_boundaries_refused_before_compute(results):
    per_rank = scenario(results, "unequal")
    messages = {r["refused"] for r in per_rank}
    assert len(messages) == 1 and None not in messages, "every rank refuses, with the same message"
    msg = messages.pop()
    assert re.search(r"stage \d \(rank \d, replica 0\) sends act float32\[[0-9, ]+\] but stage \d", msg), msg
    assert "equal boundaries" in msg
    for r in per_rank:
        assert r["ops_run"] == 0 and r["global_steps"] == 0 and r["unchanged"]


def test_docs_example_runs_stock_and_routed(results):
    per_rank = scenario(results, "example")
    res = per_rank[0]
    assert res["marked"] <= 5 and not res["stock_mentions_skipfree"]
    assert res["routed"] == res["stock"], "the full plan must train exactly as the stock script"
    assert all(r["routed"] == res["routed"] and r["skip"] == res["skip"] for r in per_rank)
    assert sum(res["skip"][-3:]) < sum(res["skip"][:3]), res["skip"]
