"""Rank function of the DeepSpeed drop-in tests: user-style PipelineModules, stock vs routed, one launch.

Every rank runs the same scenarios in the same order and meets at a barrier after each; a scenario's
result (or its error) is kept under its own key, so one failure does not hide the others.
"""

from __future__ import annotations

import contextlib
import io
import sys
import traceback
import types
from pathlib import Path
from typing import Any

import torch

from tests.deepspeed.ds_models import MBS, MODELS, data_for

STEPS = 3


def _config(m: int, replicas: int, **extra: Any) -> dict:
    conf = {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": m,
            "train_batch_size": MBS * m * replicas, "steps_per_print": 10 ** 9, "gradient_clipping": 0.0}
    conf.update(extra)
    return conf


def _run(kind: str, S: int, D: int, m: int, routed: bool, conf_extra: dict | None = None,
         routing: Any = None, training_data: bool = False, steps: int = STEPS, client_optimizer: bool = True) -> dict:
    """Train ``steps`` iterations of model ``kind``; per-step losses, grad norms, final weights, stdout."""
    import deepspeed

    from integration.backends.deepspeed.module import initialize_routed

    module = MODELS[kind](S, D)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, foreach=False) if client_optimizer else None
    conf = _config(m, D, **(conf_extra or {}))
    dp = module._grid.data_parallel_id
    data = data_for(kind, steps * m * D, seed=100)
    if (conf_extra or {}).get("bf16", {}).get("enabled"):  # a bf16 model takes bf16 inputs, as with stock
        data = [(x.to(torch.bfloat16), y) for x, y in data]
    dataset = None
    if training_data:  # a map-style dataset of single samples; DeepSpeed's sampler shards it over replicas
        xs = torch.cat([x for x, _ in data])
        ys = torch.cat([y for _, y in data])
        dataset = torch.utils.data.TensorDataset(xs, ys)
    init = initialize_routed if routed else deepspeed.initialize
    kwargs = {"routing": routing} if routed and routing is not None else {}
    returned = init(model=module, optimizer=opt, model_parameters=module.parameters(), config=conf,
                    training_data=dataset, **kwargs)
    engine = returned[0]
    mine = data[dp * steps * m:(dp + 1) * steps * m]
    losses, norms, out = [], [], io.StringIO()
    for step in range(steps):
        with contextlib.redirect_stdout(out):
            if training_data:
                loss = engine.train_batch()
            else:
                loss = engine.train_batch(iter(mine[step * m:(step + 1) * m]))
        losses.append(float(loss))
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
    weights = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {"losses": losses, "norms": norms, "weights": weights, "stdout": out.getvalue(), "returned": returned,
            "engine": engine}


def _compare(kind: str, S: int, D: int, m: int, **kw: Any) -> dict:
    stock = _run(kind, S, D, m, routed=False, **kw)
    routed = _run(kind, S, D, m, routed=True, **kw)
    w_s, w_r = stock["weights"], routed["weights"]
    ret = routed["returned"]
    return {"stock": stock["losses"], "routed": routed["losses"], "norms": (stock["norms"], routed["norms"]),
            "weights_equal": set(w_s) == set(w_r) and all(torch.equal(w_s[k], w_r[k]) for k in w_s),
            "weights_max_diff": max((w_s[k] - w_r[k]).abs().max().item() for k in w_s),
            "n_weights": len(w_s), "returned_len": len(ret), "returned_optimizer": ret[1] is ret[0].optimizer,
            "dataloader": ret[2] is not None, "stdout": (stock["stdout"], routed["stdout"]),
            "stage": routed["engine"].stage_id, "replica": routed["engine"].grid.data_parallel_id,
            "tensor_rank": routed["engine"].grid.get_slice_parallel_rank(),
            "weights": {k: v.tolist() for k, v in w_r.items()} if kind == "tp_mlp" else None}


def _bf16() -> dict:
    """bf16 + gradient_rule=all at GAS 4 (PP2 x DP2): does DeepSpeed's bf16 path run here, and do we match it?"""
    conf = {"bf16": {"enabled": True}}
    try:
        stock = _run("linear_stack", 2, 2, 4, routed=False, conf_extra=conf)
    except Exception as exc:  # noqa: BLE001 - reported: the bf16 path does not run on this machine
        return {"stock_runs": False, "stock_error": repr(exc)[:500]}
    routed = _run("linear_stack", 2, 2, 4, routed=True, conf_extra=conf, routing={"gradient_rule": "all"})
    w_s, w_r = stock["weights"], routed["weights"]
    return {"stock_runs": True, "stock": stock["losses"], "routed": routed["losses"],
            "norms": (stock["norms"], routed["norms"]),
            "weights_max_diff": max((w_s[k] - w_r[k]).abs().max().item() for k in w_s),
            "bf16_optimizer": type(routed["engine"].optimizer).__name__}


def _visited_refused(conf: dict) -> str | None:
    from integration.backends.deepspeed.module import initialize_routed

    module = MODELS["linear_stack"](2, 2)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, foreach=False)
    try:
        initialize_routed(model=module, optimizer=opt, config=_config(2, 2, **conf),
                          routing={"gradient_rule": "visited"})
    except ValueError as exc:
        return str(exc)
    return None


def _refusals() -> dict:
    """Settings refused before DeepSpeed builds anything: a ring plan on a user's (linear) module, an
    unknown routing key, routing given twice, tensor parallelism on the fault-tolerant engine."""
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from integration.backends.deepspeed.engine import RoutingSettings
    from integration.backends.deepspeed.module import initialize_routed
    from integration.plan import full_pipeline, grid_stage_nodes
    from integration.recovery.engine import FaultTolerantEngine

    def attempt(module, conf, **kw):
        try:
            initialize_routed(model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-2), config=conf,
                              **kw)
        except (ValueError, TypeError) as exc:
            return str(exc)
        return None

    module = MODELS["linear_stack"](4, 1)
    out = {"ring_plan": attempt(module, _config(2, 1),
                                routing=RoutingSettings(plan=full_pipeline(grid_stage_nodes(4, 1), 2))),
           "unknown_key": attempt(module, _config(2, 1, routing={"plan": "skip", "skip_rate": 0.25})),
           "twice": attempt(module, _config(2, 1, routing={"plan": "full"}), routing={"plan": "full"})}
    torch.manual_seed(0)
    tp = PipelineModule(layers=[torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)], loss_fn=torch.nn.MSELoss(),
                        topology=PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))
    out["tensor_parallel"] = attempt(tp, _config(2, 1), engine_class=FaultTolerantEngine)
    return out


def _skip_trains() -> dict:
    """A skip plan from the config's routing block on equal boundaries: it skips, and the loss goes down."""
    from integration.backends.deepspeed.module import initialize_routed

    module = MODELS["linear_stack"](4, 1)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, foreach=False)
    conf = _config(4, 1, routing={"plan": "skip", "skip_ratio": 0.25, "seed": 3})
    engine, *_ = initialize_routed(model=module, optimizer=opt, config=conf)
    data = data_for("linear_stack", 4, seed=5)
    losses = [float(engine.train_batch(iter(data))) for _ in range(12)]
    return {"losses": losses, "hops": sorted({len(r.hops) for r in engine.plan.routes}),
            "visits": engine.plan.stage_visits()}


def _unequal_refused() -> dict:
    """A skip plan on the conv net (every boundary differs) is refused before any training compute."""
    from integration.backends.deepspeed.module import initialize_routed
    from integration.runtime.boundary import BoundaryMismatch

    module = MODELS["conv_net"](4, 1)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, foreach=False)
    engine, *_ = initialize_routed(model=module, optimizer=opt, config=_config(4, 1),
                                   routing={"plan": "skip", "skip_ratio": 0.25, "seed": 3})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    ops_run = []
    engine.executor.run_op = lambda op, _orig=engine.executor.run_op: (ops_run.append(op), _orig(op))
    try:
        engine.train_batch(iter(data_for("conv_net", 4, seed=5)))
        msg = None
    except BoundaryMismatch as exc:
        msg = str(exc)
    return {"refused": msg, "ops_run": len(ops_run), "global_steps": engine.global_steps,
            "unchanged": all(torch.equal(before[k], v) for k, v in module.state_dict().items())}


EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "deepspeed_pipe_routed.py"
MARK = "# skipfree"


def stock_version(source: str) -> tuple[str, int]:
    """The example as plain DeepSpeed: lines ending ``# skipfree`` dropped, ``# skipfree: was X`` lines
    replaced by X (same indentation). Returns the source and the number of marked lines."""
    out, marked = [], 0
    for line in source.splitlines():
        code, sep, note = line.partition(MARK)
        if not sep:
            out.append(line)
            continue
        marked += 1
        if note.startswith(": was "):
            out.append(code[:len(code) - len(code.lstrip())] + note[len(": was "):])
    return "\n".join(out) + "\n", marked


def _exec_main(source: str, argv: list[str]) -> list[float]:
    module = types.ModuleType("deepspeed_pipe_example")
    exec(compile(source, str(EXAMPLE), "exec"), module.__dict__)  # noqa: S102 - the docs example itself
    return module.main(argv)


def _example() -> dict:
    """The docs example: stock (marked lines undone) vs as written with the full plan, and a skip run."""
    source = EXAMPLE.read_text()
    stock_source, marked = stock_version(source)
    with contextlib.redirect_stdout(io.StringIO()):
        stock = _exec_main(stock_source, ["--steps", "3"])
        routed = _exec_main(source, ["--steps", "3", "--plan", "full"])
        skip = _exec_main(source, ["--steps", "8", "--plan", "skip"])
    return {"stock": stock, "routed": routed, "skip": skip, "marked": marked,
            "stock_mentions_skipfree": "initialize_routed" in stock_source or "integration" in stock_source}


def dropin_checks(rank: int, world: int, names: list[str] | None = None) -> dict:
    import torch.distributed as dist

    from integration.backends.deepspeed.module import ensure_deepspeed_comm

    ensure_deepspeed_comm()
    # DeepSpeed's training_data loader starts DataLoader workers; this rank was spawned, so they would be
    # spawned too (a fresh interpreter each, and the docs example's dataset class is not importable by name).
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)
    scenarios = {
        "linear_stack": lambda: _compare("linear_stack", 2, 2, 2, client_optimizer=False,
                                         conf_extra={"optimizer": {"type": "AdamW",
                                                                   "params": {"lr": 1e-2, "torch_adam": True}}}),
        "conv_net": lambda: _compare("conv_net", 4, 1, 2),
        "tuple_model": lambda: _compare("tuple_model", 4, 1, 2),
        "regression": lambda: _compare("regression", 2, 2, 2, training_data=True, conf_extra={"steps_per_print": 1}),
        "inplace_first": lambda: _compare("inplace_first", 4, 1, 2),
        "ckpt": lambda: _compare("ckpt", 4, 1, 2),
        "tp2_pp2": lambda: _compare("tp_mlp", 2, 1, 4),
        "zero1": lambda: _compare("linear_stack", 2, 2, 2, conf_extra={"zero_optimization": {"stage": 1}},
                                  routing={"gradient_rule": "all"}),
        "refusals": _refusals,
        "zero1_visited": lambda: {"refused": _visited_refused({"zero_optimization": {"stage": 1}})},
        "bf16": _bf16,
        "skip": _skip_trains,
        "unequal": _unequal_refused,
        "example": _example,
    }
    out: dict = {}
    for name, fn in scenarios.items():
        if names is not None and name not in names:
            continue
        try:
            out[name] = fn()
        except Exception:  # noqa: BLE001 - reported by the scenario's own test
            out[name] = {"error": traceback.format_exc(limit=10)}
            print(f"rank {rank}: scenario {name} raised:\n{out[name]['error']}", file=sys.stderr, flush=True)
        dist.barrier()
    return out
