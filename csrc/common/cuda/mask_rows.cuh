// The mask applied into a copy of X (prefill through cuBLAS), and the scan of a GEMM output for Inf/NaN.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// prefill through cuBLAS (sparse_matmul_impl.cu): the mask applied into a copy of X, and a scan of the
// GEMM's output for Inf/NaN that arms the exact kernel below
// ------------------------------------------------------------------------------------------------
/// xm = mask(x) over [M, K] (masked, zero and NaN entries -> +0, kept entries copied bit for bit);
/// grid (column blocks, rows), rows strided by gridDim.y. Also zeroes *flag for LaunchFlagNonFinite,
/// which runs after the GEMM on the same stream.
template <typename T>
__global__ void __launch_bounds__(256) MaskRowsKernel(const T* __restrict__ x, T* __restrict__ xm, int64_t M, int K,
                                                      const float* __restrict__ thr, const uint2* __restrict__ sel, bool topk,
                                                      unsigned* __restrict__ flag) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *flag = 0u;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const Rule r = LoadRule(0, 1, topk, thr, sel ? sel + m : nullptr);
    const T* xr = x + m * K;
    T* out = xm + m * K;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < K; c += gridDim.x * blockDim.x) {
      const T v = xr[c];
      out[c] = Keep(v, c, r, topk) ? v : Traits<T>::FromFloat(0.0f);
    }
  }
}

/// MaskRowsKernel on 16-byte vectors (x, xm 16-byte aligned, K a multiple of the vector width): one
/// load and one store per 16 bytes, where the scalar kernel moves 2 or 4 bytes per instruction.
template <typename T>
__global__ void __launch_bounds__(256) MaskRowsVecKernel(const T* __restrict__ x, T* __restrict__ xm, int64_t M, int K,
                                                         const float* __restrict__ thr, const uint2* __restrict__ sel, bool topk,
                                                         unsigned* __restrict__ flag) {
  constexpr int V = Traits<T>::kVec;
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *flag = 0u;
  const int kv = K / V;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const Rule r = LoadRule(0, 1, topk, thr, sel ? sel + m : nullptr);
    const uint4* xr = reinterpret_cast<const uint4*>(x + m * K);
    uint4* out = reinterpret_cast<uint4*>(xm + m * K);
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < kv; c += gridDim.x * blockDim.x) {
      union {
        uint4 u;
        T e[V];
      } v;
      v.u = __ldcs(xr + c);
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (!Keep(v.e[i], c * V + i, r, topk)) v.e[i] = Traits<T>::FromFloat(0.0f);
      out[c] = v.u;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) FlagNonFiniteKernel(const T* __restrict__ y, int64_t n, unsigned* __restrict__ flag) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x, tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  bool bad = false;
  if (reinterpret_cast<uintptr_t>(y) % 16 == 0) {
    const int64_t words = n * (int64_t)sizeof(T) / 16;
    const uint4* p = reinterpret_cast<const uint4*>(y);
    for (int64_t i = tid; i < words; i += stride) {
      const uint4 v = __ldcs(p + i);
      bad |= NonFiniteWord<T>(v.x) | NonFiniteWord<T>(v.y) | NonFiniteWord<T>(v.z) | NonFiniteWord<T>(v.w);
    }
    for (int64_t i = words * 16 / (int64_t)sizeof(T) + tid; i < n; i += stride) bad |= !isfinite(Traits<T>::ToFloat(y[i]));
  } else {
    for (int64_t i = tid; i < n; i += stride) bad |= !isfinite(Traits<T>::ToFloat(y[i]));
  }
  if (bad) atomicOr(flag, 1u);
}

/// Grid of a grid-stride elementwise kernel of 256 threads over n items.
template <typename T>
cudaError_t LaunchMaskRows(const T* x, T* xm, int64_t M, int64_t K, const float* thr, const uint2* sel, bool topk, unsigned* flag,
                           cudaStream_t stream) {
  constexpr int V = Traits<T>::kVec;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(xm) % 16 == 0 && K % V == 0) {
    const dim3 grid((unsigned)std::min<int64_t>((K / V + 255) / 256, 64), (unsigned)std::min<int64_t>(M, 65535));
    MaskRowsVecKernel<T><<<grid, 256, 0, stream>>>(x, xm, M, (int)K, thr, sel, topk, flag);
    return cudaGetLastError();
  }
  const dim3 grid((unsigned)std::min<int64_t>((K + 255) / 256, 64), (unsigned)std::min<int64_t>(M, 65535));
  MaskRowsKernel<T><<<grid, 256, 0, stream>>>(x, xm, M, (int)K, thr, sel, topk, flag);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchFlagNonFinite(const T* y, int64_t n, unsigned* flag, cudaStream_t stream) {
  FlagNonFiniteKernel<T><<<ElementwiseBlocks(n * (int64_t)sizeof(T) / 16 + 1), 256, 0, stream>>>(y, n, flag);
  return cudaGetLastError();
}


}  // namespace cuda
}  // namespace acttail
