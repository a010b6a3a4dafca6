"""The main job's entry point: routed pipeline training of the default model, configured with Hydra.

    deepspeed --no_local_rank --num_gpus 4 integration/train.py routing=skip routing.skip_ratio=0.33

The config is composed and checked first (:func:`integration.config.compose_and_check`: schema,
environment, plan, data; bad input -> one message from rank 0, exit 2, nothing written); then Hydra
runs :func:`run`, which hands the checked config to :class:`integration.trainer.Trainer` (or its
fault-tolerant subclass). Every rank writes to its own directory ``${output_root}/rank{RANK}``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if os.environ.get("SKIPFREE_WAN_HOSTS"):  # emulated wide-area tests: this rank runs on its own namespace host
    from integration.runtime.wanhosts import enter_from_env
    enter_from_env()

import hydra  # noqa: E402 (the namespace must be entered before anything opens a socket)
from omegaconf import DictConfig  # noqa: E402

from integration.config import (BAD_INPUT, Preflight, compose_and_check, preflight,
                                quote_failure_schedule)

log = logging.getLogger("skipfree.train")
#: The preflight run before Hydra started (same overrides), reused instead of planning twice.
_CHECKED: dict[str, Preflight] = {}


def run(cfg: DictConfig) -> dict:
    """Train as configured; returns the summary written to ``summary.json``."""
    from omegaconf import OmegaConf

    from integration.trainer import Trainer

    checked = _CHECKED.get(OmegaConf.to_yaml(cfg)) or preflight(cfg)  # before anything is written
    _console_on_rank0(checked.rank)
    out_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    trainer_class = Trainer
    if checked.job.recovery.enabled:  # recovery=checkfree|checkfree_plus|degraded, under launch.agent
        from integration.recovery.trainer import FaultTolerantTrainer as trainer_class
    return trainer_class(cfg, checked, out_dir).run()


def _console_on_rank0(rank: int) -> None:
    """Rank 0 prints to the console; every rank keeps its own log file (Hydra's ``train.log``)."""
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            root.removeHandler(h)


def _refuse(exc: Exception) -> None:
    """Bad input: rank 0 prints one message, every rank exits 2 (no traceback). Each rank's log file
    (when Hydra already opened one) gets the message too."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.emit(logging.LogRecord(log.name, logging.ERROR, __file__, 0, "%s", (exc,), None))
    rank = os.environ.get("RANK", "0").strip()
    if not rank.isdigit() or int(rank) == 0:  # an unreadable RANK is itself the error: every rank says so
        print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path="../hydra_conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except BAD_INPUT as exc:
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
