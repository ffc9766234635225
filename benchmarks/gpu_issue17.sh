#!/usr/bin/env bash
# One device call for issue 17 (the quantized KV cache in the fast decoder): CUDA tests, then the
# whole-step and per-layer benchmark (benchmarks/bench_kv_step.py). Measured 2026-12-02: 88 s of command
# time on the H200 (tests 32 s, bench 33 s, rest start-up), ~175 s held with the cold start.
# Usage on the device: OUT=... bash benchmarks/gpu_issue17.sh   (logs and JSON land in $OUT)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD  # WORKBENCH_KV_STORE=0 times the torch write instead of the fused one
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $OUT/log
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/log
box() { local s=$1; shift; echo "== $(date -u +%T) $*" | tee -a $OUT/log; timeout $s "$@" 2>&1 | tee -a $OUT/log; }
XD=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${NW:-8}")
box ${T_TESTS:-80} python3 -m pytest tests/test_attn_kvq.py tests/test_fast_kvq.py tests/test_kvcache.py -q -p no:cacheprovider $XD -rfE
box ${T_STEP:-110} python3 benchmarks/bench_kv_step.py --weights ${WEIGHTS:-bf16,int4_g128} \
  --steps ${STEPS:-50} --reps ${REPS:-20} ${STEP_ARGS:-} --out $OUT/bench_kv_step.json
[ -n "${KV_BENCH:-}" ] && box ${T_KV:-240} python3 benchmarks/bench_kv.py --out $OUT/bench_kv.json
grep -E "passed|failed|error" $OUT/log | tail -5
