#!/usr/bin/env bash
# What CPU-only sessions built and could only cross-compile, checked and timed on one H100 in priority order (three
# device calls of under 10 minutes each: STAGES=tests, then STAGES=operands,ksplit, then STAGES=decode,s512; the
# tests compile some 40 Gluon kernels; bench/NOTES.md session 8 says what each stage decides):
#   tests     the GPU tests of the switched-off schedules (key-split blocks, operand prefetch, no-overlap for dense
#             operands) and of the portable forward as a tuner candidate -> gpu_tests_pending.xml
#   operands  T5's dense bias at D=64 (prefetch) and dense masks at D=128 (no-overlap) pinned beside the default
#             schedules and SDPA with the same bias / mask                       -> fwd_operands_t5.md, _mask.md
#   ksplit    key-split blocks (128 + 32 / 128 + 64 keys) at D=128 beside the default schedules -> fwd_ksplit.md
#   decode    the decode kernel alone as GPU time in CUDA graphs, and generate() reduce-overhead fa3 vs Inductor in
#             rotated rounds                                                       -> generate.md
#   s512      the ANCHORS Llama at S=512 under reduce-overhead, fa3 vs Inductor (0.89x at 9625683, before the op's
#             output took SDPA's layout)                                           -> models_s512_ro.md
#
#   STAGES=tests FA3_COMMIT=<sha> bash bench/pending_gpu.sh
#   STAGES=operands,ksplit FA3_COMMIT=<sha> bash bench/pending_gpu.sh
#   STAGES=decode,s512 FA3_COMMIT=<sha> bash bench/pending_gpu.sh
#
# Each stage has a budget (seconds; work that would start later is skipped) and a hard timeout of budget + 40 s
# (bench/device_stages.sh), and writes its results as it goes; the output also goes to $OUT/pending_gpu.log.
# Env: OUT, STAGES, *_BUDGET, PYTHON, SKIP_INSTALL=1.
TAG=pending_gpu
STAGES=${STAGES:-tests,operands,ksplit,decode,s512}
source "$(dirname "$0")/device_stages.sh"
stage tests "${TESTS_BUDGET:-480}" "$PY" -m pytest -q "$ROOT/tests/gpu/test_hopper_gpu.py" \
    -k "ksplit or prefetch or overlap or portable_candidate" -p no:cacheprovider --junitxml "$OUT/gpu_tests_pending.xml"
stage operands "${OPERANDS_BUDGET:-110}" "$PY" "$ROOT/bench/fwd_schedules.py" --program t5-bias --families prefetch \
    --d 64 --s 1024,4096 --causal 0 --budget "${OPERANDS_BUDGET:-110}" --out "$OUT" --stem fwd_operands_t5
stage operands "${OPERANDS_BUDGET:-110}" "$PY" "$ROOT/bench/fwd_schedules.py" --program dense-mask \
    --families nooverlap,prefetch --d 64,128 --s 1024,4096 --causal 0,1 --budget "${OPERANDS_BUDGET:-110}" \
    --out "$OUT" --stem fwd_operands_mask
stage ksplit "${KSPLIT_BUDGET:-120}" "$PY" "$ROOT/bench/fwd_schedules.py" --families ksplit,ksplit64 --d 128 \
    --s 1024,4096,16384 --causal 0,1 --budget "${KSPLIT_BUDGET:-120}" --out "$OUT" --stem fwd_ksplit
stage decode "${DECODE_BUDGET:-150}" "$PY" "$ROOT/bench/generate.py" \
    --runs inductor-sdpa-static-ro,fa3-sdpa-static-ro,inductor-sdpa-dynamic,fa3-sdpa-dynamic --rounds 3 --reps 2 \
    --budget "${DECODE_BUDGET:-150}" --out "$OUT"
stage s512 "${S512_BUDGET:-100}" "$PY" "$ROOT/bench/models.py" --models llama-s512 --impls sdpa \
    --modes inductor-ro,fa3-ro --rounds 5 --budget "${S512_BUDGET:-100}" --out "$OUT" --stem models_s512_ro
echo "=== done in $(( $(date +%s) - start ))s; results in $OUT"
ls -la "$OUT"
