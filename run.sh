#!/usr/bin/env bash
# Set up (first run) and run the main job on the embedded Shakespeare corpus: train the default
# model, then the pattern storage, slot usage, recall and needle experiments on it. Tables go to
# the terminal; plots, JSON results and the checkpoint stay in the run folder (default runs/default),
# and the last line names report.html, one page with all of them (open it in a browser).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
. .venv/bin/activate
exec examples/experiments.sh "${1:-runs/default}"
