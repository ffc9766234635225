#!/usr/bin/env bash
# Split-K partials (kernels/split_partials.py, WORKBENCH_SPLIT_PARTIALS=1) against the default split-K
# finish (zero-fill + fp32 atomics + cast, or the in-kernel fix-up at split >= 8): CUDA tests of both paths,
# a kernel A/B and an end-to-end decode A/B; stages chosen by $STAGES, each time-boxed.
# Usage on the device: OUT=... STAGES="tests bench e2e" bash benchmarks/gpu_splitk.sh (one stage per call fits
# the 600-s command limit: tests ~500 s at most, bench ~240 s, e2e ~480 s)
# Files under $OUT (6): log, bench_partials{0,1}.json, e2e_partials{0,1}.json, kernel_tune.json (if tuned).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WORKBENCH_TUNE_CACHE=$OUT/kernel_tune.json
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $OUT/log
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/log
box() { local s=$1; shift; echo "== $(date -u +%T) $*" | tee -a $OUT/log; timeout $s "$@" 2>&1 | tee -a $OUT/log; }
for st in ${STAGES:-tests bench e2e}; do
  case $st in
    # the partials themselves (the CPU sweep at full size, W4 tensor-core shapes, QuantLinear and the fast
    # path's linear eager / graph / compiled at 14336x4096), then the default path's split-K tests, then the
    # CUDA runtime tests on the partials route (stories260K is too small to split: a check that nothing breaks)
    tests) box ${T_TESTS:-200} python3 -m pytest tests/test_split_partials.py -n ${NW:-14} -q -p no:cacheprovider
           box ${T_TESTS2:-150} python3 -m pytest tests/test_kernels.py -n ${NW:-14} -q -p no:cacheprovider \
             -k "split or fixup or w4_mma or gemv"
           box ${T_TESTS3:-150} env WORKBENCH_SPLIT_PARTIALS=1 python3 -m pytest tests/test_runtime_cuda.py \
             -n ${NW:-14} -q -p no:cacheprovider ;;
    # kernel A/B, default launch shapes (shipped tuned table), CUDA graphs: 0 = zero-fill + atomics + cast
    # (fix-up at split >= 8), 1 = per-split partials + one reduction (the decoder's int_linear route)
    bench) for f in 0 1; do box ${T_BENCH:-120} env WORKBENCH_SPLIT_PARTIALS=$f python3 benchmarks/bench_kernels.py \
             --tune none --no-peers --formats ${BFORMATS:-w4_g128,w8_ch,fp8} \
             --shapes ${BSHAPES:-4096x4096x1,14336x4096x1} --out $OUT/bench_partials$f.json; done ;;
    # whole decode step (8B shape), fast:compile: the sum + cast fused into the residual add by inductor
    e2e) for f in 0 1; do box ${T_E2E:-240} env WORKBENCH_SPLIT_PARTIALS=$f python3 benchmarks/bench_e2e.py \
             --budget-s ${E2E_BUDGET:-120} --hf-compile '' --variants ${E2E_VARIANTS:-bf16,int4_g128,int8_ch} \
             --runs ${E2E_RUNS:-fast:compile} --hf-prefill '' ${E2E_EXTRA:-} --out $OUT/e2e_partials$f.json; done ;;
  esac
done
grep -E "passed|failed|error" $OUT/log | tail -8
