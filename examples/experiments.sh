#!/usr/bin/env bash
# Train one run, then run the notes' experiments on it, reading figures from --json with python3
# (any JSON tool works: jq -r .mean store.json does the same), and end with the run's report page.
#
#   examples/experiments.sh [RUN_DIR]          # default runs/default; ITERS=300 for a quick look
#
# Every command exits 0 on success, 2 on bad input (one line on stderr), 1 on a failure at run time,
# so `set -e` stops the chain at the first problem.
set -euo pipefail

RUN="${1:-runs/default}"
ITERS="${ITERS:-3000}"
FACTS="${FACTS:-$(dirname "$0")/facts.txt}"
OUT="$(mktemp -d)"  # the --json documents read below (each command also saves its own JSON in $RUN)
trap 'rm -rf "$OUT"' EXIT

json() {  # json KEY.PATH < document: print one field of a JSON document
    python3 -c 'import json, sys
d = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    d = d[int(k)] if isinstance(d, list) else d[k]
print(f"{d:.3f}" if isinstance(d, float) else d if isinstance(d, str) else json.dumps(d))' "$1"
}

if [ ! -f "$RUN/config.json" ]; then
    mkdir -p "$(dirname "$RUN")"
    imm train --iters "$ITERS" --out "$RUN" --json > "$OUT/train.json"
    echo "trained: validation loss $(json val_loss < "$OUT/train.json") (memory read ablated: $(json val_loss_ablated < "$OUT/train.json")), memory share $(json memory_share < "$OUT/train.json")"
fi

# pattern storage test: tables on stderr, the JSON document on stdout (also saved as $RUN/store.json)
imm store --run "$RUN" --json > "$OUT/store.json"
echo "pattern similarity: $(json mean < "$OUT/store.json") +- $(json std < "$OUT/store.json")"
echo "  controls: initial memory $(json controls.initial.mean < "$OUT/store.json"), random vectors $(json controls.random.mean < "$OUT/store.json")"
echo "  slot-to-slot cosine: $(json slot_cosine < "$OUT/store.json")   NaN/inf: $(json nonfinite < "$OUT/store.json")"

# slot usage analysis (also saved as $RUN/usage.json; with both results, optimal_config_results.png is drawn)
imm usage --run "$RUN" --json > "$OUT/usage.json"
echo "slot usage: entropy $(json entropy < "$OUT/usage.json"), min/max $(json min_max_ratio < "$OUT/usage.json"), cv $(json cv < "$OUT/usage.json")"
echo "  dead slots: $(json dead_slots < "$OUT/usage.json")   read gate mean: $(json gates.0.mean < "$OUT/usage.json")"

# recall: every fact shown once, then each completed from its two-word cue (memory frozen)
imm recall --run "$RUN" --facts "$FACTS" --json > "$OUT/recall.json"
echo "recall: exact match $(json summary.memory.exact_match < "$OUT/recall.json") with memory," \
     "$(json summary.fresh.exact_match < "$OUT/recall.json") with a fresh memory;" \
     "character accuracy $(json summary.memory.char_accuracy < "$OUT/recall.json") vs $(json summary.fresh.char_accuracy < "$OUT/recall.json")"

# needle in a haystack: each fact once inside other text, recalled later in a new context
imm needle --run "$RUN" --facts "$FACTS" --json > "$OUT/needle.json"
for c in memory fresh other_facts in_context; do
    echo "needle $c: exact $(json conditions.$c.exact_match < "$OUT/needle.json")" \
         "recall@1 $(json conditions.$c.recall_at_1 < "$OUT/needle.json")" \
         "char acc $(json conditions.$c.char_accuracy < "$OUT/needle.json")"
done
echo "verdict: $(json verdict < "$OUT/needle.json")"

# one self-contained HTML page with all of it (configuration, training curve, every experiment with its
# controls and plots); open it in any browser, or send it: nothing in it needs the network
REPORT=$(imm report "$RUN" --json | json report)
echo "plots, JSON results and the checkpoint are in $RUN; all of them on one page:"
echo "$REPORT"
