"""The routed drop-in in a megatron-core style loop: stock vs routed, masks, handshake, checkpoints.

The loop below is written the way megatron-core's own example loop is (its own
``forward_step_func`` reading every field of the batch, a DataLoader iterator on every rank, a
GPTModel per stage in megatron DDP), with megatron's GPT dataset masks (``eod_mask_loss=True``,
``reset_attention_mask=True``). The reference is stock megatron (``get_forward_backward_func()``)
on the same processes: with the full plan, losses and every weight must be bitwise equal.

One 4-rank launch runs every 4-rank scenario in sequence (start-up dominates on small machines)
and one 2-rank launch runs PP2 and the docs example; test functions assert on the results.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

from tests.dist_utils import run_workers

VOCAB, SEQ, HIDDEN, HEADS, MBS, M, EOD = 64, 16, 32, 4, 2, 4, 0
STEPS = 2


# ----------------------------------------------------------------------------- the user's loop (in workers)
class _Documents(torch.utils.data.Dataset):
    """Fixed random token windows with frequent end-of-document tokens, in megatron's GPT sample
    format; masks and position ids from megatron's own GPT dataset helper."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, idx: int) -> dict:
        from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

        g = torch.Generator().manual_seed(idx)
        text = torch.randint(1, VOCAB, (SEQ + 1,), generator=g)
        text[torch.rand(SEQ + 1, generator=g) < 0.15] = EOD
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        attention_mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
            tokens, EOD, reset_position_ids=False, reset_attention_mask=True, eod_mask_loss=True,
            create_attention_mask=True)
        return {"tokens": tokens, "labels": labels, "attention_mask": attention_mask, "loss_mask": loss_mask,
                "position_ids": position_ids}


def _train_iterator():
    from megatron.core import parallel_state

    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    shard = torch.utils.data.Subset(_Documents(), range(r, len(_Documents()), dp))
    return iter(torch.utils.data.DataLoader(shard, batch_size=MBS, shuffle=False))


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step_func(data_iterator, model):
    data = next(data_iterator)  # every field, as megatron's example reads it: no None handling
    output = model(data["tokens"], data["position_ids"], data["attention_mask"], labels=data["labels"])
    return output, partial(_loss_func, data["loss_mask"])


def _model_provider(pp: int, hidden: int = HIDDEN, seed: int = 11):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from integration.backends.megatron.stages import gpt_config

    config = gpt_config(num_layers=pp, hidden_size=hidden, num_attention_heads=HEADS,
                        tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(), pipeline_parallel=pp)
    torch.manual_seed(seed + parallel_state.get_pipeline_model_parallel_rank())
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(), share_embeddings_and_output_weights=True,
                    position_embedding_type="rope")


def _setup(tp: int, pp: int, *, torch_adam: bool = False, hidden: int = HIDDEN):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from integration.backends.megatron.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(123)
    gpt = _model_provider(pp, hidden)
    config = gpt.config
    model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), module=gpt)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if torch_adam:
        optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    else:
        optim = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.1, clip_grad=0.05,
                                                       bf16=False, fp16=False), [model])
    return model, optim


def _run(tp: int, pp: int, *, routed: bool, torch_adam: bool = False, plan_kind: str = "full",
         skip_ratio: float | None = None, steps: int = STEPS) -> dict:
    """The user's training loop; ``routed`` swaps in the drop-in (the only difference)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from integration.backends.megatron.schedule import RoutedForwardBackward

    model, optim = _setup(tp, pp, torch_adam=torch_adam)
    initial = {k: v.detach().clone() for k, v in model.module.state_dict().items() if isinstance(v, torch.Tensor)}
    forward_backward_func = get_forward_backward_func()
    if routed:
        forward_backward_func = RoutedForwardBackward.for_model(model, plan_kind, num_microbatches=M,
                                                                skip_ratio=skip_ratio)
        forward_backward_func.guard_optimizer(optim)
    train_iterator = _train_iterator()
    losses, masked = [], []
    for _ in range(steps):
        model.zero_grad_buffer()
        optim.zero_grad()
        out = forward_backward_func(forward_step_func=_forward_step_func, data_iterator=train_iterator, model=[model],
                                    num_microbatches=M, seq_length=SEQ, micro_batch_size=MBS,
                                    decoder_seq_length=SEQ, forward_only=False)
        if torch_adam and not routed:  # what a stock loop needs for torch.optim over megatron DDP
            for p in model.parameters():
                p.grad = p.main_grad
        optim.step()
        losses.append([float(o["lm loss"]) for o in out])
    model.eval()
    with torch.no_grad():
        evaluation = forward_backward_func(forward_step_func=_forward_step_func, data_iterator=_train_iterator(),
                                           model=[model], num_microbatches=M, seq_length=SEQ, micro_batch_size=MBS,
                                           forward_only=True)
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items() if isinstance(v, torch.Tensor)}
    res = {"coords": (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
                      parallel_state.get_tensor_model_parallel_rank()),
           "losses": losses, "eval": [float(o["lm loss"]) for o in evaluation], "state": state, "initial": initial}
    if routed:
        res["route_lengths"] = sorted({len(r.hops) + 1 for r in forward_backward_func.plan.routes})
    parallel_state.destroy_model_parallel()
    return res


def _refusal(tp: int, pp: int, make: str) -> dict:
    """A mismatch the handshake must refuse on every rank before any compute."""
    from megatron.core import parallel_state

    from integration.backends.megatron.layout import MegatronGrid
    from integration.backends.megatron.schedule import RoutedForwardBackward
    from integration.plan import build_plan

    calls = []
    if make == "ring_plan_on_gpt":  # build_plan's default layout is ring; the model is megatron's GPTModel
        model, _ = _setup(tp, pp)
        grid = MegatronGrid.from_parallel_state()
        fb = RoutedForwardBackward(build_plan("full", grid.stage_nodes, M), num_microbatches=M, grid=grid)
    else:  # stage 2 built with another hidden size (pipeline rank = global rank at TP=1, DP=1)
        model, _ = _setup(tp, pp, hidden=48 if torch.distributed.get_rank() == 2 else HIDDEN)
        fb = RoutedForwardBackward.for_model(model, "full", num_microbatches=M)
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items() if isinstance(v, torch.Tensor)}

    def counting_forward_step(data_iterator, model):
        calls.append(1)
        return _forward_step_func(data_iterator, model)

    error = None
    try:
        fb(forward_step_func=counting_forward_step, data_iterator=_train_iterator(), model=[model],
           num_microbatches=M, seq_length=SEQ, micro_batch_size=MBS)
    except Exception as exc:  # noqa: BLE001 - the test asserts the type and message
        error = f"{type(exc).__name__}: {exc}"
    after = model.module.state_dict()
    unchanged = all(torch.equal(v, after[k]) for k, v in before.items())
    parallel_state.destroy_model_parallel()
    return {"error": error, "forward_calls": len(calls), "unchanged": unchanged}


def _checkpoint_round_trip(tmp: str) -> dict:
    """dist_checkpointing save -> load into a differently initialised model, TP2 x PP2 (sharded)."""
    from megatron.core import dist_checkpointing, parallel_state

    model, _ = _setup(2, 2)
    saved = {k: v.detach().clone() for k, v in model.module.state_dict().items() if isinstance(v, torch.Tensor)}
    dist_checkpointing.save(sharded_state_dict=model.module.sharded_state_dict(prefix=""), checkpoint_dir=tmp)
    fresh = _model_provider(2, seed=999)
    differs_before = any(not torch.equal(v, fresh.state_dict()[k]) for k, v in saved.items())
    fresh.load_state_dict(dist_checkpointing.load(sharded_state_dict=fresh.sharded_state_dict(prefix=""),
                                                  checkpoint_dir=tmp))
    loaded = fresh.state_dict()
    equal = all(torch.equal(v, loaded[k]) for k, v in saved.items())
    parallel_state.destroy_model_parallel()
    return {"differs_before": differs_before, "equal": equal, "keys": len(saved)}


def _data_uses_masks() -> dict:
    batch = next(iter(torch.utils.data.DataLoader(_Documents(), batch_size=8)))
    causal = torch.tril(torch.ones(SEQ, SEQ)).unsqueeze(0) < 0.5
    return {"masked_tokens": int((batch["loss_mask"] == 0).sum()),
            "reset_rows": int((batch["attention_mask"] != causal).any(-1).sum())}


def _launch_four(rank: int, world: int, tmp: str) -> dict:
    out = {"data": _data_uses_masks()}
    for name, (tp, pp, torch_adam) in {"pp4": (1, 4, False), "tp2pp2": (2, 2, False),
                                       "pp2dp2": (1, 2, True)}.items():
        out[f"{name}_stock"] = _run(tp, pp, routed=False, torch_adam=torch_adam)
        out[f"{name}_routed"] = _run(tp, pp, routed=True, torch_adam=torch_adam)
    out["skip_pp4"] = _run(1, 4, routed=True, plan_kind="skip", skip_ratio=0.25, steps=6)
    out["refuse_ring"] = _refusal(1, 4, "ring_plan_on_gpt")
    out["refuse_hidden"] = _refusal(1, 4, "hidden")
    out["checkpoint"] = _checkpoint_round_trip(tmp)
    return out


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_workers(_launch_four, 4, str(tmp_path_factory.mktemp("dist_ckpt")))


# ----------------------------------------------------------------------------- assertions
def test_test_data_exercises_both_masks(four):
    assert four[0]["data"]["masked_tokens"] > 0 and four[0]["data"]["reset_rows"] > 0


def _assert_stock_equals_routed(results: list, name: str) -> None:
    for r in results:
        stock, routed = r[f"{name}_stock"], r[f"{name}_routed"]
        assert stock["coords"] == routed["coords"]
        assert stock["losses"] == routed["losses"], name  # bitwise, every step, on the ranks that report losses
        assert stock["eval"] == routed["eval"], name  # forward_only=True
        assert stock["state"].keys() == routed["state"].keys()
        for k in stock["state"]:
            assert torch.equal(stock["state"][k], routed["state"][k]), (name, r[f"{name}_stock"]["coords"], k)
        assert any(not torch.equal(stock["state"][k], stock["initial"][k]) for k in stock["state"]), name
    assert sum(len(x) for r in results for x in r[f"{name}_routed"]["losses"]) > 0
    assert sum(len(r[f"{name}_routed"]["eval"]) for r in results) > 0


def test_full_plan_bitwise_equals_stock_pp4(four):
    _assert_stock_equals_routed(four, "pp4")


def test_full_plan_bitwise_equals_stock_tp2_pp2(four):
    _assert_stock_equals_routed(four, "tp2pp2")


def test_full_plan_bitwise_equals_stock_pp2_dp2_with_torch_adam_over_main_grad(four):
    _assert_stock_equals_routed(four, "pp2dp2")
    replicas = [r["pp2dp2_routed"] for r in four if r["pp2dp2_routed"]["coords"][0] == 0]
    assert all(torch.equal(replicas[0]["state"][k], replicas[1]["state"][k]) for k in replicas[0]["state"])


def test_skip_plan_at_pp4_trains(four):
    runs = [r["skip_pp4"] for r in four]
    assert runs[0]["route_lengths"] == [3]  # every route skips one of the two body stages
    per_step = [sum(sum(r["losses"][s]) for r in runs) / sum(len(r["losses"][s]) for r in runs) for s in range(6)]
    assert per_step[-1] < per_step[0], per_step
    for r in runs:  # every stage is visited, so every stage trains
        assert any(not torch.equal(r["state"][k], r["initial"][k]) for k in r["state"])


def test_ring_plan_on_a_gpt_model_is_refused_on_every_rank_before_compute(four):
    for r in four:
        res = r["refuse_ring"]
        assert res["error"] is not None and res["error"].startswith("BoundaryMismatch")
        assert "GPTModel" in res["error"] and "layout='linear'" in res["error"]
        assert res["forward_calls"] == 0 and res["unchanged"]


def test_mismatched_hidden_size_is_refused_on_every_rank_before_compute(four):
    for r in four:
        res = r["refuse_hidden"]
        assert res["error"] is not None and res["error"].startswith("BoundaryMismatch"), res["error"]
        assert "stage 1 (rank 1" in res["error"] and "stage 2 (rank 2" in res["error"]
        assert "float32[16, 2, 32]" in res["error"] and "float32[16, 2, 48]" in res["error"]
        assert "hidden_size" in res["error"]
        assert res["forward_calls"] == 0 and res["unchanged"]


def test_dist_checkpointing_round_trips_bitwise_on_cpu(four):
    for r in four:
        assert r["checkpoint"]["differs_before"] and r["checkpoint"]["equal"] and r["checkpoint"]["keys"] > 0


# ----------------------------------------------------------------------------- launch 2: PP2 and the docs example
def _launch_two(rank: int, world: int) -> dict:
    import importlib.util
    from pathlib import Path

    out = {"pp2_stock": _run(1, 2, routed=False), "pp2_routed": _run(1, 2, routed=True)}
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "megatron_routed_loop.py"
    spec = importlib.util.spec_from_file_location("megatron_routed_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out["example_stock"] = example.train(steps=2, routed=False)
    out["example_routed"] = example.train(steps=2, routed=True, plan_kind="full")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["example_skip"] = example.train(steps=2, routed=True, plan_kind="skip")
    out["skip_warnings"] = [str(w.message) for w in caught if "equals the full plan" in str(w.message)]
    out["marked_lines"] = sum("# ROUTED" in line for line in path.read_text().splitlines())
    return out


@pytest.fixture(scope="module")
def two():
    return run_workers(_launch_two, 2)


def test_full_plan_bitwise_equals_stock_pp2(two):
    _assert_stock_equals_routed(two, "pp2")


def test_docs_example_loop_routed_equals_stock_and_marks_at_most_six_lines(two):
    for r in two:
        assert r["example_stock"]["losses"] == r["example_routed"]["losses"]
        assert r["example_stock"]["checkpoint_round_trip"] and r["example_routed"]["checkpoint_round_trip"]
        assert 1 <= r["marked_lines"] <= 6
        assert r["skip_warnings"], "a skip plan at PP2 skips nothing and must say so"
    assert any(r["example_stock"]["losses"] for r in two)


# ----------------------------------------------------------------------------- no processes
def test_plan_leaving_stages_unvisited_is_refused_with_the_reason():
    from integration.backends.megatron.schedule import check_every_stage_visited, warn_if_skips_nothing
    from integration.plan import build_plan

    nodes = [[0], [1], [2], [3]]
    plan = build_plan("skip", nodes, 4, layout="linear", skip_ratio=0.5)
    with pytest.raises(ValueError, match=r"stage\(s\) \[1, 2\] unvisited .* never trained"):
        check_every_stage_visited(plan)
    with pytest.warns(UserWarning, match="never trained"):
        check_every_stage_visited(plan, allow_unvisited=True)
    check_every_stage_visited(build_plan("skip", nodes, 4, layout="linear", skip_ratio=0.25))
    with pytest.warns(UserWarning, match="equals the full plan"):
        assert warn_if_skips_nothing(build_plan("skip", [[0], [1]], 4, layout="linear", skip_ratio=0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_skips_nothing(build_plan("skip", nodes, 4, layout="linear", skip_ratio=0.25))


def test_model_parallel_config_is_accepted_and_missing_hidden_size_named():
    from megatron.core.model_parallel_config import ModelParallelConfig

    from integration.backends.megatron.schedule import _activation_shape, _refuse_unsupported

    config = ModelParallelConfig()
    _refuse_unsupported(config, torch.nn.Linear(1, 1))  # no calculate_per_token_loss field: stock's default
    with pytest.raises(ValueError, match="has no hidden_size"):
        _activation_shape(config, SEQ, MBS, None, None)


def test_guard_optimizer_refuses_what_it_cannot_guard():
    from integration.backends.megatron.schedule import RoutedForwardBackward

    fb = RoutedForwardBackward.__new__(RoutedForwardBackward)
    fb.last_stage_visited = False
    p = torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([p], lr=1.0)
    fb.guard_optimizer(adam)
    p.grad = torch.ones(2)
    adam.step()
    assert torch.equal(p.detach(), torch.ones(2))  # unvisited: the update is skipped
    fb.last_stage_visited = True
    adam.step()
    assert not torch.equal(p.detach(), torch.ones(2))
    with pytest.raises(TypeError, match="neither a megatron optimizer"):
        fb.guard_optimizer(object())
