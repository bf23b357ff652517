// Exact masked GEMM (prefill, M > 8): tiled, float32 accumulation, masked rows of W skipped.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// prefill: masked tiled GEMM (64x64 tile, 16-deep K slices, 4x4 outputs per thread)
// ------------------------------------------------------------------------------------------------
constexpr int kBM = 64, kBN = 64, kBK = 16, kGemmThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kGemmThreads) MaskedGemmKernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                                                 int M, int K, int N, int ld, DeviceMask dm, int g,
                                                                 const unsigned* __restrict__ run_if) {
  // Y[:, 0:N] (row stride ld) = mask_g(X) @ W[:, 0:N] (row stride ld): one member's column slice.
  // run_if (may be null): a device flag; when it is 0 the kernel does nothing (the float16 tensor-core
  // kernel already wrote Y and found W finite, masked_gemm_tc.cuh), else this exact kernel overwrites Y.
  if (run_if != nullptr && *run_if == 0u) return;
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int row0 = blockIdx.y * kBM, col0 = blockIdx.x * kBN;
  // each thread loads 4 A elements (rows ar + 16*j, column ak) and 4 B elements
  const int ak = tid % kBK, ar = tid / kBK;
  const int bn = tid % kBN, bk = tid / kBN;
  Rule rule[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) rule[j] = LoadRule(dm, row0 + ar + 16 * j, M, g);
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = row0 + ar + 16 * j, c = k0 + ak;
      As[ak][ar + 16 * j] = r < M && c < K ? MaskedValue(x[(int64_t)r * K + c], c, rule[j], dm) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = k0 + bk + 4 * j, c = col0 + bn;
      Bs[bk + 4 * j][bn] = (r < K && c < N) ? Traits<T>::ToFloat(w[(int64_t)r * ld + c]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) { a[i] = As[kk][ty * 4 + i]; b[i] = Bs[kk][tx * 4 + i]; }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (IsKeptValue(a[i])) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);  // dropped / zero x: row of W not used
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + ty * 4 + i;
    if (r >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + tx * 4 + j;
      if (c < N) y[(int64_t)r * ld + c] = Traits<T>::FromFloat(acc[i][j]);
    }
  }
}

}  // namespace cuda
}  // namespace acttail
