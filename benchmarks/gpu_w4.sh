#!/usr/bin/env bash
# Issue 13 (session 5, helper w4): ncu of the W4 tensor-core GEMV, a launch-shape sweep that ignores the
# shipped table, the split-K fix-up A/B and the W4 CUDA tests; stages chosen by $STAGES, each time-boxed.
# Usage on the device: OUT=... STAGES="ncu sweep fixab tests" bash benchmarks/gpu_w4.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WORKBENCH_TUNE_CACHE=$OUT/kernel_tune.json
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $OUT/log
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/log
box() { local s=$1; shift; echo "== $(date -u +%T) $*" | tee -a $OUT/log; timeout $s "$@" 2>&1 | tee -a $OUT/log; }
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section SchedulerStats"
SHAPES=4096x14336x1,14336x4096x1,8192x28672x1,4096x14336x16,4096x14336x64
# the tuner times every candidate only for keys missing from its table: hide the shipped one
NOSHIP="import runpy, sys, pathlib; sys.path.insert(0, 'benchmarks'); import workbench.kernels.tune as t; \
t.SHIPPED = pathlib.Path('/nonexistent'); sys.argv = ['bench_kernels.py'] + sys.argv[1:]; \
runpy.run_path('benchmarks/bench_kernels.py', run_name='__main__')"
for st in ${STAGES}; do
  case $st in
    ncu) for sh in ${NCU_SHAPES:-4096x14336x1 14336x4096x1}; do for fx in ${NCU_FIX:-0}; do
           box ${T_NCU:-40} env WORKBENCH_W4_FIXUP=$fx ${NCU_ENV:-} $NCU --clock-control none -k regex:_w4_mma_kernel \
             --launch-skip 1 -c 1 $SECTIONS python3 benchmarks/profile_kernel.py --fmt w4_g128 --shape $sh; done; done ;;
    sweep) box ${T_SWEEP:-150} python3 -c "$NOSHIP" --tune all --formats w4_g128 --shapes ${BSHAPES:-$SHAPES} \
             ${BEXTRA:-} --out $OUT/bench_kernels.json ;;
    fixab) for f in 0 1; do box ${T_FIXAB:-40} env WORKBENCH_W4_FIXUP=$f WORKBENCH_SPLIT_FIXUP=$f python3 \
             benchmarks/bench_kernels.py --tune none --no-peers --formats w4_g128 \
             --shapes ${FX_SHAPES:-4096x14336x1,14336x4096x1} --out $OUT/bench_fixup$f.json; done ;;
    tests) box ${T_TESTS:-90} python3 -m pytest tests/test_kernels.py tests/test_runtime_cuda.py -n ${NW:-14} -q \
             -p no:cacheprovider -k "${TK:-w4_mma or mma}" ;;
  esac
done
grep -E "passed|failed" $OUT/log | tail -3
