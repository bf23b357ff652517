// Standalone entry points for benchmarks/kernel_bench.py (ctypes), built from the same kernels as
// the op library but outside ONNX Runtime, so that launches can be captured in CUDA graphs:
//   nvcc -O3 -shared -Xcompiler -fPIC -cudart shared -gencode arch=compute_90,code=sm_90 \
//        -Icsrc csrc/sparse_matmul_impl.cu csrc/sparse_matmul_bench.cu -o libacttail_bench.so
// Not part of libacttail_ops.so.
#include <cstring>
#include <string>

#include "sparse_matmul.h"
#include "sparse_matmul_impl.cuh"

namespace {
int Report(const std::string& err, char* buf, int len) {
  if (err.empty()) return 0;
  if (buf != nullptr && len > 0) {
    std::strncpy(buf, err.c_str(), (size_t)len - 1);
    buf[len - 1] = '\0';
  }
  return 1;
}
}  // namespace

extern "C" __attribute__((visibility("default"))) int acttail_bench_sparse_matmul(
    int half, const void* x, const void* w, void* y, const float* threshold, void* workspace, void* stream, long long M,
    long long K, long long N, int topk, long long k, char* err, int err_len) {
  acttail::CudaArgs a;
  a.x = x; a.w = w; a.y = y; a.threshold = threshold; a.workspace = workspace; a.stream = stream;
  a.M = M; a.K = K; a.N = N; a.mode = topk ? acttail::Mode::kTopK : acttail::Mode::kThreshold; a.k = k;
  return Report(acttail::SparseMatMulCuda(half != 0, a), err, err_len);
}

/// Only the top-k selection kernel (to time the selection cost separately).
extern "C" __attribute__((visibility("default"))) int acttail_bench_topk_select(int half, const void* x, void* sel, void* stream,
                                                                               long long M, long long K, long long k, char* err,
                                                                               int err_len) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e = half ? acttail::cuda::LaunchTopKSelect(static_cast<const __half*>(x), M, K, k, static_cast<uint2*>(sel), s)
                       : acttail::cuda::LaunchTopKSelect(static_cast<const float*>(x), M, K, k, static_cast<uint2*>(sel), s);
  return Report(e == cudaSuccess ? "" : cudaGetErrorString(e), err, err_len);
}
