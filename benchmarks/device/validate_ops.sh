#!/usr/bin/env bash
# On the CUDA machine, from the project root (after `source benchmarks/device/env.sh`): the op tests through
# ONNX Runtime, the harness checks against acttail_export.reference, a Debug build (the decode scratch
# invariant asserted after every GEMV launch), compute-sanitizer memcheck and racecheck. Logs in
# ${OUT:-runs/device}/validate (one line of each printed). Two stages, each well inside a 10-minute command:
#   bash benchmarks/device/validate_ops.sh tests      # pytest (CPU + CUDA), harness vs reference (~5 min)
#   bash benchmarks/device/validate_ops.sh sanitizer  # Debug build + its check, memcheck, racecheck (~5 min)
set -o pipefail
STAGE=${1:-all}
R=${OUT:-runs/device}/validate; mkdir -p "$R"; H=${HARNESS:-build/ops/libacttail_bench.so}
F="UserWarning\|_warn_once\|warnings.warn"; t0=$(date +%s)
if [ "$STAGE" != sanitizer ]; then  # (at most 8 files per command come back from the lent machine)
  git log -1 --format=%h > "$R/commit.txt" 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$R/gpu.txt"
fi
step() { echo "== $1 ($(($(date +%s)-t0)) s)"; }
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  step "pytest: tests/test_ops.py (CPU, 1200 random cases), test_ops_cuda.py (300 + 50 random CUDA cases), test_ops_cuda_decode.py"
  PYTHONUNBUFFERED=1 timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_ops_cuda.py \
    tests/test_ops_cuda_decode.py -rs 2>&1 | grep -v "$F" | tail -25 > "$R/test_ops_cuda.log"; tail -3 "$R/test_ops_cuda.log"
  step "harness vs reference (decode and prefill, every variant, packed members, ramp, scales)"
  timeout 100 python3 scripts/check_cuda_kernels.py "$H" --cases 300 > "$R/harness_check.log" 2>&1; tail -1 "$R/harness_check.log"
  timeout 100 python3 benchmarks/prefill_check.py --harness "$H" > "$R/prefill_check.log" 2>&1; tail -1 "$R/prefill_check.log"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = sanitizer ]; then
  step "Debug build (device asserts on) and its harness check"
  ACTTAIL_BUILD_TYPE=Debug ACTTAIL_BENCH=1 ACTTAIL_INSTALL=0 ACTTAIL_BUILD_DIR=build/debug ACTTAIL_CUDA=1 ACTTAIL_CUDA_ARCHS=${CUDA_ARCH:-90} \
    ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR:-$PWD/third_party/onnxruntime/include} bash scripts/build_ops.sh > "$R/debug_build.log" 2>&1
  tail -1 "$R/debug_build.log"
  timeout 100 python3 scripts/check_cuda_kernels.py build/debug/libacttail_bench.so --cases 150 --max-m 8 --seed 5 > "$R/debug_check.log" 2>&1
  tail -1 "$R/debug_check.log"
  step "memcheck"
  timeout 70 compute-sanitizer --tool memcheck python3 benchmarks/prefill_check.py --small --harness "$H" 2>&1 | grep -v "$F" | tail -4 > "$R/memcheck_prefill.log"; tail -1 "$R/memcheck_prefill.log"
  timeout 70 compute-sanitizer --tool memcheck python3 scripts/check_cuda_kernels.py "$H" --cases 40 --max-m 8 --seed 3 2>&1 | tail -3 > "$R/memcheck_decode.log"; tail -1 "$R/memcheck_decode.log"
  SEL="random_cases or packed or semantics or masked or fp16 or reuse or errors or boundary or prefill"
  ACTTAIL_CUDA_CASES=15 timeout 150 compute-sanitizer --tool memcheck --target-processes all python3 -m pytest -q \
    -p no:cacheprovider tests/test_ops_cuda.py -k "$SEL" 2>&1 | grep -v "$F" | tail -5 > "$R/memcheck_tests.log"; tail -1 "$R/memcheck_tests.log"
  timeout 60 compute-sanitizer --tool memcheck python3 benchmarks/device/fused_select_check.py 2>&1 | grep -v "$F" | tail -3 > "$R/memcheck_fused_select.log"; tail -1 "$R/memcheck_fused_select.log"
  step "racecheck"
  timeout 70 compute-sanitizer --tool racecheck python3 benchmarks/prefill_check.py --small --harness "$H" 2>&1 | grep -v "$F" | tail -4 > "$R/racecheck_prefill.log"; tail -1 "$R/racecheck_prefill.log"
  timeout 70 compute-sanitizer --tool racecheck python3 scripts/check_cuda_kernels.py "$H" --cases 24 --max-m 8 --seed 4 2>&1 | tail -3 > "$R/racecheck_decode.log"; tail -1 "$R/racecheck_decode.log"
  timeout 60 compute-sanitizer --tool racecheck python3 benchmarks/device/fused_select_check.py 2>&1 | grep -v "$F" | tail -3 > "$R/racecheck_fused_select.log"; tail -1 "$R/racecheck_fused_select.log"
fi
step "done"
