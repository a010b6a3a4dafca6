"""Rank functions for the multi-process DeepSpeed routing tests (importable for spawn)."""

from __future__ import annotations

import torch

from integration.models.llama import LlamaConfig, build_layer_list, build_ring_stages, lm_loss, reference_forward
from integration.plan import RoutePlan, Rules, full_pipeline, grid_stage_nodes, make_route

CFG = LlamaConfig(vocab_size=64, d_model=32, n_heads=2, seq_len=16)
MBS, SEQ, SEED = 2, 16, 7


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, CFG.vocab_size, (MBS, SEQ), generator=g),
             torch.randint(0, CFG.vocab_size, (MBS, SEQ), generator=g)) for _ in range(n)]


def ds_config(m: int, replicas: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": m,
            "train_batch_size": MBS * m * replicas, "steps_per_print": 10 ** 9, "gradient_clipping": 0.0}


def capture_grads(module, optimizer) -> dict:
    """Record the gradients the optimizer is about to apply (after DeepSpeed's reduction)."""
    captured: dict = {}
    original = optimizer.step

    def step(*args, **kwargs):
        captured.clear()
        captured.update({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})
        return original(*args, **kwargs)

    optimizer.step = step
    return captured


def routed_engine(layout: str, plan: RoutePlan, S: int, D: int, m: int, rule: str = "visited",
                  rules: Rules | None = None, layers_per_stage: int = 1):
    from integration.backends.deepspeed.backend import build_pipeline_module
    from integration.backends.deepspeed.engine import RoutingSettings
    from integration.backends.deepspeed.module import initialize_routed

    module = build_pipeline_module(CFG, layout, S, D, layers_per_stage, SEED)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, foreach=False)
    settings = RoutingSettings(plan, act_shape=(MBS, SEQ, CFG.d_model), label_shape=(MBS, SEQ), gradient_rule=rule,
                               rules=rules or Rules())
    engine, *_ = initialize_routed(model=module, config=ds_config(m, D), optimizer=opt, routing=settings)
    return engine, module, opt


def source_from(data, m: int):
    """Step-addressed data: home replica r, index i at step t -> data[(t * homes + r) * m + i]."""
    def src(step, replica, index, homes=1):
        return data[(step * homes + replica) * m + index]
    return src


def reference_grads(stage_modules, routes_orders, data_for_mb, m: int, dp: int, visits: list[int], rule: str,
                    total_mb: int) -> list[dict]:
    """Single-process reference: each microbatch runs its layers in its route order; loss/m per
    microbatch (DeepSpeed's GAS scaling), /dp (DP mean), then the gradient rule per stage."""
    for mod in stage_modules:
        mod.zero_grad(set_to_none=True)
    for mb, order in routes_orders.items():
        tokens, labels = data_for_mb(mb)
        loss = lm_loss(reference_forward(stage_modules, tokens, order), labels)
        (loss / m).backward()
    out = []
    for s, mod in enumerate(stage_modules):
        factor = 1.0 / dp
        if rule == "visited" and visits[s]:
            factor *= total_mb / visits[s]
        out.append({n: (p.grad * factor if p.grad is not None else torch.zeros_like(p)) for n, p in
                    mod.named_parameters()})
    return out


def compare(engine_grads: dict, ref: dict, prefix: str) -> float:
    """Max abs difference between engine grads (PipelineModule names) and a reference stage's grads."""
    worst = 0.0
    assert ref, "empty reference"
    for name, g in ref.items():
        eg = engine_grads.get(prefix + name)
        eg = torch.zeros_like(g) if eg is None else eg
        worst = max(worst, (eg - g).abs().max().item())
    return worst


# --------------------------------------------------------------------- launch 1: 4 ranks, D=1
def four_rank_checks(rank: int, world: int) -> dict:
    """Four scenarios in one 4-rank launch; each result (or its error) under its own key, so one
    scenario's exception does not hide the others' results (every rank runs the same scenarios in the
    same order and meets at a barrier after each)."""
    import traceback

    import torch.distributed as dist

    from integration.backends.deepspeed.module import ensure_deepspeed_comm

    ensure_deepspeed_comm()
    out: dict = {}
    for name, scenario in (("identity", _identity), ("invalid", _invalid_plan), ("routes", _routes),
                           ("unvisited", _unvisited)):
        try:
            out[name] = scenario()
        except Exception:  # noqa: BLE001 - reported by the scenario's own test
            out[name] = {"error": traceback.format_exc(limit=8)}
        dist.barrier()
    return out


S4, M4, STEPS4 = 4, 4, 3


def _identity() -> dict:
    """Full plan, linear layout vs stock PipelineEngine, 3 steps: losses, grads and weights."""
    import deepspeed
    from integration.backends.deepspeed.backend import build_pipeline_module

    S, m, steps = S4, M4, STEPS4
    data = batches(m * steps)
    runs = {}
    for kind in ("stock", "routed"):
        if kind == "stock":
            module = build_pipeline_module(CFG, "linear", S, 1, 1, SEED)
            opt = torch.optim.AdamW(module.parameters(), lr=1e-2, foreach=False)
            engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config(m, 1))
        else:
            engine, module, opt = routed_engine("linear", full_pipeline(grid_stage_nodes(S, 1), m, "linear"),
                                                S, 1, m)
        grads = capture_grads(module, opt)
        losses, per_step_grads = [], []
        for step in range(steps):
            losses.append(engine.train_batch(iter(data[step * m:(step + 1) * m])).item())
            per_step_grads.append({k: v.clone() for k, v in grads.items()})
        runs[kind] = (losses, per_step_grads, {k: v.clone() for k, v in module.state_dict().items()})
    return {"losses": (runs["stock"][0], runs["routed"][0]),
            "grads_equal": all(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
                               for a, b in zip(runs["stock"][1], runs["routed"][1])),
            "weights_equal": all(torch.equal(runs["stock"][2][k], runs["routed"][2][k]) for k in runs["stock"][2]),
            "nonempty": len(runs["routed"][1][0]) > 0}


def _invalid_plan() -> dict:
    """An invalid plan is refused before anything is built or computed."""
    from integration.plan.rules import PlanValidationError

    bad = full_pipeline(grid_stage_nodes(S4, 1), M4)
    bad.routes[1] = make_route(1, bad.stage_nodes, 0, [(3, 0), (1, 0), (2, 0)])  # swap distance 2
    try:
        routed_engine("ring", bad, S4, 1, M4)
        return {"refused": None}
    except PlanValidationError as exc:
        return {"refused": str(exc)}


def _routes() -> dict:
    """Route equivalence (ring): skip and swap routes against a single-process reference."""
    S = S4
    orders = {0: [2, 1], 1: [1, 3], 2: [3, 2], 3: [1, 2], 4: [2, 3], 5: [1, 3]}
    m6 = len(orders)
    sn = grid_stage_nodes(S, 1)
    plan = RoutePlan(sn, [make_route(mb, sn, 0, [(s, 0) for s in o]) for mb, o in orders.items()], path_length=3)
    data6 = batches(m6, seed=1)
    engine, module, opt = routed_engine("ring", plan, S, 1, m6)
    grads = capture_grads(module, opt)
    loss = engine.train_batch(iter(data6)).item()
    stages = build_ring_stages(CFG, S, 1, SEED)
    visits = plan.stage_visits()
    ref = reference_grads(stages, orders, lambda mb: data6[mb], m6, 1, visits, "visited", m6)
    control = reference_grads(build_ring_stages(CFG, S, 1, SEED), {mb: [1, 2, 3] for mb in orders},
                              lambda mb: data6[mb], m6, 1, [6, 6, 6, 6], "visited", m6)
    me = engine.stage_id
    with torch.no_grad():
        ref_losses = [lm_loss(reference_forward(stages, data6[mb][0], o), data6[mb][1]).item()
                      for mb, o in orders.items()]
    return {"diff": compare(grads, ref[me], f"{me}."), "control_diff": compare(grads, control[me], f"{me}."),
            "loss": (loss, sum(ref_losses) / len(ref_losses))}


def _unvisited() -> dict:
    """A stage no microbatch visits does not move (weights and optimizer state), counters advance."""
    S = S4
    data = batches(M4 * STEPS4)
    sn = grid_stage_nodes(S, 1)
    orders = {mb: [1, 3] for mb in range(4)}
    plan = RoutePlan(sn, [make_route(mb, sn, 0, [(s, 0) for s in o]) for mb, o in orders.items()], path_length=3)
    engine, module, opt = routed_engine("ring", plan, S, 1, 4, rules=Rules(equal_visits=False))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for step in range(2):
        engine.train_batch(iter(data[step * 4:(step + 1) * 4]))
    after = module.state_dict()
    return {"stage": engine.stage_id, "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "opt_state_entries": len(opt.state), "global_steps": engine.global_steps}


# --------------------------------------------------------------------- launch 2: 6 ranks, S=3 x D=2
def cross_replica_checks(rank: int, world: int) -> dict:
    from integration.backends.deepspeed.module import ensure_deepspeed_comm

    ensure_deepspeed_comm()
    S, D, m = 3, 2, 4
    sn = grid_stage_nodes(S, D)
    data = batches(D * m, seed=2)
    out = {}
    # Ring, rule "all": microbatches of both homes cross between replicas, some swapped.
    routes_spec = {0: [(1, 1), (2, 0)], 1: [(2, 1), (1, 0)], 2: [(1, 0), (2, 1)], 3: [(2, 0), (1, 1)],
                   4: [(1, 1), (2, 1)], 5: [(2, 0), (1, 0)], 6: [(1, 0), (2, 0)], 7: [(2, 1), (1, 1)]}
    routes = [make_route(mb, sn, mb // m, hops) for mb, hops in routes_spec.items()]
    plan = RoutePlan(sn, routes, path_length=3)
    for layout, rule in (("ring", "all"), ("linear", "visited")):
        if layout == "linear":
            lin = {0: [(1, 1), (2, 0)], 1: [(1, 0), (2, 1)], 2: [(1, 1), (2, 1)], 3: [(1, 0), (2, 0)],
                   4: [(1, 0), (2, 0)], 5: [(1, 1), (2, 1)], 6: [(1, 0), (2, 1)], 7: [(1, 1), (2, 0)]}
            plan = RoutePlan(sn, [make_route(mb, sn, mb // m, h) for mb, h in lin.items()], path_length=3,
                             layout="linear")
        engine, module, opt = routed_engine(layout, plan, S, D, m, rule=rule)
        grads = capture_grads(module, opt)
        engine.set_batch_source(lambda step, r, i: data[r * m + i])
        loss = engine.train_batch().item()
        orders = {r.mb: list(r.body_stages) for r in plan.routes}
        if layout == "ring":
            mods = build_ring_stages(CFG, S, 1, SEED)
            ref = reference_grads(mods, orders, lambda mb: data[mb], m, D, plan.stage_visits(), rule, D * m)
            me = engine.stage_id
            diff = compare(grads, ref[me], f"{me}.")
        else:
            layers = build_layer_list(CFG, S, SEED)  # [embed, b0, b1, b2, head]; stage s holds block s (+embed/head)
            lin_orders = {mb: [1] + [s + 1 for s in o] for mb, o in orders.items()}  # block 0 lives on stage 0
            ref = reference_grads(layers, lin_orders, lambda mb: data[mb], m, D, [8, 8, 8, 8, 8], rule, D * m)
            owned = {0: [(0, "0."), (1, "1.")], 1: [(2, "2.")], 2: [(3, "3."), (4, "4.")]}[engine.stage_id]
            diff = max(compare(grads, ref[i], prefix) for i, prefix in owned)
        out[layout] = {"diff": diff, "loss": loss, "stage": engine.stage_id, "replica": engine.grid.data_parallel_id}
    return out
