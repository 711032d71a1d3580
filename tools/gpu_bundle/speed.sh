#!/usr/bin/env bash
# On the GPU machine, from the repository root: DEADLINE=460 bash BUNDLE/speed.sh
# Every GPU measurement of docs/performance.md in one device call, in DEADLINE seconds at most
# (460: 7 min 40 s; stage estimates are guesses for an H200, nothing here has run on a GPU):
#   1. `mmtag bench train` of the report recipe (256 px) and the gpu recipe (448 px) at batch 64
#      and 256 on the device pipeline, the gpu recipe on the DataLoader pipeline (the baseline),
#      one without cuDNN autotuning (what the first step waits for);
#   2. the report recipe trained at batch 256 (lr scaled by sqrt, warmed up) end to end, then
#      `mmtag benchmark --parts` on it;
#   3. the gpu and cpu recipes trained on the same rows (micro-F1, samples-F1, minutes);
#   4. `bench train` with torch.compile, last (its compilation takes the longest).
# Stages that no longer fit DEADLINE seconds are skipped and say so. $OUT gets speed.log,
# bench.jsonl (one JSON line per measurement, with its label; tools/gpu_bundle/speed_table.py
# renders it) and one tgz per training (logs, summary, metrics; no checkpoints). EXTRA: extra
# --set arguments for every stage, STEPS: timed steps per part (for trying this on a CPU).
set -u -o pipefail
T0=$(date +%s); DEADLINE=${DEADLINE:-460}
source "$(dirname "$0")/bundle_env.sh"
LOG=$OUT/speed.log; JSONL=$OUT/bench.jsonl; : > "$JSONL"
STEPS=${STEPS:-20}
X=(); for kv in ${EXTRA:-}; do [[ $kv == --set ]] || X+=(--set "$kv"); done  # KEY=VALUE or --set KEY=VALUE
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(el)s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(el) )); }
say "start"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  "$PY" -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, 'cuda:', torch.cuda.is_available())"
  cat "$B/bundle.json"
} 2>&1 | tee -a "$LOG"

bench() {  # bench LABEL NEED_S COMMAND ARGS...: one `mmtag COMMAND` measurement, into bench.jsonl
  local label=$1 need=$2; shift 2
  if (( $(left) < need )); then say "$label skipped: $(left)s left, needs about ${need}s"; return 1; fi
  say "$label: mmtag $*"
  local rc=0
  timeout $(( $(left) - 5 )) "$PY" -m mmtag "$@" --json > "$WORK/$label.json" \
      2> "$WORK/$label.log" || rc=$?
  if (( rc == 0 )); then
    "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); r = r.get('parts', r); r['label'] = sys.argv[2]; print(json.dumps(r))" \
        "$WORK/$label.json" "$label" >> "$JSONL"
    "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); r = r.get('parts', r); print(' ', r['images_per_second'], 'whole/model', r['whole_over_step'], 'bound', r['bound_by'], 'first step', r.get('first_step_seconds'), 's, syncs', r.get('host_syncs'), ', peak MB', r['peak_memory_mb'])" \
        "$WORK/$label.json" | tee -a "$LOG"
  else
    say "$label rc=$rc"; tail -20 "$WORK/$label.log" | tee -a "$LOG"
  fi
  grep -E "set-up|first training step|cached [0-9]+ images" "$WORK/$label.log" | tee -a "$LOG"
  return $rc
}

train() {  # train NAME NEED_S ARGS...: a training on the bundled rows, packed into NAME.tgz
  local name=$1 need=$2; shift 2
  if (( $(left) < need )); then say "$name skipped: $(left)s left, needs about ${need}s"; return 1; fi
  say "$name: mmtag train $*"
  local t=$(date +%s) rc=0
  timeout $(( $(left) - 5 )) "$PY" -m mmtag train --data "$B/data" --out "$WORK/$name" "$@" \
      "${X[@]}" > "$WORK/$name.train.log" 2>&1 || rc=$?
  say "$name train rc=$rc in $(( $(date +%s) - t ))s"
  grep -E "set-up|first training step|epoch [0-9]+/[0-9]+ |best epoch|Error|error" \
      "$WORK/$name.train.log" | tail -25 | tee -a "$LOG"
  local files=()
  for f in "$WORK/$name".train.log "$WORK/$name"/*.json "$WORK/$name"/*.csv "$WORK/$name"/*.yaml; do
    [[ -f $f ]] && files+=("${f#"$WORK"/}")
  done
  (( ${#files[@]} )) && tar czf "$OUT/$name.tgz" -C "$WORK" "${files[@]}"
  return $rc
}

D=(--data "$B/data" --steps "$STEPS" --warmup 5)
BIG=(--set optim.batch_size=256 --set optim.lr_scale=sqrt)
bench report-256-b64 45 bench train "${D[@]}" --config report --set optim.batch_size=64 "${X[@]}"
bench report-256-b256 45 bench train "${D[@]}" --config report "${BIG[@]}" --set optim.lr_batch=32 "${X[@]}"
bench gpu-448-b64 45 bench train "${D[@]}" --config gpu "${X[@]}"
bench gpu-448-b256 60 bench train "${D[@]}" --config gpu "${BIG[@]}" "${X[@]}"
bench gpu-448-b64-loader 60 bench train "${D[@]}" --config gpu --set data.pipeline=loader \
    --set data.num_workers=$(( $(nproc) - 2 )) "${X[@]}"
bench report-256-b64-no-autotune 45 bench train "${D[@]}" --config report --set optim.batch_size=64 \
    --set cudnn_benchmark=false "${X[@]}"
if train report 60 --config report "${BIG[@]}" --set optim.lr_batch=32 --set optim.warmup_epochs=1; then
  bench predict-report 40 benchmark "$WORK/report" --csv "$B/data/test.csv" --images "$B/data/data" \
      --n 4000 --batch-size 512 --single 1 --parts
fi
train gpu 120 --config gpu
train cpu 60 --config cpu
bench report-256-b256-compiled 150 bench train "${D[@]}" --config report "${BIG[@]}" \
    --set optim.lr_batch=32 --set compile=true "${X[@]}"
say "done"
