"""Resume a stopped job: ``train.save_every=K`` writes a checkpoint every K applied steps in the host
framework's format, ``train.resume=auto|PATH`` continues from one with the losses of an uninterrupted run.

Layout under ``${output_root}/checkpoints`` (the writers of the checkpoint fallback,
``integration/recovery/checkpoint.py``): on DeepSpeed its own ``engine.save_checkpoint`` tree
``global_step<N>/`` (layer files + ``mp_rank_XX_model_states.pt``: weights, optimizer, LR scheduler,
counters) and the ``latest`` file; on megatron-core Megatron-LM's per-rank layout
``iter_<N:07d>/mp_rank_TT_PPP/model_optim_rng.pt`` and ``latest_checkpointed_iteration.txt``
(``MegatronBackend.save_checkpoint``).

A save is atomic: every rank writes into ``<tag>.tmp``; once every rank's save returned, rank 0 writes
:data:`MARKER` (step, the data loader's position, the job's shape) into it and renames it to ``<tag>``.
Only a directory with the final name *and* the marker is a checkpoint: one cut short by a failure
stays ``<tag>.tmp`` and is ignored (and named in the log) by ``auto``.

The data loader is addressed by step (``TokenDataset.microbatch(step, ...)``), so its position is the
next step's first sample; the marker records it with the sample stream's geometry and a digest of
the tokens, and a resume refuses data that would not continue the same stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("skipfree.train")

MARKER = "skipfree_resume.json"
_FINAL = re.compile(r"^(global_step|iter_)(\d+)$")
_POINTER = {"deepspeed": "latest", "megatron": "latest_checkpointed_iteration.txt"}


def checkpoints_root(output_root: str | Path) -> Path:
    """Where ``train.save_every`` writes and ``train.resume=auto`` looks."""
    return Path(output_root).expanduser().resolve() / "checkpoints"


def tag_for(backend: str, step: int) -> str:
    """The framework's own directory name for ``step`` applied steps."""
    return f"iter_{step:07d}" if backend == "megatron" else f"global_step{step}"


def read_marker(path: Path) -> dict | None:
    """The marker of a complete checkpoint directory (None: not one)."""
    if not _FINAL.match(path.name) or not (path / MARKER).is_file():
        return None
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def scan(root: Path) -> tuple[list[tuple[Path, dict]], list[Path]]:
    """(complete checkpoints under ``root`` by step, directories ignored: half-written or unmarked)."""
    complete, ignored = [], []
    if not root.is_dir():
        return complete, ignored
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = read_marker(d)
        if meta is not None:
            complete.append((d, meta))
        elif d.name.endswith(".tmp") or _FINAL.match(d.name):
            ignored.append(d)
    complete.sort(key=lambda c: int(c[1]["step"]))
    return complete, ignored


def find_checkpoint(spec: str | Path) -> tuple[Path, dict, list[Path]]:
    """``train.resume=PATH``: a checkpoint directory, or the directory holding them (its newest).
    Returns (directory, marker, ignored directories); raises FileNotFoundError saying what is wrong."""
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    meta = read_marker(path)
    if meta is not None:
        return path, meta, []
    complete, ignored = scan(path)
    if not complete:
        why = (f" (ignored, no completion marker {MARKER}: {', '.join(p.name for p in ignored)})" if ignored else "")
        raise FileNotFoundError(f"{path} is not a complete checkpoint and holds none{why}")
    return (*complete[-1], ignored)


def find_latest(root: Path) -> tuple[Path, dict, list[Path]] | None:
    """``train.resume=auto``: the newest complete checkpoint under ``root`` (None: there is none)."""
    complete, ignored = scan(root)
    return (*complete[-1], ignored) if complete else None


def _tokens_digest(dataset: Any) -> str:
    digest = getattr(dataset, "_skipfree_sha256", None)
    if digest is None:
        digest = hashlib.sha256(memoryview(dataset.tokens).cast("B")).hexdigest()
        dataset._skipfree_sha256 = digest
    return digest


def data_position(dataset: Any, step: int, homes: int, microbatches: int, micro_batch_size: int,
                  seq_len: int) -> dict:
    """The data loader's position before ``step`` and what makes the sample stream the same one."""
    windows = dataset.num_windows(seq_len)
    sample = dataset.sample_offset(step, 0, 0, homes, microbatches, micro_batch_size)
    return {"next_step": step, "next_sample": sample, "epoch": sample // max(1, windows), "num_windows": windows,
            "homes": homes, "microbatches": microbatches, "micro_batch_size": micro_batch_size,
            "seq_len": seq_len, "seed": dataset.seed, "tokens": len(dataset.tokens),
            "tokens_sha256": _tokens_digest(dataset)}


_MOVING = ("next_step", "next_sample", "epoch")


def data_mismatch(saved: dict, current: dict) -> list[str]:
    """The fields of the sample stream that differ (empty: the data continues where it stopped)."""
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in current
            if k not in _MOVING and saved.get(k) != current[k]]


class ResumeCheckpoints:
    """Writes the resume checkpoints of one rank (see the module docstring)."""

    def __init__(self, root: Path, every: int, backend: str, rank: int):
        self.root, self.every, self.backend, self.rank = Path(root), int(every), backend, rank

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done > 0 and steps_done % self.every == 0

    def save(self, step: int, write: Callable[[str, str], None], meta: dict) -> Path:
        """``write(root, tmp_tag)`` saves this rank's part and returns once every rank's part is on
        disk (collective); then rank 0 marks the checkpoint complete and gives it its final name."""
        tag = tag_for(self.backend, step)
        self.root.mkdir(parents=True, exist_ok=True)
        write(str(self.root), f"{tag}.tmp")
        final = self.root / tag
        if self.rank == 0:
            tmp = self.root / f"{tag}.tmp"
            (tmp / MARKER).write_text(json.dumps({**meta, "step": step, "tag": tag, "backend": self.backend},
                                                 indent=1))
            old = None
            if final.exists():  # a resume from an earlier step re-saves this one
                old = final.with_name(f"{tag}.old-{os.getpid()}")
                final.replace(old)
            tmp.replace(final)
            # Atomic, like the rename: a kill here leaves the old pointer, never an empty file that
            # the framework's own loader (DeepSpeed's `latest`, megatron's tracker) would choke on.
            pointer = self.root / _POINTER[self.backend]
            pointer_tmp = pointer.with_name(f"{pointer.name}.tmp-{os.getpid()}")
            pointer_tmp.write_text(tag if self.backend == "deepspeed" else str(step))
            pointer_tmp.replace(pointer)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint after step %d saved: %s", step - 1, final)
        return final
