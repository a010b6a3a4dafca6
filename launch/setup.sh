#!/usr/bin/env bash
# Create .venv and install the project with the versions it is tested with. Idempotent and quick
# when everything is already installed. The CPU build of torch is installed FIRST: a bare torch
# requirement with nothing installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.skipfree-installed
want="$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
# DeepSpeed's CPU op (the shared-memory comm op it JIT-builds at init) goes into a cache private to
# this venv, built now: another venv rebuilding ~/.cache/torch_extensions cannot break a start.
# launch.agent and launch/slurm/*.sbatch use it when the stamp is there; for a plain `deepspeed`
# run: export TORCH_EXTENSIONS_DIR=$PWD/.venv/torch_extensions
ext="$(cd .venv && pwd -P)/torch_extensions"
if [ ! -f "$ext/.skipfree-built" ]; then
  mkdir -p "$ext"
  TORCH_EXTENSIONS_DIR="$ext" DS_ACCELERATOR=cpu .venv/bin/python -c \
    "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" \
    >/dev/null
  touch "$ext/.skipfree-built"
fi
