"""Load DeepSpeed's CPU shared-memory comm op from launch/setup.sh's build, without torch's JIT loader.

``deepspeed.init_distributed`` on the CPU accelerator loads ``deepspeed_shm_comm`` through
``torch.utils.cpp_extension.load``, which takes ``<op>/lock`` (a create-exclusive file) and runs a
ninja up-to-date check on every start. A rank SIGKILLed while holding that file hangs every later
start; removing a lock that looks old breaks a live loader instead (its release then fails), which
under load on a shared host is not rare. The op is built once by launch/setup.sh (the
``.skipfree-built`` stamp), so we import the built library directly and put it in DeepSpeed's op
cache: no lock, no ninja, nothing to go stale.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger("skipfree.deepspeed")

OP_NAME = "deepspeed_shm_comm"
STAMP = ".skipfree-built"


def extensions_dir() -> Path:
    """Where the op was built: ``TORCH_EXTENSIONS_DIR`` if set, else the venv's private cache."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def load_prebuilt_shm_op(ext_dir: Path | None = None) -> ModuleType | None:
    """Import the prebuilt op into DeepSpeed's op cache (idempotent). Returns it, or ``None`` when there is
    no stamped build (DeepSpeed then JIT-builds as stock) or the library does not import (logged)."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    if OP_NAME in OpBuilder._loaded_ops:
        return OpBuilder._loaded_ops[OP_NAME]
    ext_dir = extensions_dir() if ext_dir is None else ext_dir
    library = ext_dir / OP_NAME / f"{OP_NAME}.so"
    if not (ext_dir / STAMP).is_file() or not library.is_file():
        return None
    try:
        loader = importlib.machinery.ExtensionFileLoader(OP_NAME, str(library))
        spec = importlib.util.spec_from_file_location(OP_NAME, str(library), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except ImportError as exc:  # built for another torch: let DeepSpeed rebuild it as stock
        log.warning("the prebuilt %s does not import (%s); DeepSpeed will JIT-build it. Rerun "
                    "launch/setup.sh after changing torch.", library, exc)
        return None
    OpBuilder._loaded_ops[OP_NAME] = module
    return module
