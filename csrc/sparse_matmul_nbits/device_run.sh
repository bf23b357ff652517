#!/usr/bin/env bash
# SparseMatMulNBits on the CUDA machine, from the project root, once onnxruntime-gpu is installed there
# (benchmarks/device/README.md; carry third_party/onnxruntime/include and third_party/cublas/include):
#   bash csrc/sparse_matmul_nbits/device_run.sh [stage ...]      default: build test check sweep decode prefill sanitize
# Stages (each with its own time limit; outputs and logs under ${OUT:-runs/device}/nbits/):
#   build     (always) source benchmarks/device/env.sh: op library + harness build/ops/libacttail_bench.so for sm_${CUDA_ARCH:-90}
#   test      tests/test_ops_nbits_cuda.py (ACTTAIL_CUDA_CASES=${CASES:-200} random cases through ONNX Runtime)
#   check     every CUDA path through the harness against numpy (tests/test_ops_nbits_harness.py)
#   sweep     decode parameters per shape (columns per lane x blocks per SM x L2 prefetch) -> nbits_sweep.json
#   decode    kernel_bench_nbits.py, 1 row: the op vs MatMulNBits vs cuBLAS fp16, read floor
#   prefill   kernel_bench_nbits.py, 512 rows
#   sanitize  compute-sanitizer memcheck and racecheck on `check`
set -o pipefail
OUT=${OUT:-runs/device}/nbits
H=build/ops/libacttail_bench.so  # built by env.sh (ACTTAIL_BENCH=1) together with the op library
mkdir -p "$OUT"
t0=$(date +%s)
stages=${*:-build test check sweep decode prefill sanitize}
py() { timeout "$1" python3 "${@:2}"; }
echo "== build / env"
source benchmarks/device/env.sh || exit 1  # (re)builds the library and the harness when csrc/ changed
[ -f "$H" ] || { echo "no $H: env.sh did not build the harness"; exit 1; }
for s in $stages; do
  echo "== $s ($(($(date +%s) - t0)) s)"
  case $s in
    build) ;;
    test)
      ACTTAIL_BENCH_LIB=$H ACTTAIL_CUDA_CASES=${CASES:-200} py 330 -m pytest -q --maxfail=20 -p no:cacheprovider tests/test_ops_nbits_cuda.py \
        > "$OUT/pytest.log" 2>&1
      tail -15 "$OUT/pytest.log" ;;
    check) ACTTAIL_BENCH_LIB=$H py 120 -m pytest -q -p no:cacheprovider tests/test_ops_nbits_harness.py 2>&1 | tail -5 ;;
    sweep)
      py 200 benchmarks/kernel_bench_nbits.py --harness "$H" --no-ort --sweep --out "$OUT/sweep" > "$OUT/sweep.log" 2>&1
      tail -8 "$OUT/sweep.log" ;;
    decode)
      py 240 benchmarks/kernel_bench_nbits.py --harness "$H" --rows 1 --floor --ort-sparsities 0 --out "$OUT/decode" > "$OUT/decode.log" 2>&1
      tail -14 "$OUT/decode.log" ;;
    prefill)
      py 240 benchmarks/kernel_bench_nbits.py --harness "$H" --rows 512 --ort-sparsities 0,0.5 --out "$OUT/prefill" > "$OUT/prefill.log" 2>&1
      tail -10 "$OUT/prefill.log" ;;
    sanitize)
      for tool in memcheck racecheck; do
        ACTTAIL_BENCH_LIB=$H timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
          tests/test_ops_nbits_harness.py > "$OUT/sanitizer_$tool.log" 2>&1
        echo "$tool: exit $? ($(grep -c -E '^========= (Invalid|Race|Error)' "$OUT/sanitizer_$tool.log") reports)"; tail -3 "$OUT/sanitizer_$tool.log"
      done ;;
    *) echo "unknown stage $s" ;;
  esac
done
echo "done in $(($(date +%s) - t0)) s"
