#!/usr/bin/env bash
# On the CUDA machine, from the project root (after `source benchmarks/device/env.sh`): the CUDA op
# tests through ONNX Runtime, the harness checks against numpy, compute-sanitizer memcheck and
# racecheck. Logs in ${OUT:-runs/device}/validate (one line of each printed).
set -o pipefail
R=${OUT:-runs/device}/validate; mkdir -p "$R"; H=${HARNESS:-build/dev/libacttail_bench.so}
F="UserWarning\|_warn_once\|warnings.warn"; t0=$(date +%s)
git log -1 --format=%h > "$R/commit.txt" 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$R/gpu.txt"
step() { echo "== $1 ($(($(date +%s)-t0)) s)"; }
step "pytest: tests/test_ops.py, test_ops_cuda.py, test_ops_cuda_decode.py"
PYTHONUNBUFFERED=1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_ops_cuda.py \
  tests/test_ops_cuda_decode.py -rs 2>&1 | grep -v "$F" | tail -25 > "$R/test_ops_cuda.log"; tail -3 "$R/test_ops_cuda.log"
step "harness vs numpy"
timeout 60 python3 scripts/check_cuda_kernels.py "$H" --cases 200 --max-m 8 > "$R/harness_check.log" 2>&1; tail -1 "$R/harness_check.log"
timeout 60 python3 benchmarks/prefill_check.py --harness "$H" > "$R/prefill_check.log" 2>&1; tail -1 "$R/prefill_check.log"
step "memcheck"
timeout 60 compute-sanitizer --tool memcheck python3 benchmarks/prefill_check.py --small --harness "$H" 2>&1 | grep -v "$F" | tail -4 > "$R/memcheck_prefill.log"; tail -1 "$R/memcheck_prefill.log"
timeout 60 compute-sanitizer --tool memcheck python3 scripts/check_cuda_kernels.py "$H" --cases 40 --max-m 8 --seed 3 2>&1 | tail -3 > "$R/memcheck_decode.log"; tail -1 "$R/memcheck_decode.log"
SEL="random or llm_like or semantics or masked or fp16 or reuse or errors or boundary or prefill"
ACTTAIL_CUDA_CASES=15 timeout 120 compute-sanitizer --tool memcheck --target-processes all python3 -m pytest -q \
  -p no:cacheprovider tests/test_ops_cuda.py -k "$SEL" 2>&1 | grep -v "$F" | tail -5 > "$R/memcheck_tests.log"; tail -1 "$R/memcheck_tests.log"
step "racecheck"
timeout 60 compute-sanitizer --tool racecheck python3 benchmarks/prefill_check.py --small --harness "$H" 2>&1 | grep -v "$F" | tail -4 > "$R/racecheck_prefill.log"; tail -1 "$R/racecheck_prefill.log"
timeout 60 compute-sanitizer --tool racecheck python3 scripts/check_cuda_kernels.py "$H" --cases 16 --max-m 8 --seed 4 2>&1 | tail -3 > "$R/racecheck_decode.log"; tail -1 "$R/racecheck_decode.log"
step "done"
