#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install imm with its test extras. Safe to run again.
#
# One line per step on stderr; pip's own output goes to a log (.venv/setup.log) and is shown
# only when a step fails, so a fresh clone's first run shows what happens, not pip's chatter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=$(mktemp "${TMPDIR:-/tmp}/imm-setup.XXXXXX")   # the step running now
ALL=$(mktemp "${TMPDIR:-/tmp}/imm-setup.XXXXXX")   # every step of this call
trap 'rm -f "$LOG" "$ALL"' EXIT

say() { printf 'setup: %s\n' "$*" >&2; }

step() {  # step "what is done" command...: run quietly; on failure print the log and stop
    local what=$1
    shift
    say "$what"
    local rc=0
    "$@" >"$LOG" 2>&1 || rc=$?
    cat "$LOG" >>"$ALL"
    if [ "$rc" -ne 0 ]; then
        say "$what: failed (exit $rc); its output follows"
        cat "$LOG" >&2
        exit 1
    fi
}

if [ ! -x .venv/bin/python ]; then
    command -v "$PY" >/dev/null || { say "$PY not found; set PYTHON=/path/to/python3.10+"; exit 1; }
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { say "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); imm needs 3.10 or later (set PYTHON=...)"; exit 1; }
    step "creating the environment in .venv" "$PY" -m venv .venv
    # a newer pip where one can be had; an offline machine keeps the venv's own
    .venv/bin/python -m pip install --upgrade pip >>"$ALL" 2>&1 || true
else
    say "using the environment in .venv"
fi
. .venv/bin/activate

# torch first, pinned to the CPU build that lies on disk in CI: an unpinned `torch` would pull
# a multi-GB CUDA build. Any torch>=2.6 works; skip this when one is already installed.
if python -c "import torch" 2>/dev/null; then
    say "torch $(python -c 'import torch; print(torch.__version__)') already installed"
else
    step "installing torch 2.13.0 (CPU build)" python -m pip install "torch==2.13.0"
fi

# imm itself (editable) with its test extras; skipped when this pyproject.toml is already installed
STAMP=.venv/.imm-installed
WANT=$(python -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x .venv/bin/imm ] \
        && python -c "import importlib.metadata as m; m.version('imm')" 2>/dev/null; then
    say "imm already installed"
else
    step "installing imm (editable, with test extras)" python -m pip install -e ".[test]"
    echo "$WANT" > "$STAMP"
fi
[ -s "$ALL" ] && cp "$ALL" .venv/setup.log  # the full output of the last steps that ran, for the curious
exit 0
