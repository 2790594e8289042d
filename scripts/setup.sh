#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install imm with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to the CPU build that lies on disk in CI: an unpinned `torch` would pull
# a multi-GB CUDA build. Any torch>=2.6 works; skip this when one is already installed.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
