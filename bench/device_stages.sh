# Sourced by the device scripts (bench/issue6_gpu.sh, bench/pending_gpu.sh), which set TAG and STAGES first: the
# results folder, the install of this tree into the device's Python, and stage(), which runs one budgeted step.
#
#   stage NAME BUDGET COMMAND...   runs COMMAND when NAME is in $STAGES, under a hard timeout of BUDGET + 40 s,
#                                  printing its output (warnings dropped) and appending it to $OUT/$TAG.log
#
# Env: OUT (default bench/results), PYTHON, SKIP_INSTALL=1 (use the installed fa3_inductor as is), FA3_COMMIT (the
# device gets the tree without .git: results name this commit).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-$TAG}
export FA3_COMMIT=${FA3_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    "$PY" -m pip install -q --no-deps --no-build-isolation "$ROOT" || exit 1
fi
cd /tmp   # the source tree's fa3_inductor/ would shadow the installed package
start=$(date +%s)
stage() {   # name budget command...
    local name=$1 budget=$2; shift 2
    case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
    echo "=== $name (budget ${budget}s, at $(( $(date +%s) - start ))s)" | tee -a "$OUT/$TAG.log"
    timeout $(( budget + 40 )) "$@" 2>&1 | grep -v "Warning\|warnings.warn" | tee -a "$OUT/$TAG.log"
    echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/$TAG.log"
}
