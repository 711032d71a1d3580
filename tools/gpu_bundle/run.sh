#!/usr/bin/env bash
# On the GPU machine, from the repository root: bash BUNDLE/run.sh [--set KEY=VALUE ...]
# Trains the bundle's recipe (BUNDLE/recipe.txt) on the bundled rows, then measures
# prediction speed; the summary, metrics, curves and logs land in $OUT (or BUNDLE/out).
set -euo pipefail
source "$(dirname "$0")/bundle_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt" || true
RUN=$(mktemp -d)/run
"${PYTHON:-python3}" -m mmtag train --data "$B/data" --out "$RUN" --config "$(cat "$B/recipe.txt")" "$@" 2>&1 | tee "$OUT/train.log"
"${PYTHON:-python3}" -m mmtag benchmark "$RUN" --csv "$B/data/test.csv" --images "$B/data/data" 2>&1 \
    | tee "$OUT/benchmark.log"
cp "$RUN/summary.json" "$RUN/metrics.csv" "$RUN/config.yaml" "$OUT/"
cp "$RUN/curves.png" "$OUT/" 2>/dev/null || true
