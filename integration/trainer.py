"""The main job's one training loop: checked config -> plan -> backend -> loop -> logging ->
validation -> summary.

:class:`Trainer` runs the plain job; :class:`integration.recovery.trainer.FaultTolerantTrainer`
overrides only what recovery changes (process group and backend from the fault-tolerant session,
a step that may be replayed, validation that may be interrupted by a recovery, the summary's
recovery fields and the way the process ends). The config was checked by
:func:`integration.config.preflight` before this is constructed; nothing here re-validates it.

Outputs per rank (``${output_root}/rank<R>``): ``plan.json`` (rank 0), ``summary.json``,
``history.json``, ``train.log`` (Hydra's), TensorBoard logs (rank 0: ``train/*``, ``routing/*``,
``val/loss_full_model``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .backend import StepResult, TrainingBackend
from .config import Preflight, as_config_error, build_plan, compile_job_plan, model_config
from .schema import ConfigError

log = logging.getLogger("skipfree.train")


def setup_environment() -> str:
    """CPU: gloo, DeepSpeed's CPU accelerator and one thread per rank (several ranks share the cores).

    Must run before deepspeed is imported. Returns the torch.distributed backend name.
    """
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return "nccl"
    os.environ["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed's CPU op, built by launch/setup.sh into a cache private to this venv: another venv
    # rebuilding the shared ~/.cache/torch_extensions cannot break this start.
    private = Path(sys.prefix) / "torch_extensions"
    if (private / ".skipfree-built").is_file():
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(private))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return "gloo"


def build_backend(cfg: Any, program: Any, model_cfg: Any, rank: int, world_size: int) -> TrainingBackend:
    """The configured backend (``backend.name``) running ``program`` (the preflight's compiled plan);
    megatron's modules are imported only for megatron."""
    if cfg.backend.name == "megatron":
        from .backends.megatron.backend import build_megatron_backend
        return build_megatron_backend(cfg, program, model_cfg, rank, world_size)
    from .backends.deepspeed.backend import build_deepspeed_backend
    return build_deepspeed_backend(cfg, program, model_cfg, rank, world_size)


def plan_digest(plan: Any) -> str:
    """What every rank compares to be sure they built the same plan."""
    import hashlib

    return hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()


class Trainer:
    """One run of the main job on one rank (see the module docstring for the order of things)."""

    def __init__(self, cfg: Any, checked: Preflight, out_dir: Path):
        self.cfg, self.checked, self.out_dir = cfg, checked, Path(out_dir)
        self.job = checked.job
        self.plan = checked.plan
        self.rank, self.world_size = checked.rank, checked.world_size
        self.steps = self.job.train.steps
        self.writer = None
        self.backend: TrainingBackend | None = None
        self.start_step = 0  # train.resume: the steps the checkpoint already applied
        self.resume_ckpts = None
        self.history: dict[int, dict] = {}  # by step: a rollback's replayed steps overwrite their first run
        if self.job.train.save_every:
            from .resume import ResumeCheckpoints, checkpoints_root
            self.resume_ckpts = ResumeCheckpoints(checkpoints_root(self.job.output_root), self.job.train.save_every,
                                                  self.job.backend.name, self.rank)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Train as configured; returns the summary written to ``summary.json``."""
        if self.rank == 0:
            self.plan.save(self.out_dir / "plan.json")
        if self.job.dry_run:
            return self.dry_run()
        self.dist_backend = setup_environment()
        self.build_data()
        self.setup()
        summary = self.conclude(self.train())
        self.finish()
        return summary

    def conclude(self, history: list[dict]) -> dict:
        """The final validation, then ``summary.json`` and ``history.json`` (the summary is returned)."""
        val = self.final_validation()
        summary = self.summary(history, val)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (self.out_dir / "history.json").write_text(json.dumps(history, default=str))
        if self.rank == 0:
            print(self.done_line(summary), flush=True)
        return summary

    def dry_run(self) -> dict:
        """Print the checked plan and the compiled per-rank programs (the same Program every rank runs)."""
        from .runtime.program import rank_summary

        plan = self.plan
        print(f"plan: {plan.num_microbatches} microbatches, L={plan.path_length}, "
              f"skip ratio {plan.achieved_skip_ratio():.2f}, stage visits {plan.stage_visits()}")
        print(rank_summary(self.checked.program))
        return {"dry_run": True}

    # ------------------------------------------------------------------ construction
    def build_data(self) -> None:
        from .data.dataset import build_dataset

        try:
            self.dataset, vocab = build_dataset(self.cfg.data)
        except (ValueError, FileNotFoundError) as exc:
            raise as_config_error(exc, "data") from exc
        self.model_cfg = model_config(self.cfg, vocab).validate()
        tr = self.job.train
        self.mbs, self.seq = tr.micro_batch_size, int(self.model_cfg.seq_len)
        self.homes = len(self.plan.stage_nodes[0])
        self.tokens_per_step = self.plan.num_microbatches * self.mbs * self.seq

    def train_batch(self, step: int, replica: int, index: int):
        return self.dataset.microbatch(step, replica, index, self.homes, self.job.train.microbatches, self.mbs,
                                       self.seq)

    def val_batch(self, step: int, replica: int, index: int):
        return self.dataset.microbatch(0, replica, index, self.homes, self.job.train.val_microbatches, self.mbs,
                                       self.seq, split="validation")

    def setup(self) -> None:
        """Process group, plan agreement, backend, TensorBoard."""
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(self.dist_backend)
        if self.job.network.emulate:  # emulated slow links (off by default: nothing in the transfer path)
            from .runtime.netem import install_from_cluster
            install_from_cluster(self.rank, self.job.network.emulate, self.world_size, bandwidth=True)
        self.check_same_plan()
        self.backend = build_backend(self.cfg, self.checked.program, self.model_cfg, self.rank, self.world_size)
        self.writer = self.tensorboard()
        self.restore()

    def check_same_plan(self) -> None:
        """Every rank builds the plan itself (deterministically); make sure they really agree."""
        import torch
        import torch.distributed as dist

        mine = torch.tensor([int(plan_digest(self.plan)[:15], 16)], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        if len({int(t) for t in every}) != 1:
            raise RuntimeError(f"rank {self.rank}: the ranks built different routing plans (config or planner "
                               f"differs between ranks); give every rank the same config, or use routing=file")

    def tensorboard(self):
        if not self.job.tensorboard or self.rank != 0:
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    # ------------------------------------------------------------------ the loop
    def current_step(self, done: int) -> int:
        """The step to run next (``done`` steps applied so far; recovery may rewind)."""
        return done

    def maybe_resample(self, step: int) -> None:
        every = self.job.routing.resample_every
        if every and step > 0 and step % every == 0:
            self.plan = build_plan(self.job, self.checked.stage_nodes, step)
            self.backend.set_plan(compile_job_plan(self.job, self.plan))  # compiled once, here

    def train_step(self, step: int) -> StepResult | None:
        """One iteration; ``None`` means it must be replayed (a recovery happened)."""
        return self.backend.train_step(step, self.train_batch)

    def train(self) -> list[dict]:
        from tqdm import tqdm

        history = self.history
        bar = tqdm(total=self.steps, initial=self.start_step, disable=not (self.rank == 0 and self.job.progress),
                   dynamic_ncols=True, file=sys.stdout)
        done = self.start_step
        while (step := self.current_step(done)) < self.steps:
            self.maybe_resample(step)
            t0 = time.perf_counter()
            result = self.train_step(step)
            dt = time.perf_counter() - t0
            if result is None:
                continue
            done = step + 1
            rec = self.record(step, result, dt)
            history[step] = rec
            bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            skip=f"{rec['skip_ratio']:.2f}", visits="/".join(map(str, rec["stage_visits"])))
            bar.n = done
            bar.refresh()
            self.log_step(rec)
            if self.resume_ckpts is not None and self.resume_ckpts.due(done):
                self.save_resume_checkpoint(done)
            every = self.job.train.eval_every
            if every and (step + 1) % every == 0 and step + 1 < self.steps:
                val = self.validation()
                if val is not None:
                    self.log_validation(val, step)
        bar.close()
        return [history[s] for s in sorted(history)]

    def record(self, step: int, result: StepResult, dt: float) -> dict:
        plan = self.plan
        return {"step": step, "loss": result.loss, "lr": result.lr, "step_time_s": dt,
                "tokens_per_s": self.tokens_per_step / dt, "skip_ratio": plan.achieved_skip_ratio(),
                "path_skip_ratio_k": plan.skip_ratio, "stage_visits": plan.stage_visits()}

    def log_step(self, rec: dict) -> None:
        log.info("step %d loss %.4f lr %.2e %.0f tok/s skip %.2f visits %s", rec["step"], rec["loss"], rec["lr"],
                 rec["tokens_per_s"], rec["skip_ratio"], rec["stage_visits"])
        w, step = self.writer, rec["step"]
        if w is not None:
            w.add_scalar("train/loss", rec["loss"], step)
            w.add_scalar("train/lr", rec["lr"], step)
            w.add_scalar("train/tokens_per_s", rec["tokens_per_s"], step)
            w.add_scalar("routing/skip_ratio", rec["skip_ratio"], step)
            for s, v in enumerate(rec["stage_visits"]):
                w.add_scalar(f"routing/visits_stage{s}", v, step)

    # ------------------------------------------------------------------ resume (integration/resume.py)
    def data_position(self, step: int) -> dict:
        """The data loader's position before ``step`` (it is addressed by step)."""
        from .resume import data_position
        return data_position(self.dataset, step, self.homes, self.job.train.microbatches, self.mbs, self.seq)

    def save_resume_checkpoint(self, step: int) -> None:
        """``train.save_every``: every rank saves its stage after ``step`` applied steps (collective)."""
        from .config import job_shape

        meta = {"job": job_shape(self.job, self.world_size), "data": self.data_position(step),
                "train_steps": self.steps}
        self.resume_ckpts.save(step, lambda root, tag: self.write_checkpoint(root, tag, step), meta)

    def write_checkpoint(self, root: str, tag: str, step: int) -> None:
        """This rank's part of a checkpoint in the framework's format; returns once every rank's is written."""
        if self.job.backend.name == "megatron":
            import torch.distributed as dist
            self.backend.save_checkpoint(root, tag, iteration=step)
            dist.barrier()
        else:
            self.backend.engine.save_checkpoint(root, tag=tag, save_latest=False)  # ends with a barrier

    def load_checkpoint(self, path: Path) -> int:
        """Load the checkpoint directory ``path`` into this rank; returns the steps it had applied."""
        if self.job.backend.name == "megatron":
            state = self.backend.load_checkpoint(str(path.parent), path.name)
            if state is None:
                raise FileNotFoundError(f"rank {self.rank}: {self.backend.checkpoint_file(str(path.parent), path.name)}"
                                        f" is missing")
            return int(state["iteration"])
        loaded, _ = self.backend.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"rank {self.rank}: DeepSpeed found no checkpoint {path.name} under {path.parent}")
        return int(self.backend.engine.global_steps)

    def restore(self) -> None:
        """``train.resume``: load the checkpoint the preflight chose and continue the data where it stopped."""
        from .resume import checkpoints_root, data_mismatch, scan

        found = self.checked.resume_from
        if found is None:
            if self.job.train.resume == "auto":
                root = checkpoints_root(self.job.output_root)
                ignored = scan(root)[1]
                log.info("resume: no complete checkpoint under %s%s, starting at step 0", root,
                         f" (ignored, half-written: {', '.join(p.name for p in ignored)})" if ignored else "")
            return
        path, meta, ignored = found
        if ignored:
            log.warning("resume: ignored half-written checkpoints (no completion marker, a save was cut short): %s",
                        ", ".join(p.name for p in ignored))
        wrong = data_mismatch(meta["data"], self.data_position(int(meta["step"])))
        if wrong:
            raise ConfigError("train.resume", f"{path}: the data would not continue where it stopped ("
                              f"{'; '.join(wrong)})", "resume with the data, train.micro_batch_size, "
                              "train.microbatches and model.seq_len the checkpoint was written with")
        step = self.load_checkpoint(path)
        if step != int(meta["step"]):
            raise RuntimeError(f"rank {self.rank}: {path} holds {step} applied steps, its marker says {meta['step']}")
        if meta.get("train_steps") != self.steps:
            log.warning("resume: train.steps is %d, the checkpoint's job had %s: the LR schedule differs from an "
                        "uninterrupted run", self.steps, meta.get("train_steps"))
        self.start_step = step
        every = self.job.routing.resample_every
        if every and step % every:  # the plan in force at `step` (maybe_resample redraws only at multiples)
            self.plan = build_plan(self.job, self.checked.stage_nodes, step - step % every)
            self.backend.set_plan(compile_job_plan(self.job, self.plan))
        d = meta["data"]
        log.info("resume: %s, %d steps applied; data continues at step %d (sample %d, epoch %d)", path, step,
                 d["next_step"], d["next_sample"], d["epoch"])

    # ------------------------------------------------------------------ validation and summary
    def validation(self) -> float | None:
        """Loss of the full model on the validation split (``None``: interrupted, see the subclass)."""
        return float(self.backend.validation_loss(self.val_batch, self.job.train.val_microbatches))

    def final_validation(self) -> float:
        val = None
        while val is None:
            val = self.validation()
        self.log_validation(val, self.steps - 1)
        return val

    def log_validation(self, val: float, step: int) -> None:
        log.info("validation loss (full model, all stages in order) %.4f at step %d", val, step)
        if self.writer is not None:
            self.writer.add_scalar("val/loss_full_model", val, step)

    def summary(self, history: list[dict], val: float) -> dict:
        losses = [h["loss"] for h in history]
        first = sum(losses[:3]) / max(1, min(3, len(losses)))
        last = sum(losses[-3:]) / max(1, min(3, len(losses)))
        speeds = sorted(h["tokens_per_s"] for h in history)
        return {"backend": self.job.backend.name, "routing": self.job.routing.kind, "layout": self.job.model.layout,
                "steps": self.steps, "world_size": self.world_size, "rank": self.rank, "loss_first3": first,
                "loss_last3": last, "val_loss_full_model": val, "loss_history": losses,
                "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
                "skip_ratio": self.plan.achieved_skip_ratio(), "path_skip_ratio_k": self.plan.skip_ratio,
                "stage_visits": self.plan.stage_visits(), "start_step": self.start_step,
                "state_digest": self.state_digest()}

    def state_digest(self) -> str:
        """sha256 of this rank's final weights + optimizer state (resume = uninterrupted run, bitwise)."""
        from .recovery.state import state_digest

        b = self.backend
        if self.job.backend.name == "megatron":
            return state_digest(b.model.module, b.torch_optimizer)
        return state_digest(b.module, b.optimizer)

    def done_line(self, summary: dict) -> str:
        return (f"done: loss {summary['loss_first3']:.4f} -> {summary['loss_last3']:.4f} (mean of first/last 3 "
                f"steps), validation loss of the full model {summary['val_loss_full_model']:.4f}; outputs in "
                f"{self.out_dir}")

    def finish(self) -> None:
        import torch.distributed as dist

        if self.writer is not None:
            self.writer.close()
        dist.barrier()
        dist.destroy_process_group()
