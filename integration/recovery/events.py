"""Recovery events: one JSON line per event in ``events.jsonl``, the log, and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("skipfree.recovery")


class EventLog:
    """Append-only event sink. ``writer`` is an optional TensorBoard ``SummaryWriter``."""

    def __init__(self, path: str | Path | None, rank: int, writer: Any = None):
        self.path = Path(path) if path else None
        self.rank = rank
        self.writer = writer
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, step: int | None = None, **fields: Any) -> dict:
        rec = {"event": event, "rank": self.rank, "step": step, "time": time.time(), **fields}
        line = json.dumps(rec, default=str)
        log.warning("recovery event: %s", line)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self.writer is not None and step is not None:
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                    self.writer.add_scalar(f"recovery/{k}", v, step)
            self.writer.flush()
        return rec
