"""The per-rank audit trail of a fault-tolerant run (``recovery.audit=true``, on in ``preset=recovery_test``).

Files under the rank's output directory, read by the recovery tests to check bitwise claims:

- ``audit.jsonl``: one row per applied step: pid, time, generation, step, loss, lr (after the step)
  and ``digest`` (sha256 of the stage's weights + optimizer state, :func:`state_digest`);
- ``recovery_g<G>.pt``: the stage right after recovery generation ``G`` (weights, digest, the gradient
  norm of the last committed step, the states received for the rebuild, the actions, whether the
  optimizer state is fresh, the lr scale);
- ``final.pt``: final weights, Adam's per-parameter step counts, the steps this process applied, the
  recoveries and (``recovery.home_replica=true``) the digests, step tags and traffic of the home mirrors
  this rank holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from .state import digest_of, stage_state, state_digest


class AuditTrail:
    """Writes the audit files of one rank's process (see the module docstring)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._rows = (self.out_dir / "audit.jsonl").open("a")

    def on_recovered(self, info: dict) -> None:
        """The session's ``on_recovered`` hook: dump the stage as the recovery left it."""
        s = info["session"]
        torch.save({"generation": s.guard.generation, "stage": s.stage, "replica": s.replica,
                    "model": stage_state(s.module), "digest": state_digest(s.module, s.optimizer),
                    "grad_norm": s.guard.last_grad_norm, "received": info["received"],
                    "actions": [a.describe() for a in info["actions"]],
                    "optimizer_state_empty": not s.optimizer.state,
                    "lr_scale": s.optimizer.param_groups[0].get("lr_scale", 1.0)},
                   self.out_dir / f"recovery_g{s.guard.generation}.pt")

    def step(self, session, step: int, loss: float) -> None:
        """One applied step."""
        self._rows.write(json.dumps({"pid": os.getpid(), "time": time.time(), "generation": session.guard.generation,
                                     "step": step, "loss": loss, "lr": session.optimizer.param_groups[0]["lr"],
                                     "digest": state_digest(session.module, session.optimizer)}) + "\n")
        self._rows.flush()

    def final(self, session) -> None:
        """The end of the run on this process (before the final barrier: a peer may still recover)."""
        opt_steps = sorted({int(st["step"]) for st in session.optimizer.state.values()})
        home = None
        if session.home is not None:
            mirrors = session.home
            home = {"tags": mirrors.tags(), "stats": dataclasses.asdict(mirrors.stats),
                    "digests": {r: digest_of(p["model"], p["optimizer"])
                                for r, p in ((r, mirrors.payload(r)) for r in mirrors.mirrors)}}
        torch.save({"model": stage_state(session.module), "opt_steps": opt_steps,
                    "applied": session.guard.applied_steps, "recoveries": session.recoveries, "home_mirror": home},
                   self.out_dir / "final.pt")
        self._rows.flush()  # not closed: a recovery at the final barrier runs final() again
