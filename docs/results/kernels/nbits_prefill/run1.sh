#!/usr/bin/env bash
# device: base build (HEAD's csrc, .base/) and the working tree's build, then the M=512 prefill benchmark of both
set -o pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
t0=$(date +%s)
R=$PWD
( cd .base && ACTTAIL_CUDA=1 ACTTAIL_BENCH=1 ACTTAIL_CUDA_ARCHS=90 ACTTAIL_BUILD_DIR=build/base ACTTAIL_INSTALL=0 \
  ONNXRUNTIME_INCLUDE_DIR=$R/third_party/onnxruntime/include CUBLAS_INCLUDE_DIR=$R/third_party/cublas/include \
  bash scripts/build_ops.sh > "$O/build_base.log" 2>&1; echo "base build rc $?" >> "$O/build_base.log" ) &
source benchmarks/device/env.sh || { cat /tmp/acttail_build_ops.log | tail -20; exit 1; }
wait
tail -2 "$O/build_base.log"; echo "builds done $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
SH=${SHAPES:-4096x4096,4096x11008,11008x4096,4096x14336,14336x4096}
PYTHONUNBUFFERED=1 timeout ${BT:-330} python3 benchmarks/kernel_bench_nbits.py --harness build/ops/libacttail_bench.so \
  --base-harness .base/build/base/libacttail_bench.so --rows 512 --shapes $SH --sparsities ${SP:-0,0.5} --ort-sparsities 0 \
  --reps ${REPS:-10} --runs ${RUNS:-10} --out "$O/prefill" 2>&1 | tee "$O/prefill.log" | grep -v "^ *$" | cut -c1-400
echo "done $(( $(date +%s) - t0 )) s"
