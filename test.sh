#!/usr/bin/env bash
# Set up (first run) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
