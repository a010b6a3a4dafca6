"""megatron-core backend: identity with stock 1F1B, route equivalence, tied embeddings, bad input.

Real gloo processes (tests.dist_utils.run_workers). Few launches, many checks per launch: each
launch re-initialises megatron's groups for several layouts in the same processes.
"""

from __future__ import annotations

import pytest
import torch

from integration.plan import Rules, full_pipeline, make_route
from integration.plan.routeplan import RoutePlan

from tests.dist_utils import run_workers

VOCAB, SEQ, HIDDEN, HEADS, MBS, LAYERS, SEED = 64, 8, 32, 4, 2, 1, 3
LR, BETAS, WD = 3e-3, (0.9, 0.95), 0.1


# ----------------------------------------------------------------------------- helpers (run in workers)
def _data(step: int, replica: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 100 * replica + index)
    return torch.randint(0, VOCAB, (MBS, SEQ), generator=g), torch.randint(0, VOCAB, (MBS, SEQ), generator=g)


def _home_iter(plan: RoutePlan, step: int, replica: int, m: int):
    return iter([dict(zip(("tokens", "labels"), _data(step, replica, i))) for i in range(m)])


def _train(layout: str, tp: int, pp: int, plan_fn, m: int, steps: int, *, stock: bool = False, rules=None,
           clip: float = 0.0, wd: float = WD):
    """Build megatron groups + model + optimizer and run ``steps`` iterations; return what tests compare."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from integration.backends.megatron.build import build_model, build_optimizer, gpt_forward_step, initialize_megatron
    from integration.backends.megatron.layout import MegatronGrid
    from integration.backends.megatron.schedule import RoutedForwardBackward
    from integration.backends.megatron.stages import gpt_config

    initialize_megatron(tp, pp, SEED)
    grid = MegatronGrid.from_parallel_state()
    nl = LAYERS * (pp if layout == "linear" else pp - 1)
    config = gpt_config(num_layers=nl, hidden_size=HIDDEN, num_attention_heads=HEADS, tensor_parallel=tp,
                        pipeline_parallel=pp)
    model = build_model(layout, config, vocab_size=VOCAB, seq_len=SEQ, layers_per_stage=LAYERS, seed=SEED)
    opt = build_optimizer(model, lr=LR, weight_decay=wd, betas=BETAS, clip_grad=clip)
    plan = plan_fn(grid.stage_nodes)
    initial = {k: v.detach().clone() for k, v in model.module.state_dict().items() if v is not None}
    if stock:
        fb = get_forward_backward_func()
    else:
        fb = RoutedForwardBackward(plan, num_microbatches=m, rules=rules, grid=grid,
                                   allow_unvisited=rules is not None and not rules.equal_visits)
        fb.guard_optimizer(opt)
    stage, replica, t = grid.coords(dist.get_rank())
    losses = []
    for step in range(steps):
        model.zero_grad_buffer()
        opt.zero_grad()
        it = _home_iter(plan, step, replica, m) if (stage == 0 or (stock and stage == pp - 1)) else None
        out = fb(forward_step_func=gpt_forward_step, data_iterator=it, model=[model], num_microbatches=m,
                 seq_length=SEQ, micro_batch_size=MBS)
        opt.step()
        losses.append([float(o["lm loss"]) for o in out])
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items() if v is not None}
    ps.destroy_model_parallel()
    return {"coords": (stage, replica, t), "losses": losses, "state": state, "initial": initial}


def _reference(plan: RoutePlan, pp: int, m: int, steps: int, *, gradient_rule: str = "visited"):
    """Single-process run of the same megatron stage modules, layers in each route's order.

    Needs megatron initialised with TP=1, PP=1 (modules read their groups from parallel_state).
    """
    from integration.backends.megatron.build import gpt_loss_func
    from integration.backends.megatron.stages import build_stage_model, gpt_config

    config = gpt_config(num_layers=LAYERS * (pp - 1), hidden_size=HIDDEN, num_attention_heads=HEADS)
    stages = [build_stage_model("ring", config, stage=s, num_stages=pp, vocab_size=VOCAB, seq_len=SEQ,
                                layers_per_stage=LAYERS, seed=SEED) for s in range(pp)]
    # megatron-core 0.16.1's default param groups (measured) decay every parameter, norms included.
    opts = [torch.optim.AdamW(st.parameters(), lr=LR, betas=BETAS, eps=1e-8, weight_decay=WD) for st in stages]
    visits, M = plan.stage_visits(), plan.num_microbatches
    index = {}
    for home in plan.stage_nodes[0]:
        for i, r in enumerate(sorted(plan.routes_from(home), key=lambda r: r.mb)):
            index[r.mb] = i
    losses = []
    pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    for step in range(steps):
        for st in stages:
            st.zero_grad(set_to_none=True)
        step_losses = []
        for route in sorted(plan.routes, key=lambda r: r.mb):
            tokens, labels = _data(step, route.home_replica, index[route.mb])
            home = stages[0]
            home.set_routed_part("embed")
            h = home(tokens, pos)
            for s in route.body_stages:
                stages[s].set_input_tensor(h)
                h = stages[s](None, None)
            home.set_routed_part("head")
            home.set_input_tensor(h)
            loss, _ = gpt_loss_func(torch.ones(MBS, SEQ), home(None, None, labels=labels))
            (loss / M).backward()
            step_losses.append(float(loss))
        for s, st in enumerate(stages):
            if visits[s] and gradient_rule == "visited":
                for p in st.parameters():
                    if p.grad is not None:
                        p.grad.mul_(M / visits[s])
            if visits[s]:
                opts[s].step()
        losses.append(step_losses)
    return {"losses": losses, "states": [{k: v.detach().clone() for k, v in st.state_dict().items()
                                          if v is not None} for st in stages]}


# ----------------------------------------------------------------------------- plans
def ring_skip_swap_plan(stage_nodes) -> RoutePlan:
    """S=4 ring, L=3, six microbatches: skips every stage once per pair and swaps 1<->2 and 2<->3."""
    orders = [(1, 2), (2, 1), (2, 3), (3, 2), (1, 3), (1, 3)]
    routes = [make_route(i, stage_nodes, 0, [(s, 0) for s in o]) for i, o in enumerate(orders)]
    return RoutePlan(stage_nodes=[list(s) for s in stage_nodes], routes=routes, path_length=3, layout="ring")


def ring_unvisited_plan(stage_nodes) -> RoutePlan:
    """S=4 ring where no microbatch visits stage 3 (needs Rules(equal_visits=False))."""
    routes = [make_route(i, stage_nodes, 0, [(s, 0) for s in o]) for i, o in enumerate([(1, 2), (2, 1)])]
    return RoutePlan(stage_nodes=[list(s) for s in stage_nodes], routes=routes, path_length=3, layout="ring")


def ring_cross_replica_plan(stage_nodes) -> RoutePlan:
    """S=2 x D=2 ring: odd microbatches cross to the other replica's body stage."""
    routes = []
    for home in range(2):
        for j in range(2):
            routes.append(make_route(2 * home + j, stage_nodes, home, [(1, (home + j) % 2)]))
    return RoutePlan(stage_nodes=[list(s) for s in stage_nodes], routes=routes, path_length=2, layout="ring")


def _full(layout):
    return lambda nodes, m: full_pipeline(nodes, m, layout)


# ----------------------------------------------------------------------------- worker of launch 1 (4 ranks)
def _launch_four(rank: int, world: int):
    from functools import partial
    out = {}
    # (a) PP=4 linear, full plan: routed vs stock 1F1B (grad clipping and weight decay on).
    for name in ("stock", "routed"):
        out[f"pp4_{name}"] = _train("linear", 1, 4, partial(full_pipeline, microbatches_per_home=4, layout="linear"),
                                    4, 2, stock=name == "stock", clip=0.05)
    # (b) PP=4 ring skip/swap routes; (c) a stage no microbatch visits.
    out["skip"] = _train("ring", 1, 4, ring_skip_swap_plan, 6, 2)
    out["unvisited"] = _train("ring", 1, 4, ring_unvisited_plan, 2, 2, rules=Rules(equal_visits=False))
    # (d) PP=2 x DP=2 linear identity (megatron DDP); (e) PP=2 x DP=2 ring routes crossing replicas.
    for name in ("stock", "routed"):
        out[f"pp2dp2_{name}"] = _train("linear", 1, 2, partial(full_pipeline, microbatches_per_home=2,
                                                               layout="linear"), 2, 2, stock=name == "stock", clip=0.05)
    out["cross"] = _train("ring", 1, 2, ring_cross_replica_plan, 2, 2)
    # (f) TP=2 x PP=2 ring (plan nodes = tensor-rank-0 ranks).
    out["tp2"] = _train("ring", 2, 2, partial(full_pipeline, microbatches_per_home=3, layout="ring"), 3, 2)
    from integration.backends.megatron.build import initialize_megatron
    initialize_megatron(1, 1, SEED)  # collective: every rank, before rank 0 computes alone
    if rank == 0:  # single-process references (and negative controls) on the same megatron modules
        nodes4 = [[0], [1], [2], [3]]
        out["ref_skip"] = _reference(ring_skip_swap_plan(nodes4), 4, 6, 2)
        in_order = RoutePlan(stage_nodes=nodes4, routes=[make_route(i, nodes4, 0, [(s, 0) for s in sorted(o)]) for i, o
                                                         in enumerate([(1, 2), (2, 1), (2, 3), (3, 2), (1, 3), (1, 3)])],
                             path_length=3, layout="ring")
        out["ref_skip_negative"] = _reference(in_order, 4, 6, 2)
        out["ref_unvisited"] = _reference(ring_unvisited_plan(nodes4), 4, 2, 2)
        nodes22 = [[0, 1], [2, 3]]
        out["ref_cross"] = _reference(ring_cross_replica_plan(nodes22), 2, 2, 2)
        out["ref_tp2"] = _reference(full_pipeline([[0], [2]], 3, "ring"), 2, 3, 2)
    return out


@pytest.fixture(scope="module")
def four():
    return run_workers(_launch_four, 4)


def _by_stage(results, key):
    """stage -> list of (coords, result) for one scenario."""
    out = {}
    for r in results:
        res = r[key]
        out.setdefault(res["coords"][0], []).append(res)
    return out


def _assert_state_equal(a: dict, b: dict, exact: bool = True, atol: float = 1e-5):
    """Bitwise, or within ``atol`` (Adam normalises tiny, noisy grads, so allow ~lr/300 per element)."""
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            diff = float((a[k] - b[k]).abs().max())
            assert diff <= atol, f"{k}: max abs diff {diff:.3g} > {atol}"


def _flat_losses(results, key):
    """Per step: the losses of every microbatch, gathered from the ranks that computed them (tp 0)."""
    steps = len(results[0][key]["losses"])
    return [sorted(l for r in results if r[key]["coords"][2] == 0 for l in r[key]["losses"][s]) for s in range(steps)]


def test_identity_with_stock_1f1b_pp4_and_pp2_dp2(four):
    for prefix in ("pp4", "pp2dp2"):
        for r in four:
            stock, routed = r[f"{prefix}_stock"], r[f"{prefix}_routed"]
            assert stock["losses"] == routed["losses"], prefix  # bitwise, every step, on the loss ranks
            _assert_state_equal(stock["state"], routed["state"])  # bitwise weights after 2 steps
            assert any(not torch.equal(stock["state"][k], stock["initial"][k]) for k in stock["state"])
        assert sum(len(l) for r in four for l in r[f"{prefix}_routed"]["losses"]) > 0


def test_tied_embeddings_in_sync_across_first_and_last_linear_stage(four):
    for prefix in ("pp4_routed", "pp2dp2_routed"):
        stages = _by_stage(four, prefix)
        last = max(stages)
        for first, tail in zip(stages[0], stages[last]):
            emb = first["state"]["embedding.word_embeddings.weight"]
            head = tail["state"]["output_layer.weight"]
            assert torch.equal(emb, head)
            assert not torch.equal(emb, first["initial"]["embedding.word_embeddings.weight"])


def test_skip_and_swap_routes_match_single_process_reference(four):
    ref, neg = four[0]["ref_skip"], four[0]["ref_skip_negative"]
    routed = _flat_losses(four, "skip")
    for step in range(2):
        torch.testing.assert_close(torch.tensor(routed[step]), torch.tensor(sorted(ref["losses"][step])), rtol=1e-5,
                                   atol=1e-6)
    for s, [res] in _by_stage(four, "skip").items():
        _assert_state_equal(res["state"], ref["states"][s], exact=False)
    # Negative control: the same microbatches with body stages in sorted order (no swaps) differ.
    assert max(abs(a - b) for a, b in zip(routed[1], sorted(neg["losses"][1]))) > 1e-4
    body = _by_stage(four, "skip")[2][0]["state"]
    assert any((body[k] - neg["states"][2][k]).abs().max() > 1e-5 for k in body)


def test_unvisited_stage_does_not_move_and_others_match_reference(four):
    ref = four[0]["ref_unvisited"]
    stages = _by_stage(four, "unvisited")
    [s3] = stages[3]
    _assert_state_equal(s3["state"], s3["initial"])  # weight decay and Adam would have moved it
    for s in (0, 1, 2):
        _assert_state_equal(stages[s][0]["state"], ref["states"][s], exact=False)


def test_cross_replica_routes_with_megatron_ddp_pp2_dp2(four):
    ref = four[0]["ref_cross"]
    routed = _flat_losses(four, "cross")
    for step in range(2):
        torch.testing.assert_close(torch.tensor(routed[step]), torch.tensor(sorted(ref["losses"][step])), rtol=1e-5,
                                   atol=1e-6)
    for s, results in _by_stage(four, "cross").items():
        _assert_state_equal(results[0]["state"], results[1]["state"])  # DDP keeps replicas bitwise equal
        _assert_state_equal(results[0]["state"], ref["states"][s], exact=False)


def test_tp2_pp2_ring_matches_tp1_reference(four):
    ref = four[0]["ref_tp2"]
    routed = _flat_losses(four, "tp2")
    for step in range(2):
        torch.testing.assert_close(torch.tensor(routed[step]), torch.tensor(sorted(ref["losses"][step])), rtol=1e-4,
                                   atol=1e-5)
    peers = [r["tp2"] for r in four if r["tp2"]["coords"][0] == 0]
    assert sorted(p["coords"][2] for p in peers) == [0, 1]
    assert all(p["losses"] for p in peers)  # both TP members of the home node ran its program


# ----------------------------------------------------------------------------- bad input (no processes)
def test_plan_that_does_not_fit_the_grid_is_refused():
    from integration.backends.megatron.layout import MegatronGrid, check_plan_fits

    grid = MegatronGrid({(s, r, t): t + 2 * (r + 1 * s) for s in range(2) for r in range(1) for t in range(2)}, 2, 1, 2)
    assert grid.stage_nodes == [[0], [2]]
    check_plan_fits(full_pipeline(grid.stage_nodes, 2, "ring"), grid, 2)
    with pytest.raises(ValueError, match="stage_nodes .* do not match the megatron rank grid"):
        check_plan_fits(full_pipeline([[0], [1]], 2, "ring"), grid, 2)
    with pytest.raises(ValueError, match="it has 3 stages"):
        check_plan_fits(full_pipeline([[0], [2], [4]], 2, "ring"), grid, 2)
    with pytest.raises(ValueError, match="num_microbatches=4"):
        check_plan_fits(full_pipeline(grid.stage_nodes, 2, "ring"), grid, 4)
    bad = RoutePlan(stage_nodes=[[0], [2]], routes=[make_route(0, [[0], [2]], 0, [])], path_length=2)
    with pytest.raises(Exception, match="CC"):
        check_plan_fits(bad, grid, 1)


def _cfg(**parallel):
    from omegaconf import OmegaConf
    return OmegaConf.create({
        "parallel": {"stages": 2, "replicas": 1, "tensor": 1, **parallel},
        "model": {"layout": "ring", "d_model": HIDDEN, "n_heads": 6, "layers_per_stage": 1, "seq_len": SEQ,
                  "vocab_size": VOCAB},
        "train": {"micro_batch_size": MBS, "microbatches": 2, "lr": LR, "min_lr": 0.0, "warmup_steps": 0,
                  "weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "steps": 2},
        "routing": {"gradient_rule": "visited", "max_inflight": None}})


def test_bad_parallel_layout_and_version_refused_before_any_group_exists(monkeypatch):
    import torch.distributed as dist
    from megatron.core import package_info

    from integration.backends.megatron.backend import build_megatron_backend
    from integration.backends.megatron.cpu_compat import UnsupportedMegatronVersion, check_megatron_version

    plan = full_pipeline([[0], [1]], 2, "ring")
    with pytest.raises(ValueError, match="parallel.tensor=4 does not divide model.n_heads=6"):
        build_megatron_backend(_cfg(tensor=4), plan, None, 0, 8)
    with pytest.raises(ValueError, match="world size 3"):
        build_megatron_backend(_cfg(), plan, None, 0, 3)
    with pytest.raises(UnsupportedMegatronVersion, match="megatron-core 0.12.0 is not supported"):
        check_megatron_version("0.12.0")
    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(UnsupportedMegatronVersion, match="0.17.0"):
        build_megatron_backend(_cfg(), plan, None, 0, 2)
    assert not dist.is_initialized()  # refused before any process group or model was built


# ----------------------------------------------------------------------------- launch 2 (2 ranks): main job backend
def _launch_two(rank: int, world: int):
    from omegaconf import OmegaConf

    from integration.backends.megatron.backend import build_megatron_backend

    out = {}
    cfg = OmegaConf.create({
        "parallel": {"stages": 2, "replicas": 1, "tensor": 1},
        "model": {"layout": "ring", "d_model": HIDDEN, "n_heads": HEADS, "layers_per_stage": 1, "seq_len": SEQ,
                  "vocab_size": VOCAB},
        "train": {"micro_batch_size": MBS, "microbatches": 2, "lr": LR, "min_lr": 0.0, "warmup_steps": 1,
                  "weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "steps": 3},
        "routing": {"gradient_rule": "visited", "max_inflight": None}})
    from integration.models.llama import LlamaConfig
    model_cfg = LlamaConfig(vocab_size=VOCAB, d_model=HIDDEN, n_heads=HEADS, seq_len=SEQ)
    backend = build_megatron_backend(cfg, full_pipeline([[0], [1]], 2, "ring"), model_cfg, rank, world)
    out["steps"] = [backend.train_step(s, _data) for s in range(3)]
    out["val"] = backend.validation_loss(lambda step, replica, i: _data(99, replica, i), 2)
    out["stage_of_rank"] = [backend.grid.coords(r)[:2] for r in range(world)]
    from integration.config import stage_nodes_for
    out["grid_matches_config"] = stage_nodes_for(OmegaConf.merge(cfg, {"backend": {"name": "megatron"}})) == \
        backend.grid.stage_nodes
    return out


def test_main_job_backend():
    results = run_workers(_launch_two, 2)
    for r in results:
        assert r["stage_of_rank"] == [(0, 0), (1, 0)]
        assert r["grid_matches_config"]
    a, b = results
    assert [s.loss for s in a["steps"]] == [s.loss for s in b["steps"]]  # same value on every rank
    assert a["val"] == b["val"] and a["val"] > 0
    lrs = [s.lr for s in a["steps"]]
    assert lrs[0] < lrs[1] and lrs[2] < lrs[1]  # warmup, then cosine decay
    assert a["steps"][2].loss < a["steps"][0].loss + 0.5


def test_cpu_patch_diff_applies_to_the_pinned_megatron(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    import megatron.core

    from integration.backends.megatron.cpu_compat import SUPPORTED_VERSIONS, megatron_version

    assert megatron_version() in SUPPORTED_VERSIONS
    diff = Path(__file__).resolve().parents[2] / "patches" / "megatron-core-0.16.1-cpu.diff"
    site = Path(megatron.core.__file__).parents[2]
    files = [line[6:].strip() for line in diff.read_text().splitlines() if line.startswith("+++ b/")]
    assert len(files) == 2
    for rel in files:  # copies of the installed package files: the real tree is never touched
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / rel, tmp_path / rel)
    res = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(diff)], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
