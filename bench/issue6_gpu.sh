#!/usr/bin/env bash
# Issue 6 benchmarks in one device call (about 8 minutes on one H100): the zoo prefill rows of the ANCHORS.md
# Llama (S=8192 and S=512, both attention implementations), generate() tokens/s with the decode kernel table,
# and one AdamW training step (Llama, padded BERT). Results: models.*, generate.*, train.* under $OUT.
#
#   FA3_COMMIT=<sha> bash bench/issue6_gpu.sh
#   STAGES=models MODELS=qwen2,mistral,gemma2,gpt2,bert,minilm MODELS_STEM=models_zoo1 MODELS_BUDGET=420 \
#       bash bench/issue6_gpu.sh                                  # more zoo rows in a further call
#
# Each stage has a budget (seconds; work that would start later is skipped) and a hard timeout of budget + 40 s;
# every stage writes its results as it goes, so a stage cut short keeps what it measured.
# models and train compile every mode first, then time them in ROUNDS rotated rounds (median [min, max] over rounds).
# Env: OUT, STAGES (models,generate,train), MODELS, MODELS_STEM, ROUNDS (5), GEN_RUNS, TRAIN_MODELS, *_BUDGET,
# PYTHON, SKIP_INSTALL=1 (use the installed fa3_inductor as is).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/bench/results}
PY=${PYTHON:-python}
STAGES=${STAGES:-models,generate,train}
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-issue6}
export FA3_COMMIT=${FA3_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    "$PY" -m pip install -q --no-deps --no-build-isolation "$ROOT" || exit 1
fi
cd /tmp   # the source tree's fa3_inductor/ would shadow the installed package
start=$(date +%s)
stage() {   # name budget command...
    local name=$1 budget=$2; shift 2
    case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
    echo "=== $name (budget ${budget}s, at $(( $(date +%s) - start ))s)"
    timeout $(( budget + 40 )) "$@" --budget "$budget" --out "$OUT" 2>&1 | grep -v "Warning\|warnings.warn"
    echo "=== $name exit ${PIPESTATUS[0]}"
}
stage models "${MODELS_BUDGET:-170}" "$PY" "$ROOT/bench/models.py" --models "${MODELS:-llama,llama-s512}" \
    --stem "${MODELS_STEM:-models}" --rounds "${ROUNDS:-5}"
stage generate "${GEN_BUDGET:-120}" "$PY" "$ROOT/bench/generate.py" \
    --runs "${GEN_RUNS:-eager-sdpa-dynamic,inductor-sdpa-static-ro,fa3-sdpa-static-ro,inductor-sdpa-dynamic,fa3-sdpa-dynamic}"
stage train "${TRAIN_BUDGET:-110}" "$PY" "$ROOT/bench/train.py" --models "${TRAIN_MODELS:-llama,bert}" \
    --rounds "${ROUNDS:-5}"
echo "=== done in $(( $(date +%s) - start ))s; results in $OUT"
ls -la "$OUT"
