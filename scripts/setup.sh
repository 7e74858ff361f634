#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the CPU build of torch 2.13.0 installed FIRST
# (a bare `torch` would pull GBs of CUDA packages), then poisonguard and its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.poisonguard-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: upgrading pip"
  .venv/bin/python -m pip install --quiet --upgrade pip
  echo "setup: installing torch 2.13.0 (CPU build; a minute or more on a fresh machine)"
  # A wheel already on this machine (pip's find-links) first; otherwise the CPU wheel index, so a
  # stock machine never resolves the CUDA build.
  if ! .venv/bin/python -m pip install --quiet --no-index --no-deps "torch==2.13.0" 2>/dev/null \
      || ! .venv/bin/python -m pip install --quiet "torch==2.13.0"; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0" \
      --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
  echo "setup: installing poisonguard and its dependencies (pip install -e .[dev])"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
  echo "setup: done (.venv)"
fi
