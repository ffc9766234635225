#!/usr/bin/env bash
# One device call for issue 18 (70B-shaped streaming on one H200): CUDA tests, then every phase of
# bench_70b_stream.py on the 70B shape at $BLOCKS blocks (default 4) with per-block wall times, peak GPU and
# host memory and a PROJECTION to 80 blocks; last, the commands of the full 80-block run (one phase per
# device command, for a later session). Everything lands in $OUT (log, JSON, results.md).
# Usage on the device, from the repository root (or .devrun/stream):
#     OUT=... bash benchmarks/gpu_issue18.sh            # ~150-200 s by the estimate in benchmarks/RESULTS.md
#     OUT=... STAGES="bench" BLOCKS=8 bash benchmarks/gpu_issue18.sh
# The CPU check of the same benchmark: python benchmarks/bench_70b_stream.py --tiny --out tiny.json
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
BLOCKS=${BLOCKS:-4}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/log
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a $OUT/log
box() { local s=$1; shift; echo "== $(date -u +%T) (limit ${s}s) $*" | tee -a $OUT/log; local t0=$SECONDS
        timeout $s "$@" 2>&1 | tee -a $OUT/log; echo "== took $((SECONDS - t0)) s, rc ${PIPESTATUS[0]}" | tee -a $OUT/log; }
B="python3 benchmarks/bench_70b_stream.py --quiet ${BENCH_EXTRA:-}"  # BENCH_EXTRA=--tiny: the CPU dry run
for st in ${STAGES:-tests bench nogram commands}; do
  case $st in
    tests) box ${T_TESTS:-100} python3 -m pytest -q -p no:cacheprovider tests/test_gptq_kernel.py tests/test_streaming_tf32.py tests/test_gram_panels.py \
             tests/test_streaming.py tests/test_bench_70b_stream.py ;;
    bench) box ${T_BENCH:-200} $B --blocks $BLOCKS --phases inspect,scan,gptq --out $OUT/bench_70b_${BLOCKS}blocks.json ;;
    nogram) box ${T_NOGRAM:-50} $B --blocks $BLOCKS --phases inspect --inspect-grams off \
             --out $OUT/bench_70b_${BLOCKS}blocks_inspect_nograms.json ;;
    commands) { echo "Full 80-block run, one phase per device command (each well under the 600 s cap):"
             for ph in inspect scan gptq; do
               echo "  OUT=\$OUT timeout 590 $B --phases $ph --out \$OUT/bench_70b_80blocks_$ph.json"; done
           } | tee -a $OUT/log ;;
  esac
done
python3 - "$OUT" <<'EOF' | tee $OUT/results.md
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("bench_70b_*.json")):
    r = json.loads(f.read_text())
    print(f"### {f.name}\n\n{r.get('markdown', '(cut before the end: per-phase rows are in the JSON)')}\n")
    for name, p in r.get("phases", {}).items():
        print(f"- {name}: block seconds {p.get('block_seconds')}; {p['projection']['label']}")
    print()
EOF
grep -c "passed\|PASSED" $OUT/log | sed 's/^/lines with passed: /'; grep " FAILED\|Error" $OUT/log | head -20
