"""Checkpoint fallback in the host framework's format: periodic ``engine.save_checkpoint``, rollback by
``engine.load_checkpoint`` (DeepSpeed's own; on megatron-core the step driver's Megatron-LM layout,
:class:`integration.recovery.megatron_engine.MegatronSteps`).

Used only where the recovery ladder cannot rebuild a stage (adjacent losses, an edge without
CheckFree+ swaps, the home stage without a surviving mirror): every rank of the new generation
restores the last *complete* checkpoint (module, optimizer, LR scheduler, step counters) and
training resumes from its step.
A checkpoint counts as complete when every rank recorded it in the job's store after its save
returned, so a save cut short by a failure is never restored. Tags carry the generation, so a
step saved again after a rollback never overwrites the files of the checkpoint being restored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from .detect import PeerFailure

_DONE = "ckpt/done"       # per tag: ranks that finished saving it
_INDEX = "ckpt/index/"    # ckpt/index/<n> = json {"tag", "step"}; appended by rank 0
_COUNT = "ckpt/count"


@dataclass
class Checkpointer:
    """Saves every ``every`` steps into ``directory``; finds and restores the latest complete checkpoint."""

    directory: Path
    every: int
    store: dist.Store
    world_size: int
    rank: int

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done > 0 and steps_done % self.every == 0

    def save(self, engine, generation: int) -> str:
        """Every rank saves its stage under one tag (DeepSpeed: its layer and ``mp_rank`` files, collective)."""
        step = int(engine.global_steps)
        tag = f"step{step}-g{generation}"
        try:
            engine.save_checkpoint(str(self.directory), tag=tag)
        except RuntimeError as exc:  # DeepSpeed's barriers are plain collectives: a dead peer shows up here
            raise PeerFailure(f"rank {self.rank}: checkpoint save {tag} failed: {str(exc).splitlines()[0][:200]}")
        if int(self.store.add(f"{_DONE}/{tag}", 1)) == self.world_size:
            n = int(self.store.add(_COUNT, 1))
            self.store.set(f"{_INDEX}{n}", json.dumps({"tag": tag, "step": step}))
        return tag

    def latest(self) -> tuple[str, int] | None:
        """(tag, step) of the newest checkpoint every rank finished, or None."""
        best = None
        for n in range(1, int(self.store.add(_COUNT, 0)) + 1):
            if self.store.check([f"{_INDEX}{n}"]):
                rec = json.loads(self.store.get(f"{_INDEX}{n}"))
                if best is None or rec["step"] >= best[1]:
                    best = (rec["tag"], int(rec["step"]))
        return best

    def restore(self, engine, tag: str) -> int:
        """Collective: load ``tag`` into this rank's engine (weights, optimizer, scheduler, counters)."""
        path, _ = engine.load_checkpoint(str(self.directory), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"rank {self.rank}: DeepSpeed found no checkpoint {tag} under {self.directory}")
        return int(engine.global_steps)
