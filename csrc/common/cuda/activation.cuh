// Device side of the op input's activation (common/activation.h): the value of one element read from X [M, 2K]
// = [gate | up] inside a kernel, and a kernel writing silu(gate) * up [M, K] into a workspace for the paths that
// read x more than once (top-k selection, prefill).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/activation.h"
#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace cuda {

/// silu(gate) * up rounded to T: the op's input where X holds [gate | up].
template <typename T>
__device__ __forceinline__ T SwiGluOf(T gate, T up) {
  return Traits<T>::FromFloat(SwiGlu(Traits<T>::ToFloat(gate), Traits<T>::ToFloat(up)));
}

/// silu(gate) * up of element (m, c), rounded to T, from X [M, 2K].
template <typename T>
__device__ __forceinline__ T SwiGluAt(const T* __restrict__ x, int64_t m, int c, int K) {
  const T* row = x + m * 2 * (int64_t)K;
  return SwiGluOf<T>(row[c], row[K + c]);
}

template <typename T>
__global__ void SwiGluKernel(const T* __restrict__ x, T* __restrict__ out, int64_t M, int K) {
  const int64_t n = M * K;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = SwiGluAt<T>(x, i / K, (int)(i % K), K);
}

/// out [M, K] = silu(gate) * up of X [M, 2K], on `stream`.
template <typename T>
cudaError_t LaunchSwiGlu(const T* x, T* out, int64_t M, int64_t K, cudaStream_t stream) {
  if (M * K == 0) return cudaSuccess;
  SwiGluKernel<T><<<ElementwiseBlocks(M * K), 256, 0, stream>>>(x, out, M, (int)K);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace acttail
