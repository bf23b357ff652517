#!/usr/bin/env bash
# Build acttail_export/lib/libacttail_ops.so and libacttail_ops.json (called by `make ops` and CI).
#   ONNXRUNTIME_INCLUDE_DIR  ORT C/C++ headers (API 21); default: fetched by scripts/fetch_ort_headers.sh
#   ACTTAIL_CUDA             1: build the CUDA kernels (fail without nvcc), 0: CPU only,
#                            unset: CUDA kernels when nvcc is found (PATH or /usr/local/cuda/bin)
#   ACTTAIL_CUDA_ARCHS       CUDA architectures, default "80;86;89;90" (machine code for each, plus PTX of the last)
#   CUBLAS_INCLUDE_DIR       folder with cublas_api.h; default: the toolkit's, else scripts/fetch_cublas_headers.sh
#   ACTTAIL_BUILD_TYPE       Release (default) or Debug (device-side checks such as the decode scratch invariant)
#   ACTTAIL_BENCH            1: also build the CUDA benchmark harness $ACTTAIL_BUILD_DIR/libacttail_bench.so
#   ACTTAIL_BUILD_DIR        CMake build folder, default build/ops
#   ACTTAIL_INSTALL          0: leave acttail_export/lib alone (a second build, e.g. Debug, in its own folder)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
inc="${ONNXRUNTIME_INCLUDE_DIR:-$(bash scripts/fetch_ort_headers.sh)}"
build="${ACTTAIL_BUILD_DIR:-build/ops}"
btype="${ACTTAIL_BUILD_TYPE:-Release}"
case "$btype" in Release|Debug) ;; *) echo "build_ops: ACTTAIL_BUILD_TYPE must be Release or Debug, got '$btype'" >&2; exit 2 ;; esac

nvcc_path="$(command -v nvcc || true)"
[ -z "$nvcc_path" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc_path=/usr/local/cuda/bin/nvcc
case "${ACTTAIL_CUDA:-auto}" in
  1|ON|on|yes) [ -n "$nvcc_path" ] || { echo "build_ops: ACTTAIL_CUDA=1 but nvcc was not found; install the CUDA toolkit or unset ACTTAIL_CUDA" >&2; exit 2; }; cuda=ON ;;
  0|OFF|off|no) cuda=OFF ;;
  auto) if [ -n "$nvcc_path" ]; then cuda=ON; else cuda=OFF; fi ;;
  *) echo "build_ops: ACTTAIL_CUDA must be 1, 0 or unset, got '$ACTTAIL_CUDA'" >&2; exit 2 ;;
esac

args=(-S . -B "$build" -DCMAKE_BUILD_TYPE="$btype" -DONNXRUNTIME_INCLUDE_DIR="$inc" -DACTTAIL_CUDA="$cuda")
command -v ninja >/dev/null && [ ! -f "$build/CMakeCache.txt" ] && args+=(-G Ninja)
if [ "$cuda" = ON ]; then
  archs="${ACTTAIL_CUDA_ARCHS:-80;86;89;90}"
  # machine code for every architecture, PTX for the newest so that later GPUs JIT-compile it
  last="${archs##*;}"
  cmake_archs="$(echo "$archs" | sed -E 's/([0-9]+a?)/\1-real/g');$last-virtual"
  nvcc_real="$(readlink -f "$nvcc_path")"
  cublas="${CUBLAS_INCLUDE_DIR:-}"
  if [ -z "$cublas" ] && [ ! -f "$(dirname "$nvcc_real")/../include/cublas_api.h" ]; then
    cublas="$(bash scripts/fetch_cublas_headers.sh)"
  fi
  args+=(-DCMAKE_CUDA_COMPILER="$nvcc_real" -DCMAKE_CUDA_ARCHITECTURES="$cmake_archs" -DCUBLAS_INCLUDE_DIR="$cublas"
         -DACTTAIL_BENCH="$([ "${ACTTAIL_BENCH:-0}" = 1 ] && echo ON || echo OFF)")
fi
start=$(date +%s)
cmake "${args[@]}" >/dev/null
cmake --build "$build" -j "$(nproc)"
where="$build"
if [ "${ACTTAIL_INSTALL:-1}" != 0 ]; then
  mkdir -p acttail_export/lib
  cp "$build/libacttail_ops.so" acttail_export/lib/libacttail_ops.so
  cp "$build/libacttail_ops.json" acttail_export/lib/libacttail_ops.json
  where=acttail_export/lib
fi
echo "build_ops: $where/libacttail_ops.so + .json (CUDA kernels: $cuda${archs:+, archs $archs}, $btype) in $(( $(date +%s) - start )) s"
