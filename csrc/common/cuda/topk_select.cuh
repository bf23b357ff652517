// Top-k selection kernels: one block per row; exact radix select of the cut key, then the index cut for ties.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// top-k selection: sel[row] = (k-th largest key, index of the last kept tie)
// ------------------------------------------------------------------------------------------------
constexpr int kSelectThreads = 1024;

template <typename T>
__global__ void __launch_bounds__(kSelectThreads) TopKSelectKernel(const T* __restrict__ x, int K, int k, uint2* __restrict__ sel) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining, s_tie, s_total;
  __shared__ int s_warp[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const T* xr = x + (int64_t)blockIdx.x * K;
  if (k <= 0) {
    if (tid == 0) sel[blockIdx.x] = make_uint2(0xffffffffu, 0xffffffffu);
    return;
  }
  uint32_t prefix = 0, mask = 0;
  int remaining = k;  // rank (1-based, from the top) of the wanted key among keys matching prefix
  for (int shift = Traits<T>::kKeyBits - 8; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < K; i += blockDim.x) {
      const uint32_t key = Traits<T>::Key(xr[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) {  // lane owns bins 255-8*lane .. 248-8*lane (descending)
      unsigned c[8], s = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) { c[j] = hist[255 - 8 * lane - j]; s += c[j]; }
      unsigned incl = s;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
      }
      unsigned cum = incl - s;
      if (cum < (unsigned)remaining && (unsigned)remaining <= incl) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (cum + c[j] >= (unsigned)remaining) {
            s_prefix = prefix | ((uint32_t)(255 - 8 * lane - j) << shift);
            s_remaining = remaining - (int)cum;
            break;
          }
          cum += c[j];
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 0xffu << shift;
  }
  // prefix = key of the k-th largest; `remaining` ties with that key are kept, lowest index first.
  if (prefix == 0) {  // zeros / NaN: never multiplied, so no tie cut is needed
    if (tid == 0) sel[blockIdx.x] = make_uint2(0u, 0xffffffffu);
    return;
  }
  if (tid == 0) s_tie = -1;
  int seen = 0;
  for (int base = 0; base < K; base += blockDim.x) {
    const int i = base + tid;
    const bool flag = i < K && Traits<T>::Key(xr[i]) == prefix;
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int v = lane < nwarps ? s_warp[lane] : 0;
      int incl = v;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
      }
      if (lane < nwarps) s_warp[lane] = incl - v;
      if (lane == 31) s_total = incl;
    }
    __syncthreads();
    if (flag && seen + s_warp[warp] + __popc(ballot & ((1u << lane) - 1u)) + 1 == remaining) s_tie = i;
    seen += s_total;
    __syncthreads();
    if (seen >= remaining) break;
  }
  if (tid == 0) sel[blockIdx.x] = make_uint2(prefix, (uint32_t)s_tie);
}

/// Same result as TopKSelectKernel for K <= kSelectThreads * kSelectSeg, with the row read once:
/// thread t keeps the keys of channels [t*seg, (t+1)*seg) in registers, the radix passes histogram
/// them from registers, and one block scan over the per-thread tie counts finds the tie cut.
constexpr int kSelectSeg = 16;
constexpr int64_t kSelectRegMinK = 8192;  // below this the looping kernel is faster

template <typename T>
__global__ void __launch_bounds__(kSelectThreads) TopKSelectRegKernel(const T* __restrict__ x, int K, int k, uint2* __restrict__ sel) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  __shared__ int s_warp[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const T* xr = x + (int64_t)blockIdx.x * K;
  if (k <= 0) {
    if (tid == 0) sel[blockIdx.x] = make_uint2(0xffffffffu, 0xffffffffu);
    return;
  }
  const int seg = (K + blockDim.x - 1) / blockDim.x;  // <= kSelectSeg (checked by the launcher)
  const int lo = tid * seg;
  uint32_t keys[kSelectSeg];
  unsigned valid = 0;
#pragma unroll
  for (int j = 0; j < kSelectSeg; ++j) {
    const bool v = j < seg && lo + j < K;
    keys[j] = v ? Traits<T>::Key(xr[lo + j]) : 0u;
    valid |= (unsigned)v << j;
  }
  uint32_t prefix = 0, mask = 0;
  int remaining = k;
  for (int shift = Traits<T>::kKeyBits - 8; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kSelectSeg; ++j)
      if (((valid >> j) & 1u) && (keys[j] & mask) == prefix) atomicAdd(&hist[(keys[j] >> shift) & 255u], 1u);
    __syncthreads();
    if (warp == 0) {
      unsigned c[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) { c[j] = hist[255 - 8 * lane - j]; sum += c[j]; }
      unsigned incl = sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
      }
      unsigned cum = incl - sum;
      if (cum < (unsigned)remaining && (unsigned)remaining <= incl) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (cum + c[j] >= (unsigned)remaining) {
            s_prefix = prefix | ((uint32_t)(255 - 8 * lane - j) << shift);
            s_remaining = remaining - (int)cum;
            break;
          }
          cum += c[j];
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 0xffu << shift;
  }
  if (prefix == 0) {  // zeros / NaN are never multiplied: no tie cut needed
    if (tid == 0) sel[blockIdx.x] = make_uint2(0u, 0xffffffffu);
    return;
  }
  int cnt = 0;
#pragma unroll
  for (int j = 0; j < kSelectSeg; ++j) cnt += ((valid >> j) & 1u) && keys[j] == prefix;
  int incl = cnt;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int v = lane < nwarps ? s_warp[lane] : 0;
    int wincl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, wincl, off);
      if (lane >= off) wincl += n;
    }
    if (lane < nwarps) s_warp[lane] = wincl - v;
  }
  __syncthreads();
  int before = s_warp[warp] + incl - cnt;  // ties in the segments of lower threads
  if (before < remaining && remaining <= before + cnt) {
#pragma unroll
    for (int j = 0; j < kSelectSeg; ++j) {
      if (((valid >> j) & 1u) && keys[j] == prefix && ++before == remaining) sel[blockIdx.x] = make_uint2(prefix, (uint32_t)(lo + j));
    }
  }
}

/// Enqueue the top-k selection of every row of x [M, K] (writes sel[M]).
template <typename T>
inline cudaError_t LaunchTopKSelect(const T* x, int64_t M, int64_t K, int64_t k, uint2* sel, cudaStream_t stream) {
  // Register-resident selection only where it measured faster on H200 (docs/kernels.md: 6.1 vs 6.7-9.2 us
  // at K = 11008, but 5.7 vs 3.9-4.6 us at K = 4096).
  if (K > kSelectRegMinK && K <= (int64_t)kSelectThreads * kSelectSeg) {
    TopKSelectRegKernel<T><<<(unsigned)M, kSelectThreads, 0, stream>>>(x, (int)K, (int)k, sel);
  } else {
    TopKSelectKernel<T><<<(unsigned)M, kSelectThreads, 0, stream>>>(x, (int)K, (int)k, sel);
  }
  return cudaGetLastError();
}


}  // namespace cuda
}  // namespace acttail
