#!/usr/bin/env bash
# One device call for branch kvregs (registers of the bit-plane quantized-KV decode kernel): the CUDA tests of
# the kernel, the store and the decoder, then the per-layer timing inside CUDA graphs of the decoder's launch
# against the register cuts (`KVREGS` in benchmarks/bench_kv_step.py: tail_n 16, int8_chunk 64, fp16 dots,
# 50 / 66 splits, maxnreg 168 / 128, BLOCK_N 32), each with its max abs difference to the dequantizing
# kernel, and the offline sm_90 register / spill table of the same Triton for comparison.
# Expected ~4 min of command time on the H200 (tests ~35 s, per-layer ~2-3 min: 2 contexts x 2 caches x 13
# variants, each compiled once), plus the cold start. WHOLE=1 adds the whole decode step (default launch).
# Usage on the device: OUT=... bash benchmarks/gpu_kvregs.sh   (logs and JSON land in $OUT)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $OUT/log
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/log
box() { local s=$1; shift; echo "== $(date -u +%T) $*" | tee -a $OUT/log; timeout $s "$@" 2>&1 | tee -a $OUT/log; }
XD=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${NW:-8}")
box ${T_TESTS:-120} python3 -m pytest tests/test_attn_kvq.py tests/test_fast_kvq.py tests/test_kvcache.py -q \
  -p no:cacheprovider $XD -rfE
box ${T_LAYER:-300} python3 benchmarks/bench_kv_step.py --kvregs --weights '' --reps ${REPS:-20} \
  --out $OUT/bench_kv_step_kvregs.json
box ${T_RES:-240} python3 benchmarks/kvq_resources.py --json $OUT/kvq_resources.json
[ -n "${WHOLE:-}" ] && box ${T_STEP:-150} python3 benchmarks/bench_kv_step.py --skip-layer --weights bf16 \
  --steps ${STEPS:-50} --out $OUT/bench_kv_step_whole.json
grep -E "passed|failed|error" $OUT/log | tail -5
