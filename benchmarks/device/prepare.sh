#!/usr/bin/env bash
# On the development machine (no GPU needed), from the project root: prepare what an offline CUDA
# machine needs to validate and benchmark the op library, into git-ignored folders:
#   .whl/site   transformers / optimum pins for the decode benchmark (cp312 wheels)
#   .whl/genai  onnxruntime-genai-cuda + onnx_ir (the optimized decode base)
#   third_party/onnxruntime/include ONNX Runtime headers (scripts/fetch_ort_headers.sh)
#   third_party/cublas/include      cuBLAS headers (scripts/fetch_cublas_headers.sh; the op library and the kernel
#                                   harness build/ops/libacttail_bench.so are built on the CUDA machine by env.sh)
# onnxruntime-gpu itself (255 MB) travels in parts: see benchmarks/device/README.md.
# Env: DEVICE_PYTHON (3.12), CUDA_ARCH (90).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYV=${DEVICE_PYTHON:-3.12}; ARCH=${CUDA_ARCH:-90}
P=(--no-deps --only-binary=:all: --python-version "$PYV" --implementation cp
   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p .whl/site .whl/genai
python3 -m pip download -q "${P[@]}" -d .whl/site transformers==4.57.6 tokenizers==0.22.2 \
  huggingface_hub==0.36.2 optimum==2.1.0 optimum-onnx==0.1.0 gguf==0.19.0
python3 -m pip download -q "${P[@]}" -d .whl/genai onnxruntime-genai-cuda==0.18.0 onnx_ir==1.1.0
[ -d third_party/onnxruntime/include ] || bash scripts/fetch_ort_headers.sh
bash scripts/fetch_cublas_headers.sh >/dev/null
echo "prepare: .whl/ ($(du -sh .whl | cut -f1)), ORT and cuBLAS headers in third_party/ (build for sm_$ARCH on the CUDA machine)"
