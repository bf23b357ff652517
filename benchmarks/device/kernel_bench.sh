#!/usr/bin/env bash
# On the CUDA machine, from the project root (after `source benchmarks/device/env.sh`): the kernel benchmarks of
# docs/kernels.md. JSON + logs in ${OUT:-runs/device}/bench/. Two commands, each inside 8 minutes:
#   bash benchmarks/device/kernel_bench.sh sweep   # decode GEMV parameter sweep -> csrc/sparse_matmul/gemv_table.h
#                                                  # (also copied to $OUT/bench/sweep/), rebuild, then the 5 shapes
#                                                  # with the new table vs cuBLAS (threshold mode, no ORT rows)
#   bash benchmarks/device/kernel_bench.sh         # decode with ORT rows (x rotated), x L2-resident + read floor, prefill
set -o pipefail
R=${OUT:-runs/device}/bench; H=${HARNESS:-build/ops/libacttail_bench.so}; t0=$(date +%s)
if [ "${1:-bench}" = sweep ]; then
  mkdir -p "$R/sweep" "$R/tuned"
  echo "== decode GEMV sweep"
  timeout 330 python3 benchmarks/kernel_bench.py --harness "$H" --sweep --out "$R/sweep" --write-table csrc/sparse_matmul/gemv_table.h \
    > "$R/sweep/log.txt" 2>&1; tail -12 "$R/sweep/log.txt"
  cp csrc/sparse_matmul/gemv_table.h "$R/sweep/gemv_table.h"
  echo "== rebuild with the table ($(($(date +%s)-t0)) s)"
  ACTTAIL_CUDA=1 ACTTAIL_BENCH=1 ACTTAIL_CUDA_ARCHS=${CUDA_ARCH:-90} ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR:-$PWD/third_party/onnxruntime/include} \
    bash scripts/build_ops.sh 2>&1 | tail -1
  find csrc CMakeLists.txt -type f | sort | xargs cat | sha1sum | cut -c1-40 > acttail_export/lib/.csrc.sha1  # env.sh: built
  echo "== the 5 shapes with the table, x rotated ($(($(date +%s)-t0)) s)"
  timeout 150 python3 benchmarks/kernel_bench.py --harness "$H" --no-ort --modes threshold --out "$R/tuned" > "$R/tuned/log.txt" 2>&1
  python3 benchmarks/kernel_bench.py --table "$R/tuned/kernel_bench.json" | head -32
  echo "done in $(($(date +%s)-t0)) s"
  exit 0
fi
mkdir -p "$R/rotating" "$R/hot" "$R/prefill"
echo "== decode, x rotated, with the ONNX Runtime rows"
timeout 240 python3 benchmarks/kernel_bench.py --harness "$H" --out "$R/rotating" > "$R/rotating/log.txt" 2>&1; tail -25 "$R/rotating/log.txt"
echo "== decode, x L2-resident, streaming-read floor ($(($(date +%s)-t0)) s)"
timeout 150 python3 benchmarks/kernel_bench.py --harness "$H" --no-ort --hot-x --floor --modes threshold --out "$R/hot" > "$R/hot/log.txt" 2>&1; tail -25 "$R/hot/log.txt"
echo "== prefill, 512 rows ($(($(date +%s)-t0)) s)"
timeout 200 python3 benchmarks/kernel_bench.py --harness "$H" --no-ort --prefill --variants 0,4 --modes threshold,topk --out "$R/prefill" > "$R/prefill/log.txt" 2>&1; tail -25 "$R/prefill/log.txt"
echo "done in $(($(date +%s)-t0)) s"
