#!/usr/bin/env bash
# A real full disk (a small tmpfs; needs root to mount): `mmtag train` writes its run folder and
# feature cache there, runs out of space, says so in one line; the folder is then given room
# and `--resume` finishes the run, which must match an uninterrupted one on an ordinary disk.
# Two cases: the disk fills while the cache fills (6 MB), and while best.pt is written (18 MB).
#
#   sudo bash tools/disk_full.sh DATA_DIR WORK_DIR     # DATA_DIR: e.g. demo_run/data
set -euo pipefail
DATA=$1 WORK=$2
PY=${PYTHON:-.venv/bin/python}
SETS=(--set data.limit_train=400 --set data.limit_val=100 --set optim.epochs=2
      --set data.num_workers=0)
mkdir -p "$WORK"
if [ ! -f "$WORK/reference/summary.json" ]; then
  rm -rf "$WORK/reference" "$WORK/reference-cache"
  "$PY" -m mmtag train --data "$DATA" --config demo --out "$WORK/reference" "${SETS[@]}" \
      --set cache.dir="$WORK/reference-cache" > "$WORK/reference.log" 2>&1
fi
for size in 6m 18m; do
  disk="$WORK/disk-$size"
  mkdir -p "$disk"
  mount -t tmpfs -o size=$size tmpfs "$disk"
  trap 'umount "$disk" 2>/dev/null || true' EXIT
  set +e
  "$PY" -m mmtag train --data "$DATA" --config demo --out "$disk/run" "${SETS[@]}" \
      --set cache.dir="$disk/cache" > "$WORK/full-$size.log" 2>&1
  rc=$?
  set -e
  echo "tmpfs $size: exit $rc; $(tail -n 1 "$WORK/full-$size.log")"
  echo "  left behind: $(find "$disk" -name '*.tmp' | wc -l) temporary files," \
       "$(find "$disk/cache" -name '*.npy' 2>/dev/null | wc -l) cache entries"
  mount -o remount,size=200m "$disk"
  "$PY" -m mmtag train --resume "$disk/run" --data "$DATA" > "$WORK/resume-$size.log" 2>&1
  "$PY" - "$WORK/reference" "$disk/run" <<'EOF'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("fi", "tools/fault_inject.py")
fi = importlib.util.module_from_spec(spec); spec.loader.exec_module(fi)
diff = fi.differences(fi.fingerprint(Path(sys.argv[1])), fi.fingerprint(Path(sys.argv[2])))
print("  after --resume with room:", "identical to the uninterrupted run" if not diff else diff)
EOF
  umount "$disk"
  trap - EXIT
done
