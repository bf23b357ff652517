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

/// Device workspace the op would allocate for this problem (bytes).
extern "C" __attribute__((visibility("default"))) long long acttail_bench_workspace_bytes(long long M, long long K, long long N, int topk) {
  return (long long)acttail::CudaWorkspaceBytes(M, K, N, topk ? acttail::Mode::kTopK : acttail::Mode::kThreshold);
}

/// The op's CUDA path; `variant` selects a decode-kernel variant (0 = the shipped one; 1-3: see LaunchDecode)
/// or, with 4, the prefill path without cuBLAS (the op's own tensor-core / exact GEMM kernels).
extern "C" __attribute__((visibility("default"))) int acttail_bench_sparse_matmul(
    int half, const void* x, const void* w, void* y, const float* threshold, void* workspace, void* stream, long long M,
    long long K, long long N, int topk, long long k, int variant, char* err, int err_len) {
  acttail::CudaArgs a;
  a.gemv_variant = variant == 4 ? 0 : variant;
  a.prefill_variant = variant == 4 ? 1 : 0;
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

namespace {
/// Streams `n` 16-byte words (evict-first loads, 8 in flight per thread) and folds them into one word
/// per block, so nothing is optimized away: the floor for reading that many bytes once.
__global__ void __launch_bounds__(512) ReadFloorKernel(const uint4* __restrict__ p, long long n, unsigned* __restrict__ sink) {
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 7 * stride < n; i += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if ((threadIdx.x & 31) == 0) atomicXor(sink + blockIdx.x % 64, acc);
}
}  // namespace

/// Read `bytes` (multiple of 16) from `p` once: the bandwidth floor the GEMV kernels are compared with.
extern "C" __attribute__((visibility("default"))) int acttail_bench_read_floor(const void* p, long long bytes, void* sink, int blocks,
                                                                              void* stream, char* err, int err_len) {
  ReadFloorKernel<<<blocks, 512, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const uint4*>(p), bytes / 16,
                                                                          static_cast<unsigned*>(sink));
  const cudaError_t e = cudaGetLastError();
  return Report(e == cudaSuccess ? "" : cudaGetErrorString(e), err, err_len);
}
