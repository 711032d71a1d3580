#!/usr/bin/env bash
# On the GPU machine, from the repository root: DEADLINE=520 bash BUNDLE/compare.sh
# Trains --config gpu (s1, then benchmarks it) and --config cpu with 12 epochs (s2) on the
# bundled rows, then a second seed of each (s3, s4) while DEADLINE seconds are not used up.
# $OUT gets check.log (every stage's epochs and figures) and one sN.tgz per stage (log, summary,
# metrics, curves, validation probabilities). EXTRA (extra --set arguments for every stage) is
# for trying the script on a CPU with tiny settings.
set -u -o pipefail
T0=$(date +%s); DEADLINE=${DEADLINE:-520}
source "$(dirname "$0")/bundle_env.sh"
LOG=$OUT/check.log
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(el)s] $*" | tee -a "$LOG"; }
say "start"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  "$PY" -c "import sys, torch, torchvision, transformers; print(sys.version.split()[0], torch.__version__, torchvision.__version__, transformers.__version__, 'cuda:', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"
stage() {  # stage NAME NEED_S ARGS...: train, if about NEED_S seconds are left
  local name=$1 need=$2; shift 2
  local left=$(( DEADLINE - $(el) ))
  if (( left < need )); then say "$name skipped: ${left}s left, needs about ${need}s"; return 1; fi
  say "$name begins (limit $((left - 10))s): $*"
  local t=$(date +%s) rc=0
  timeout $((left - 10)) "$PY" -m mmtag train --data "$B/data" --out "$WORK/$name" "$@" ${EXTRA:-} \
      > "$WORK/$name.train.log" 2>&1 || rc=$?
  say "$name train rc=$rc in $(( $(date +%s) - t ))s"
  grep -E "model:|epoch [0-9]+/[0-9]+ |best|validation|each half|decision|Error|error" \
      "$WORK/$name.train.log" | tail -40 | tee -a "$LOG"
  (( rc == 0 )) || tail -40 "$WORK/$name.train.log" | tee -a "$LOG"
  return $rc
}
pack() {  # pack NAME: a stage's small files into $OUT/NAME.tgz (no checkpoints), if it ran
  [[ -f "$WORK/$1.train.log" ]] || return 0
  (cd "$WORK" && tar czf "$OUT/$1.tgz" $(ls "$1".*.log "$1"/*.json "$1"/*.csv "$1"/*.yaml \
      "$1"/*.png 2>/dev/null))
}
S1T0=$(date +%s)
if stage s1 120 --config gpu; then
  S1=$(( $(date +%s) - S1T0 ))
  say "s1 benchmark"
  timeout 120 "$PY" -m mmtag benchmark "$WORK/s1" --csv "$B/data/test.csv" \
      --images "$B/data/data" > "$WORK/s1.bench.log" 2>&1
  tail -6 "$WORK/s1.bench.log" | tee -a "$LOG"
else
  S1=200
fi
pack s1
stage s2 $(( S1 * 2 / 3 )) --config cpu --set optim.epochs=12; pack s2
stage s3 $(( S1 + 10 )) --config gpu --set seed=1; pack s3
stage s4 $(( S1 * 2 / 3 )) --config cpu --set optim.epochs=12 --set seed=1; pack s4
say "done"
