# Sourced by the bundle's scripts (run.sh, compare.sh, speed.sh), from the repository root:
# B (the bundle), OUT, PY and WORK, and the environment that points mmtag at the bundle's
# copies of the weights, GloVe and code packages instead of the packages it lacks.
B=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
OUT=${OUT:-$B/out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
export PYTHONPATH="$PWD/src:$B/site${PYTHONPATH:+:$PYTHONPATH}"
export MMTAG_MINILM_DIR="$B/minilm" MMTAG_LITE_WEIGHTS_DIR="$B/weights"
if [[ -d "$B/glove" ]]; then export MMTAG_GLOVE_DIR="$B/glove"; fi
export MMTAG_CACHE_DIR="$WORK/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
