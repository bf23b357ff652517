// Prefill through cuBLAS: the mask of one member applied into a copy of X (xm), or of every member in one pass
// (optionally computing the SwiGLU input on the way), and a scan of the GEMM's
// output for Inf/NaN that arms the exact kernel (a masked x times an Inf/NaN weight gives NaN in a dense
// GEMM, where the rule skips the row; any such weight makes its whole column of Y non-finite, so a finite
// Y proves the dense result exact).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda/activation.cuh"
#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace cuda {

/// Members whose masks one MaskGroupsVecKernel pass writes (q / k / v: 3, gate / up: 2).
constexpr int kMaxMaskGroups = 4;

/// xm = mask_g(x) over [M, K] (dropped, zero and NaN entries -> +0, kept entries x * f rounded to T); grid
/// (column blocks, rows), rows strided by gridDim.y. Also zeroes *flag for LaunchFlagNonFinite, which
/// runs after the GEMM on the same stream.
template <typename T>
__global__ void __launch_bounds__(256) MaskRowsKernel(const T* __restrict__ x, T* __restrict__ xm, int64_t M, int K, DeviceMask dm,
                                                      int g, unsigned* __restrict__ flag) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *flag = 0u;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const Rule r = LoadRule(dm, m, M, g);
    const T* xr = x + m * K;
    T* out = xm + m * K;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < K; c += gridDim.x * blockDim.x) {
      const float v = MaskedValue(xr[c], c, r, dm);
      out[c] = dm.ramp == 0.0f && IsKeptValue(v) ? xr[c] : Traits<T>::FromFloat(IsKeptValue(v) ? v : 0.0f);
    }
  }
}

/// MaskRowsKernel on 16-byte vectors (x, xm 16-byte aligned, K a multiple of the vector width): one
/// load and one store per 16 bytes, where the scalar kernel moves 2 or 4 bytes per instruction.
template <typename T>
__global__ void __launch_bounds__(256) MaskRowsVecKernel(const T* __restrict__ x, T* __restrict__ xm, int64_t M, int K, DeviceMask dm,
                                                         int g, unsigned* __restrict__ flag) {
  constexpr int V = Traits<T>::kVec;
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *flag = 0u;
  const int kv = K / V;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const Rule r = LoadRule(dm, m, M, g);
    const uint4* xr = reinterpret_cast<const uint4*>(x + m * K);
    uint4* out = reinterpret_cast<uint4*>(xm + m * K);
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < kv; c += gridDim.x * blockDim.x) {
      union {
        uint4 u;
        T e[V];
      } v;
      v.u = __ldcs(xr + c);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float mv = MaskedValue(v.e[i], c * V + i, r, dm);
        if (!IsKeptValue(mv)) v.e[i] = Traits<T>::FromFloat(0.0f);
        else if (dm.ramp != 0.0f) v.e[i] = Traits<T>::FromFloat(mv);
      }
      out[c] = v.u;
    }
  }
}

/// The prefill's one pass over X for every member: xm[g] = mask_g(x) ([groups, M, K], group g at g * M * K) on 16-byte
/// vectors (x, xm 16-byte aligned, K a multiple of the vector width), so that X is read once however many members
/// have their own rule. With kSwiGlu, X is [M, 2K] = [gate | up] and x = silu(gate) * up is computed here, rounded to T
/// by SwiGluOf, as the activation kernel (common/cuda/activation.cuh) rounds it: the same xm as the activation kernel followed by
/// MaskRowsVecKernel, in one pass. Also zeroes *flag.
template <typename T, bool kSwiGlu>
__global__ void __launch_bounds__(256) MaskGroupsVecKernel(const T* __restrict__ x, T* __restrict__ xm, int64_t M, int K, DeviceMask dm,
                                                           int groups, unsigned* __restrict__ flag) {
  constexpr int V = Traits<T>::kVec;
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *flag = 0u;
  const int kv = K / V;
  const int64_t plane = M * K / V;  // vectors per group
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    Rule r[kMaxMaskGroups];
#pragma unroll
    for (int g = 0; g < kMaxMaskGroups; ++g)
      if (g < groups) r[g] = LoadRule(dm, m, M, g);
    const uint4* xr = reinterpret_cast<const uint4*>(x + m * (kSwiGlu ? 2 : 1) * (int64_t)K);
    uint4* out = reinterpret_cast<uint4*>(xm) + m * kv;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < kv; c += gridDim.x * blockDim.x) {
      union Vec {
        uint4 u;
        T e[V];
      } in;
      in.u = __ldcs(xr + c);
      if constexpr (kSwiGlu) {
        Vec up;
        up.u = __ldcs(xr + kv + c);
#pragma unroll
        for (int i = 0; i < V; ++i) in.e[i] = SwiGluOf<T>(in.e[i], up.e[i]);
      }
#pragma unroll
      for (int g = 0; g < kMaxMaskGroups; ++g) {
        if (g >= groups) break;
        Vec v;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float mv = MaskedValue(in.e[i], c * V + i, r[g], dm);
          v.e[i] = !IsKeptValue(mv) ? Traits<T>::FromFloat(0.0f) : dm.ramp != 0.0f ? Traits<T>::FromFloat(mv) : in.e[i];
        }
        out[g * plane + c] = v.u;
      }
    }
  }
}

/// Whether LaunchMaskGroups can run: aligned x / xm, K a multiple of the vector width, at most kMaxMaskGroups groups.
template <typename T>
bool MaskGroupsEligible(const void* x, const void* xm, int64_t K, int groups) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(xm) % 16 == 0 && K % Traits<T>::kVec == 0 && groups >= 1 &&
         groups <= kMaxMaskGroups;
}

/// Enqueue xm[g] = mask_g(x) for g < groups ([groups, M, K]; x: silu(gate) * up of X [M, 2K] with `swiglu`) and *flag = 0.
template <typename T>
cudaError_t LaunchMaskGroups(const T* x, T* xm, int64_t M, int64_t K, const DeviceMask& dm, int groups, bool swiglu, unsigned* flag,
                             cudaStream_t stream) {
  constexpr int V = Traits<T>::kVec;
  if (!MaskGroupsEligible<T>(x, xm, K, groups)) return cudaErrorInvalidValue;  // the caller checks it first
  const dim3 grid((unsigned)std::min<int64_t>(std::max<int64_t>((K / V + 255) / 256, 1), 64), (unsigned)std::min<int64_t>(M, 65535));
  if (swiglu) MaskGroupsVecKernel<T, true><<<grid, 256, 0, stream>>>(x, xm, M, (int)K, dm, groups, flag);
  else MaskGroupsVecKernel<T, false><<<grid, 256, 0, stream>>>(x, xm, M, (int)K, dm, groups, flag);
  return cudaGetLastError();
}

/// *flag = 1 if any of the n elements of y is Inf or NaN (flag zeroed earlier on the stream).
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

/// Enqueue xm = mask_g(x) ([M, K], T) and *flag = 0.
template <typename T>
cudaError_t LaunchMaskRows(const T* x, T* xm, int64_t M, int64_t K, const DeviceMask& dm, int g, unsigned* flag, cudaStream_t stream) {
  constexpr int V = Traits<T>::kVec;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(xm) % 16 == 0 && K % V == 0) {
    const dim3 grid((unsigned)std::min<int64_t>((K / V + 255) / 256, 64), (unsigned)std::min<int64_t>(M, 65535));
    MaskRowsVecKernel<T><<<grid, 256, 0, stream>>>(x, xm, M, (int)K, dm, g, flag);
    return cudaGetLastError();
  }
  const dim3 grid((unsigned)std::min<int64_t>(std::max<int64_t>((K + 255) / 256, 1), 64), (unsigned)std::min<int64_t>(M, 65535));
  MaskRowsKernel<T><<<grid, 256, 0, stream>>>(x, xm, M, (int)K, dm, g, flag);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchFlagNonFinite(const T* y, int64_t n, unsigned* flag, cudaStream_t stream) {
  FlagNonFiniteKernel<T><<<ElementwiseBlocks(n * (int64_t)sizeof(T) / 16 + 1), 256, 0, stream>>>(y, n, flag);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace acttail
