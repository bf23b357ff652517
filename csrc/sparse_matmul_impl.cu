// Host launchers of the CUDA kernels (see sparse_matmul_impl.cuh): decode GEMV for M <= 8 rows,
// masked tiled GEMM otherwise, preceded by the top-k selection kernel in topk mode. Everything is
// enqueued on the caller's stream; no host synchronization, every launch checked.
#include <algorithm>
#include <string>

#include "sparse_matmul.h"
#include "sparse_matmul_impl.cuh"

namespace acttail {

namespace {

/// Multiprocessor count of the current device (cached per device).
int CurrentSms() {
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  if (cache[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 1;
    cache[dev] = sms;
  }
  return cache[dev];
}


template <typename T, int MR, int LPR>
cudaError_t LaunchGemvLpr(const CudaArgs& a, const uint2* sel, cudaStream_t stream) {
  constexpr int TN = LPR * cuda::Traits<T>::kVec;
  const bool x_aligned = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && (a.K * sizeof(T)) % 16 == 0;
  const bool w_aligned = reinterpret_cast<uintptr_t>(a.w) % 16 == 0 && (a.N * sizeof(T)) % 16 == 0;
  const unsigned blocks = (unsigned)((a.N + TN - 1) / TN);
  cuda::SparseGemvKernel<T, MR, LPR><<<blocks, cuda::kGemvThreads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.w), static_cast<T*>(a.y), (int)a.M, (int)a.K, (int)a.N, a.threshold, sel,
      a.mode == Mode::kTopK, x_aligned, w_aligned);
  return cudaGetLastError();
}

/// 128-byte row segments (LPR 8) when that still gives a block to every multiprocessor, else 64-byte
/// segments (LPR 4) for twice the blocks (measured on H200: docs/kernels.md).
template <typename T, int MR>
cudaError_t LaunchGemv(const CudaArgs& a, const uint2* sel, cudaStream_t stream) {
  const int64_t wide_blocks = (a.N + 8 * cuda::Traits<T>::kVec - 1) / (8 * cuda::Traits<T>::kVec);
  return wide_blocks >= CurrentSms() ? LaunchGemvLpr<T, MR, 8>(a, sel, stream) : LaunchGemvLpr<T, MR, 4>(a, sel, stream);
}

template <typename T>
std::string Run(const CudaArgs& a) {
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  if (a.M == 0 || a.N == 0) return "";
  if (a.K > (int64_t)INT32_MAX || a.N > (int64_t)INT32_MAX || a.M > (int64_t)INT32_MAX / 2)
    return "problem too large for 32-bit indexing (M, K, N must each be < 2^31)";
  const uint2* sel = nullptr;
  if (a.mode == Mode::kTopK) {
    if (a.M > 65535 * 1024LL) return "too many rows for the top-k kernel";
    uint2* out = static_cast<uint2*>(a.workspace);
    cudaError_t err = cuda::LaunchTopKSelect<T>(static_cast<const T*>(a.x), a.M, a.K, a.k, out, stream);
    if (err != cudaSuccess) return std::string("top-k selection kernel: ") + cudaGetErrorString(err);
    sel = out;
  }
  cudaError_t err;
  if (a.M <= 8) {
    if (a.M == 1) err = LaunchGemv<T, 1>(a, sel, stream);
    else if (a.M == 2) err = LaunchGemv<T, 2>(a, sel, stream);
    else if (a.M <= 4) err = LaunchGemv<T, 4>(a, sel, stream);
    else err = LaunchGemv<T, 8>(a, sel, stream);
    if (err != cudaSuccess) return std::string("sparse GEMV kernel: ") + cudaGetErrorString(err);
  } else {
    const dim3 grid((unsigned)((a.N + cuda::kBN - 1) / cuda::kBN), (unsigned)((a.M + cuda::kBM - 1) / cuda::kBM));
    if (grid.y > 65535) return "too many rows for the GEMM grid (M > 4194240)";
    cuda::MaskedGemmKernel<T><<<grid, cuda::kGemmThreads, 0, stream>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.w),
                                                                     static_cast<T*>(a.y), (int)a.M, (int)a.K, (int)a.N, a.threshold,
                                                                     sel, a.mode == Mode::kTopK);
    err = cudaGetLastError();
    if (err != cudaSuccess) return std::string("masked GEMM kernel: ") + cudaGetErrorString(err);
  }
  return "";
}

}  // namespace

size_t CudaWorkspaceBytes(int64_t M, int64_t /*K*/, int64_t /*N*/, Mode mode) {
  return mode == Mode::kTopK ? (size_t)M * sizeof(uint2) : 0;
}

std::string SparseMatMulCuda(bool half, const CudaArgs& args) {
  return half ? Run<__half>(args) : Run<float>(args);
}

}  // namespace acttail
