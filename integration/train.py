"""The main job: routed pipeline training of the default model, configured with Hydra.

    deepspeed --no_local_rank --num_gpus 4 integration/train.py routing=skip routing.skip_ratio=0.33

Read top to bottom: environment -> config checks -> distributed init -> data -> plan -> backend ->
training loop (progress bar, TensorBoard) -> validation loss of the full model -> summary.json.
Every rank writes to its own directory ``${output_root}/rank{RANK}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from integration.config import (BAD_INPUT, Preflight, compose_and_check, preflight,
                                quote_failure_schedule)

log = logging.getLogger("skipfree.train")
#: The preflight run before Hydra started (same overrides), reused instead of planning twice.
_CHECKED: dict[str, Preflight] = {}


def setup_environment() -> str:
    """CPU: gloo, DeepSpeed's CPU accelerator and one thread per rank (several ranks share the cores).

    Must run before deepspeed is imported. Returns the torch.distributed backend name.
    """
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return "nccl"
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return "gloo"


def build_backend(cfg: DictConfig, plan, model_cfg, rank: int, world_size: int):
    if cfg.backend.name == "megatron":
        from integration.backends.megatron.backend import build_megatron_backend
        return build_megatron_backend(cfg, plan, model_cfg, rank, world_size)
    from integration.backends.deepspeed.backend import build_deepspeed_backend
    return build_deepspeed_backend(cfg, plan, model_cfg, rank, world_size)


def run(cfg: DictConfig) -> dict:
    """Train as configured; returns the summary written to ``summary.json``."""
    from omegaconf import OmegaConf

    from integration.config import as_config_error, build_plan, model_config

    checked = _CHECKED.get(OmegaConf.to_yaml(cfg)) or preflight(cfg)  # before anything is written
    job, plan, world_size, rank = checked.job, checked.plan, checked.world_size, checked.rank
    out_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    _console_on_rank0(rank)
    mb_per_home = job.train.microbatches

    def make_plan(step: int):
        return build_plan(job, checked.stage_nodes, step)

    if rank == 0:
        plan.save(out_dir / "plan.json")
    if job.dry_run:  # the checked plan and the compiled programs every rank would run; no data, no groups
        from integration.runtime.program import rank_summary
        print(f"plan: {plan.num_microbatches} microbatches, L={plan.path_length}, "
              f"skip ratio {plan.achieved_skip_ratio():.2f}, stage visits {plan.stage_visits()}")
        print(rank_summary(checked.program))
        return {"dry_run": True}

    backend_name = setup_environment()
    import torch.distributed as dist

    from integration.data.dataset import build_dataset

    try:
        dataset, vocab = build_dataset(cfg.data)
    except (ValueError, FileNotFoundError) as exc:
        raise as_config_error(exc, "data") from exc
    model_cfg = model_config(cfg, vocab).validate()

    # --- recovery branch: recovery=checkfree|checkfree_plus|degraded under launch.agent ---
    from integration.recovery.mainjob import recovery_enabled
    if recovery_enabled(cfg):
        from integration.recovery.mainjob import run_fault_tolerant
        return run_fault_tolerant(cfg, plan, dataset, model_cfg, out_dir)
    # --- end of recovery branch ---

    if not dist.is_initialized():
        dist.init_process_group(backend_name)
    _check_same_plan(plan, rank)
    backend = build_backend(cfg, plan, model_cfg, rank, world_size)

    mbs, seq = int(cfg.train.micro_batch_size), int(model_cfg.seq_len)
    homes = len(plan.stage_nodes[0])

    def train_batch(step: int, replica: int, index: int):
        return dataset.microbatch(step, replica, index, homes, mb_per_home, mbs, seq)

    val_mb = int(cfg.train.val_microbatches)

    def val_batch(step: int, replica: int, index: int):
        return dataset.microbatch(0, replica, index, homes, val_mb, mbs, seq, split="validation")

    writer = _tensorboard(cfg, out_dir, rank)
    show = rank == 0 and cfg.progress
    steps = int(cfg.train.steps)
    history: list[dict] = []
    tokens_per_step = plan.num_microbatches * mbs * seq
    from tqdm import tqdm

    bar = tqdm(total=steps, disable=not show, dynamic_ncols=True, file=sys.stdout)
    resample = int(cfg.routing.get("resample_every", 0) or 0)
    for step in range(steps):
        if resample and step > 0 and step % resample == 0:
            plan = make_plan(step)
            backend.set_plan(plan)
        t0 = time.perf_counter()
        result = backend.train_step(step, train_batch)
        dt = time.perf_counter() - t0
        visits = plan.stage_visits()
        rec = {"step": step, "loss": result.loss, "lr": result.lr, "step_time_s": dt,
               "tokens_per_s": tokens_per_step / dt, "skip_ratio": plan.achieved_skip_ratio(), "path_skip_ratio_k": plan.skip_ratio,
               "stage_visits": visits}
        history.append(rec)
        bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                        skip=f"{rec['skip_ratio']:.2f}", visits="/".join(map(str, visits)))
        bar.update(1)
        log.info("step %d loss %.4f lr %.2e %.0f tok/s skip %.2f visits %s", step, result.loss, result.lr,
                 rec["tokens_per_s"], rec["skip_ratio"], visits)
        if writer is not None:
            writer.add_scalar("train/loss", result.loss, step)
            writer.add_scalar("train/lr", result.lr, step)
            writer.add_scalar("train/tokens_per_s", rec["tokens_per_s"], step)
            writer.add_scalar("routing/skip_ratio", rec["skip_ratio"], step)
            for s, v in enumerate(visits):
                writer.add_scalar(f"routing/visits_stage{s}", v, step)
        every = int(cfg.train.eval_every)
        if every and (step + 1) % every == 0 and step + 1 < steps:
            _log_validation(backend, val_batch, val_mb, step, writer)
    bar.close()
    val = _log_validation(backend, val_batch, val_mb, steps - 1, writer)
    first = sum(h["loss"] for h in history[:3]) / min(3, len(history))
    last = sum(h["loss"] for h in history[-3:]) / min(3, len(history))
    summary = {"backend": cfg.backend.name, "routing": cfg.routing.kind, "layout": cfg.model.layout,
               "steps": steps, "world_size": world_size, "rank": rank, "loss_first3": first, "loss_last3": last,
               "val_loss_full_model": val, "loss_history": [h["loss"] for h in history], "median_tokens_per_s": sorted(h["tokens_per_s"] for h in history)[
                   len(history) // 2], "skip_ratio": plan.achieved_skip_ratio(), "path_skip_ratio_k": plan.skip_ratio,
               "stage_visits": plan.stage_visits()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "history.json").write_text(json.dumps(history))
    if rank == 0:
        print(f"done: loss {first:.4f} -> {last:.4f} (mean of first/last 3 steps), validation loss of the full "
              f"model {val:.4f}; outputs in {out_dir}", flush=True)
    if writer is not None:
        writer.close()
    dist.barrier()
    dist.destroy_process_group()
    return summary


def _check_same_plan(plan, rank: int) -> None:
    """Every rank builds the plan itself (deterministically); make sure they really agree."""
    import hashlib

    import torch
    import torch.distributed as dist

    digest = hashlib.sha256(plan.to_json(indent=None).encode()).digest()[:8]
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if len({int(t) for t in every}) != 1:
        raise RuntimeError(f"rank {rank}: the ranks built different routing plans (config or planner differs "
                           f"between ranks); give every rank the same config, or use routing=file")


def _log_validation(backend, val_batch, val_mb: int, step: int, writer) -> float:
    val = backend.validation_loss(val_batch, val_mb)
    log.info("validation loss (full model, all stages in order) %.4f at step %d", val, step)
    if writer is not None:
        writer.add_scalar("val/loss_full_model", val, step)
    return val


def _tensorboard(cfg: DictConfig, out_dir: Path, rank: int):
    if not cfg.tensorboard or rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _console_on_rank0(rank: int) -> None:
    """Rank 0 prints to the console; every rank keeps its own log file (Hydra's ``train.log``)."""
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            root.removeHandler(h)


def _refuse(exc: Exception) -> None:
    """Bad input: rank 0 prints one message, every rank exits 2 (no traceback)."""
    if os.environ.get("RANK", "0").strip() in ("0", "") or not os.environ.get("RANK", "0").strip().isdigit():
        print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path="../hydra_conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except BAD_INPUT as exc:
        log.error("%s", exc)  # to this rank's train.log; the console message comes from _refuse
        _refuse(exc)


def main() -> None:
    """Check config, environment, plan and data first (nothing written), then let Hydra run the job."""
    from omegaconf import OmegaConf

    # The deepspeed launcher appends --local_rank unless --no_local_rank is given; Hydra would reject it.
    overrides = quote_failure_schedule([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    sys.argv = sys.argv[:1] + overrides
    if not any(a.startswith("-") for a in overrides):  # Hydra's own flags (--cfg, -m, ...): Hydra handles them
        try:
            cfg, checked = compose_and_check(overrides)
        except BAD_INPUT as exc:
            _refuse(exc)
        _CHECKED[OmegaConf.to_yaml(cfg)] = checked
    hydra_main()


if __name__ == "__main__":
    main()
