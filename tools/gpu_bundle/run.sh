#!/usr/bin/env bash
# On the GPU machine, from the repository root: bash BUNDLE/run.sh [--set KEY=VALUE ...]
# Trains the bundle's recipe (BUNDLE/recipe.txt) on the bundled rows, then measures
# prediction speed; the summary, metrics, curves and logs land in $OUT (or BUNDLE/out).
set -euo pipefail
B=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$B/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$B/site${PYTHONPATH:+:$PYTHONPATH}"
export MMTAG_MINILM_DIR="$B/minilm" MMTAG_LITE_WEIGHTS_DIR="$B/weights"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt" || true
RUN=$(mktemp -d)/run
"${PYTHON:-python3}" -m mmtag train --data "$B/data" --out "$RUN" --config "$(cat "$B/recipe.txt")" "$@" 2>&1 | tee "$OUT/train.log"
"${PYTHON:-python3}" -m mmtag benchmark "$RUN" --csv "$B/data/test.csv" --images "$B/data/data" 2>&1 \
    | tee "$OUT/benchmark.log"
cp "$RUN/summary.json" "$RUN/metrics.csv" "$RUN/config.yaml" "$OUT/"
cp "$RUN/curves.png" "$OUT/" 2>/dev/null || true
