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
TAG=issue6
STAGES=${STAGES:-models,generate,train}
source "$(dirname "$0")/device_stages.sh"
stage models "${MODELS_BUDGET:-170}" "$PY" "$ROOT/bench/models.py" --models "${MODELS:-llama,llama-s512}" \
    --stem "${MODELS_STEM:-models}" --rounds "${ROUNDS:-5}" --budget "${MODELS_BUDGET:-170}" --out "$OUT"
stage generate "${GEN_BUDGET:-120}" "$PY" "$ROOT/bench/generate.py" \
    --runs "${GEN_RUNS:-eager-sdpa-dynamic,inductor-sdpa-static-ro,fa3-sdpa-static-ro,inductor-sdpa-dynamic,fa3-sdpa-dynamic}" \
    --budget "${GEN_BUDGET:-120}" --out "$OUT"
stage train "${TRAIN_BUDGET:-110}" "$PY" "$ROOT/bench/train.py" --models "${TRAIN_MODELS:-llama,bert}" \
    --rounds "${ROUNDS:-5}" --budget "${TRAIN_BUDGET:-110}" --out "$OUT"
echo "=== done in $(( $(date +%s) - start ))s; results in $OUT"
ls -la "$OUT"
