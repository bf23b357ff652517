#!/usr/bin/env bash
# One command on the CUDA machine (after the onnxruntime-gpu install), from the project root: the op tests and
# benchmarks of both ops in priority order inside one time budget, so that a short lease gets the most important
# results first. Each step gets min(its own limit, what is left of BUDGET seconds); outputs in ${OUT:-runs/device}.
#   BUDGET=540 bash benchmarks/device/kernels_session.sh [step ...]
# Steps (default: all, in this order):
#   nbits-test    tests/test_ops_nbits_cuda.py (CASES random cases through ONNX Runtime's CUDA EP)
#   nbits-check   every CUDA path of SparseMatMulNBits through the harness against numpy (tests/test_ops_nbits_harness.py)
#   dense-test    tests/test_ops_cuda.py + test_ops_cuda_decode.py (SparseMatMul through the CUDA EP)
#   dense-check   scripts/check_cuda_kernels.py: the SparseMatMul harness against acttail_export.reference
#   nbits-decode  kernel_bench_nbits.py, 1 row: the 4-bit op vs MatMulNBits vs cuBLAS fp16, read floor
#   dense-sweep   kernel_bench.py --sweep at 0/50/80 % on the issue shapes -> gemv_table.h
#   nbits-sweep   kernel_bench_nbits.py --sweep
#   sanitize      compute-sanitizer memcheck + racecheck on small harness checks of both ops
#   nbits-sanitize  the SparseMatMulNBits half of sanitize only
#   prefill-fuse  the prefill tests of both ops (by name, and those reaching the prefill through the prefill_path
#                 fixture: *matches_reference, *never_reach*, *accumulates*) with ACTTAIL_PREFILL_FUSE=0 (two-pass) and unset
#                 (the one-pass default) (CASES random cases), then memcheck + racecheck on the fused-prefill tests (not in
#                 the default list: run it by name)
#   nblocks       the blocks-along-N prototype GEMV: its harness tests, then benchmarks/nblocks_bench.py (against the op's
#                 decode on blocks along K and cuBLAS fp16; not in the default list: run it by name)
set -o pipefail
R=${OUT:-runs/device}; mkdir -p "$R"; H=build/ops/libacttail_bench.so
BUDGET=${BUDGET:-540}; CASES=${CASES:-200}; t0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - t0))); }
lim() { local l; l=$(left); [ "$l" -lt 1 ] && l=1; [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }  # never 0: timeout 0 = no limit
source benchmarks/device/env.sh || exit 1
[ -f "$H" ] || { echo "no $H: env.sh did not build the harness"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$R/gpu.txt"
F="UserWarning\|_warn_once\|warnings.warn"
for s in ${*:-nbits-test nbits-check dense-test dense-check nbits-decode dense-sweep nbits-sweep sanitize}; do
  [ "$(left)" -gt 20 ] || { echo "== $s skipped: budget spent"; continue; }
  echo "== $s ($(($(date +%s) - t0)) s)"
  case $s in
    nbits-test)
      ACTTAIL_BENCH_LIB=$H ACTTAIL_CUDA_CASES=$CASES timeout "$(lim 150)" python3 -m pytest -q --maxfail=20 -p no:cacheprovider \
        tests/test_ops_nbits_cuda.py 2>&1 | grep -v "$F" > "$R/nbits_pytest.log"; tail -4 "$R/nbits_pytest.log" ;;
    nbits-check)
      ACTTAIL_BENCH_LIB=$H timeout "$(lim 60)" python3 -m pytest -q -p no:cacheprovider tests/test_ops_nbits_harness.py 2>&1 \
        | grep -v "$F" | tail -4 ;;
    dense-test)
      timeout "$(lim 150)" python3 -m pytest -q --maxfail=20 -p no:cacheprovider tests/test_ops_cuda.py tests/test_ops_cuda_decode.py \
        2>&1 | grep -v "$F" > "$R/dense_pytest.log"; tail -4 "$R/dense_pytest.log" ;;
    dense-check) timeout "$(lim 60)" python3 scripts/check_cuda_kernels.py "$H" --cases 300 2>&1 | tail -2 ;;
    nbits-decode)
      timeout "$(lim 120)" python3 benchmarks/kernel_bench_nbits.py --harness "$H" --rows 1 --floor --ort-sparsities 0 \
        --out "$R/nbits_decode" > "$R/nbits_decode.log" 2>&1; tail -14 "$R/nbits_decode.log" ;;
    dense-sweep)
      mkdir -p "$R/dense_sweep"; cp csrc/sparse_matmul/gemv_table.h "$R/dense_sweep/gemv_table.h"
      timeout "$(lim 200)" python3 benchmarks/kernel_bench.py --harness "$H" --sweep --out "$R/dense_sweep" \
        --write-table "$R/dense_sweep/gemv_table.h" > "$R/dense_sweep.log" 2>&1; tail -12 "$R/dense_sweep.log" ;;
    nbits-sweep)
      timeout "$(lim 150)" python3 benchmarks/kernel_bench_nbits.py --harness "$H" --no-ort --sweep --out "$R/nbits_sweep" \
        > "$R/nbits_sweep.log" 2>&1; tail -8 "$R/nbits_sweep.log" ;;
    sanitize|nbits-sanitize)
      for tool in memcheck racecheck; do
        ACTTAIL_BENCH_LIB=$H timeout "$(lim 90)" compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
          tests/test_ops_nbits_harness.py -k "harness_paths and float16" > "$R/nbits_$tool.log" 2>&1
        echo "nbits $tool: exit $? ($(grep -c -E '^========= (Invalid|Race|Error)' "$R/nbits_$tool.log") reports)"
        [ "$s" = nbits-sanitize ] && continue
        timeout "$(lim 60)" compute-sanitizer --tool "$tool" --error-exitcode 3 python3 scripts/check_cuda_kernels.py "$H" \
          --cases 24 --max-m 8 --seed 4 > "$R/dense_$tool.log" 2>&1
        echo "dense $tool: exit $? ($(grep -c -E '^========= (Invalid|Race|Error)' "$R/dense_$tool.log") reports)"
      done ;;
    prefill-fuse)
      PF="tests/test_ops_cuda.py tests/test_ops_swiglu_cuda.py tests/test_ops_nbits_cuda.py"
      K="prefill or matches_reference or never_reach or accumulates"
      for fuse in 0 unset; do
        [ "$(left)" -gt 20 ] || { echo "ACTTAIL_PREFILL_FUSE=$fuse skipped: budget spent"; continue; }
        if [ $fuse = 0 ]; then export ACTTAIL_PREFILL_FUSE=0; else unset ACTTAIL_PREFILL_FUSE; fi
        ACTTAIL_CUDA_CASES=$CASES timeout "$(lim 150)" python3 -m pytest -q --maxfail=20 -p no:cacheprovider $PF -k "$K" \
          2>&1 | grep -v "$F" > "$R/prefill_env_$fuse.log"; echo "ACTTAIL_PREFILL_FUSE=$fuse: $(tail -1 "$R/prefill_env_$fuse.log")"
      done
      for tool in memcheck racecheck; do  # ACTTAIL_PREFILL_FUSE is unset here (fused); the tests set it themselves too
        [ "$(left)" -gt 20 ] || { echo "prefill $tool skipped: budget spent"; continue; }
        ACTTAIL_CUDA_CASES=15 timeout "$(lim 120)" compute-sanitizer --tool "$tool" --error-exitcode 3 --target-processes all \
          python3 -m pytest -q -p no:cacheprovider $PF -k "mask_pass or batched_gemm or falls_back" > "$R/prefill_$tool.log" 2>&1
        echo "prefill $tool: exit $? ($(grep -c -E '^========= (Invalid|Race|Error)' "$R/prefill_$tool.log") reports)"
      done
      unset ACTTAIL_PREFILL_FUSE ;;
    nblocks)
      ACTTAIL_BENCH_LIB=$H timeout "$(lim 90)" python3 -m pytest -q -p no:cacheprovider tests/test_ops_nbits_harness.py \
        -k "nblocks or along_n" 2>&1 | grep -v "$F" > "$R/nblocks_pytest.log"; tail -3 "$R/nblocks_pytest.log"
      timeout "$(lim 270)" python3 benchmarks/nblocks_bench.py --harness "$H" --out "$R/nblocks" --sparsities 0,0.5,0.8,0.9 --blocks 64 \
        --shapes 4096x11008,11008x4096,4096x4096,4096x14336,14336x4096 > "$R/nblocks_bench.log" 2>&1
      tail -30 "$R/nblocks_bench.log" ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "done in $(($(date +%s) - t0)) s"
# at most 8 files come back from the lent machine: everything in one archive
tar czf /tmp/kernels_session.tgz -C "$R" . && rm -rf "${R:?}"/* && mv /tmp/kernels_session.tgz "$R/"
