#!/usr/bin/env bash
# One device call for issues 13/14 (kernels, sweep, inspection, e2e); stages chosen by $STAGES.
# Usage on the device: OUT=... STAGES="bench tests inspect" bash benchmarks/gpu_issue13.sh
# Each stage is time-boxed; logs and JSON land in $OUT (see benchmarks/RESULTS.md, issues 13 and 14).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WORKBENCH_TUNE_CACHE=$OUT/kernel_tune.json
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $OUT/log
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/log
if ls .whl/gemlite-*.tar.gz >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/gemlite-*.tar.gz \
    >>$OUT/log 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
box() { local s=$1; shift; echo "== $(date -u +%T) $*" | tee -a $OUT/log; timeout $s "$@" 2>&1 | tee -a $OUT/log; }
SHAPES=4096x14336x1,4096x14336x16,14336x4096x1,4096x14336x64,8192x28672x1
for st in ${STAGES}; do
  case $st in
    bench) box ${T_BENCH:-170} python3 benchmarks/bench_kernels.py --tune ${TUNE:-all} --shapes ${BSHAPES:-$SHAPES} \
             ${BFORMATS:+--formats $BFORMATS} ${BEXTRA:-} --out $OUT/bench_kernels.json ;;
    tests) box ${T_TESTS:-200} python3 -m pytest tests/test_kernels.py tests/test_runtime_cuda.py \
             tests/test_attention_decode.py -n ${NW:-14} -v -p no:cacheprovider ${TK:+-k "$TK"} ${TP:+-p $TP} ;;
    prefill) box ${T_PREFILL:-90} python3 benchmarks/bench_prefill.py --rows ${PF_ROWS:-64,128,256,512,2048} \
             --formats ${PF_FORMATS:-w4_g128,w8_ch,w3_g128,fp8} --out $OUT/prefill.json ;;
    fixab) for f in 0 1; do box ${T_FIXAB:-45} env WORKBENCH_SPLIT_FIXUP=$f python3 benchmarks/bench_kernels.py \
             --tune none --no-peers --formats ${FX_FORMATS:-w4_g128,w8_ch} --shapes ${FX_SHAPES:-4096x14336x1,14336x4096x1} \
             --out $OUT/bench_fixup$f.json; done ;;
    inspect) box ${T_INSPECT:-80} python3 benchmarks/bench_inspect_gpu.py --json $OUT/inspect.json ;;
    sens) box ${T_SENS:-45} python3 benchmarks/bench_sensitivity_gpu.py --skip-default --json $OUT/sens.json ;;
    e2e) box ${T_E2E:-300} python3 benchmarks/bench_e2e.py --budget-s ${E2E_BUDGET:-200} --hf-compile '' \
             --variants ${E2E_VARIANTS:-bf16,int4_g128,int8_ch,mixed} --prefill "${E2E_PREFILL-16,128,512,2048}" \
             --runs ${E2E_RUNS:-fast:graph,fast:compile} --hf-prefill '' --out $OUT/e2e.json ;;
    e2e_before) box ${T_E2EB:-50} env WORKBENCH_W4_MMA=0 python3 benchmarks/bench_e2e.py --variants int4_g128 \
             --hf-compile '' --runs fast:compile --prefill 2048 --hf-prefill '' --out $OUT/e2e_cudacore.json ;;
    e2e_w4fix) box ${T_E2EF:-60} env WORKBENCH_W4_FIXUP=1 python3 benchmarks/bench_e2e.py --variants int4_g128 \
             --hf-compile '' --runs fast:compile --prefill '' --hf-prefill '' --out $OUT/e2e_w4fixup.json ;;
    gen) for spec in ${GEN_SPECS:-int4_g128}; do for mode in graph compile; do
           box 40 python3 -m workbench.cli generate --model workbench/models/stories260K/stories260K.bin \
             --plan benchmarks/plan_uniform_$spec.json --prompt "Once upon a time" --max-new-tokens 200 \
             --device cuda --mode $mode; done; done ;;
  esac
done
grep -c " PASSED" $OUT/log | sed 's/^/tests passed: /'; grep " FAILED\|Error" $OUT/log | head -20
