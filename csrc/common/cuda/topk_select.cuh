// Top-k selection: one block per (row, member). Exact radix select (8-bit digits) of the cut key, the key of
// the (k+1)-th largest score (the largest dropped one: its score is t for the ramp), then the index cut for
// the ties kept at that key (lowest channel index first). Writes sel[row * members + g] = (cut, last kept
// tie index, or -1). k == 0: (0xffffffff, -1), keeps nothing; k >= K: (0, -1), keeps every positive key.
//  * TopKSelectRegKernel (8192 < K <= 16384) reads the row once into registers; TopKSelectKernel loops.
//  * Keys: float16 magnitude bits (float16 x, no scale: 2 radix passes) or float32 score bits (4 passes).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda/activation.cuh"
#include "common/cuda/dependent_launch.cuh"
#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace cuda {

constexpr int kSelectThreads = 1024;
constexpr int kSelectSeg = 16;
constexpr int64_t kSelectRegMinK = 8192;  // below this the looping kernel is faster (docs/kernels.md)

/// Per-launch parameters: k and scale row of each member.
struct SelectParams {
  int K = 0;
  int members = 1;
  int k[kMaxMembers] = {0};
  const float* scale = nullptr;  // scale + g * scale_stride: member g's [K] scale (null: s = |x|)
  int64_t scale_stride = 0;
};

/// Shared block state of the radix passes.
struct SelectShared {
  unsigned hist[256];
  uint32_t prefix;
  int remaining;
  int warp[32];
  int total;
  int tie;
};

/// One radix pass' bin search by warp 0 over hist[256]: lane owns bins 255-8*lane .. 248-8*lane (descending); the lane
/// holding the bin of rank `remaining` writes *out_prefix and *out_remaining.
__device__ __forceinline__ void SelectBinOf(const unsigned* hist, int lane, uint32_t prefix, int remaining, int shift, uint32_t* out_prefix,
                                            int* out_remaining) {
  unsigned c[8], s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = hist[255 - 8 * lane - j];
    s += c[j];
  }
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
        *out_prefix = prefix | ((uint32_t)(255 - 8 * lane - j) << shift);
        *out_remaining = remaining - (int)cum;
        break;
      }
      cum += c[j];
    }
  }
}
__device__ __forceinline__ void SelectBin(SelectShared& sh, int lane, uint32_t prefix, int remaining, int shift) {
  SelectBinOf(sh.hist, lane, prefix, remaining, shift, &sh.prefix, &sh.remaining);
}

/// (k, K) cases decided without a select; true when sel was written.
__device__ __forceinline__ bool SelectTrivial(int k, int K, uint2* out) {
  if (k <= 0) {
    if (threadIdx.x == 0) *out = make_uint2(0xffffffffu, 0xffffffffu);
    return true;
  }
  if (k >= K) {
    if (threadIdx.x == 0) *out = make_uint2(0u, 0xffffffffu);
    return true;
  }
  return false;
}

/// Exclusive prefix sum, in thread order, of each thread's count over the block (nwarps warps; warp_sums: 32 shared ints).
/// Every thread calls it; two barriers inside, so warp_sums must not be rewritten before the next barrier.
__device__ __forceinline__ int BlockExclusiveCount(int cnt, int lane, int warp, int nwarps, int* warp_sums) {
  int incl = cnt;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int v = lane < nwarps ? warp_sums[lane] : 0;
    int wincl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, wincl, off);
      if (lane >= off) wincl += n;
    }
    if (lane < nwarps) warp_sums[lane] = wincl - v;
  }
  __syncthreads();
  return warp_sums[warp] + incl - cnt;
}

template <typename T, bool kHalfKeys>
__global__ void __launch_bounds__(kSelectThreads) TopKSelectKernel(const T* __restrict__ x, SelectParams p, uint2* __restrict__ sel) {
  __shared__ SelectShared sh;
  // a dependent launched after it (the GEMV) may start now; x and sel only after the previous kernel has finished
  GridLaunchDependents();
  GridDependencyWait();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int g = blockIdx.y, K = p.K;
  const T* xr = x + (int64_t)blockIdx.x * K;
  const float* scale = p.scale != nullptr ? p.scale + g * p.scale_stride : nullptr;
  uint2* out = sel + (int64_t)blockIdx.x * p.members + g;
  if (SelectTrivial(p.k[g], K, out)) return;
  constexpr int kKeyBits = kHalfKeys ? 16 : 32;
  uint32_t prefix = 0, mask = 0;
  int remaining = p.k[g] + 1;  // rank (1-based, from the top) of the cut among keys matching prefix
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < K; i += blockDim.x) {
      const uint32_t key = ElementKey<T>(xr[i], i, scale, kHalfKeys);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) SelectBin(sh, lane, prefix, remaining, shift);
    __syncthreads();
    prefix = sh.prefix;
    remaining = sh.remaining;
    mask |= 0xffu << shift;
  }
  // prefix = cut key; the first remaining - 1 channels with that key are kept (key 0 is never kept)
  const int target = remaining - 1;
  if (prefix == 0 || target == 0) {
    if (tid == 0) *out = make_uint2(prefix, 0xffffffffu);
    return;
  }
  if (tid == 0) sh.tie = -1;
  int seen = 0;
  for (int base = 0; base < K; base += blockDim.x) {
    const int i = base + tid;
    const bool flag = i < K && ElementKey<T>(xr[i], i, scale, kHalfKeys) == prefix;
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) sh.warp[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int v = lane < nwarps ? sh.warp[lane] : 0;
      int incl = v;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
      }
      if (lane < nwarps) sh.warp[lane] = incl - v;
      if (lane == 31) sh.total = incl;
    }
    __syncthreads();
    if (flag && seen + sh.warp[warp] + __popc(ballot & ((1u << lane) - 1u)) + 1 == target) sh.tie = i;
    seen += sh.total;
    __syncthreads();
    if (seen >= target) break;
  }
  if (tid == 0) *out = make_uint2(prefix, (uint32_t)sh.tie);
}

/// Same result as TopKSelectKernel for K <= kSelectThreads * kSelectSeg, with the row read once: thread t
/// keeps the keys of channels [t*seg, (t+1)*seg) in registers, the radix passes histogram them from
/// registers, and one block scan over the per-thread tie counts finds the tie cut.
template <typename T, bool kHalfKeys>
__global__ void __launch_bounds__(kSelectThreads) TopKSelectRegKernel(const T* __restrict__ x, SelectParams p, uint2* __restrict__ sel) {
  __shared__ SelectShared sh;
  // a dependent launched after it (the GEMV) may start now; x and sel only after the previous kernel has finished
  GridLaunchDependents();
  GridDependencyWait();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int g = blockIdx.y, K = p.K;
  const T* xr = x + (int64_t)blockIdx.x * K;
  const float* scale = p.scale != nullptr ? p.scale + g * p.scale_stride : nullptr;
  uint2* out = sel + (int64_t)blockIdx.x * p.members + g;
  if (SelectTrivial(p.k[g], K, out)) return;
  const int seg = (K + blockDim.x - 1) / blockDim.x;  // <= kSelectSeg (checked by the launcher)
  const int lo = tid * seg;
  uint32_t keys[kSelectSeg];
  unsigned valid = 0;
#pragma unroll
  for (int j = 0; j < kSelectSeg; ++j) {
    const bool v = j < seg && lo + j < K;
    keys[j] = v ? ElementKey<T>(xr[lo + j], lo + j, scale, kHalfKeys) : 0u;
    valid |= (unsigned)v << j;
  }
  constexpr int kKeyBits = kHalfKeys ? 16 : 32;
  uint32_t prefix = 0, mask = 0;
  int remaining = p.k[g] + 1;
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kSelectSeg; ++j)
      if (((valid >> j) & 1u) && (keys[j] & mask) == prefix) atomicAdd(&sh.hist[(keys[j] >> shift) & 255u], 1u);
    __syncthreads();
    if (warp == 0) SelectBin(sh, lane, prefix, remaining, shift);
    __syncthreads();
    prefix = sh.prefix;
    remaining = sh.remaining;
    mask |= 0xffu << shift;
  }
  const int target = remaining - 1;
  if (prefix == 0 || target == 0) {
    if (tid == 0) *out = make_uint2(prefix, 0xffffffffu);
    return;
  }
  int cnt = 0;
#pragma unroll
  for (int j = 0; j < kSelectSeg; ++j) cnt += ((valid >> j) & 1u) && keys[j] == prefix;
  int before = BlockExclusiveCount(cnt, lane, warp, nwarps, sh.warp);  // ties in the segments of lower threads
  if (before < target && target <= before + cnt) {
#pragma unroll
    for (int j = 0; j < kSelectSeg; ++j) {
      if (((valid >> j) & 1u) && keys[j] == prefix && ++before == target) *out = make_uint2(prefix, (uint32_t)(lo + j));
    }
  }
}

// ---- the selection inside a decode GEMV block (one float16 row, no scale) ------------------------------------------

/// Most keys one thread of BlockSelectHalf holds: K <= threads * kBlockSelectPerThread (14336 with 256 threads).
constexpr int kBlockSelectPerThread = 56;

/// Shared state of BlockSelectHalf.
struct BlockSelectShared {
  unsigned hist[2][256];
  uint32_t prefix[2];
  int remaining[2];
  int warp[32];
  uint2 result;
};

/// Key j of a thread's keys, two per word (j a constant after unrolling, so kw stays in registers).
template <int W>
__device__ __forceinline__ uint32_t KeyAt(const uint32_t (&kw)[W], int j) {
  return (kw[j / 2] >> (16 * (j % 2))) & 0xffffu;
}

/// Float16 magnitude key of the op's input value at channel c of a row: x[c], or silu(x[c]) * x[K + c] rounded to
/// float16 (SwiGluOf: what the GEMV computes from [gate | up]).
__device__ __forceinline__ uint32_t InputKey(const __half* __restrict__ xr, int c, int K, bool swiglu) {
  return HalfKey(swiglu ? SwiGluOf<__half>(xr[c], xr[K + c]) : xr[c]);
}

/// TopKSelectKernel's result (float16 magnitude keys: the same cut key and last kept tie) for one row of K channels
/// and k, computed by the NT threads of one block: every thread calls it and gets the result. It starts with a barrier
/// (the caller's earlier reads of shared memory are done) and ends after one (every thread has read what it wrote
/// into sh), so the caller may write shared memory right after. Thread t holds the keys of
/// channels [t S, t S + S), S = ceil(K / NT) rounded up to 8 (<= KPT: the caller checks K <= NT KPT), two per
/// register; the row is read once (16-byte loads where aligned). Two radix passes (high byte, low byte) histogram the
/// registers, then one block scan of the per-thread counts of the cut key finds the tie cut in channel order (the
/// threads' channels are contiguous and ascending).
template <int NT, int KPT>
__device__ __forceinline__ uint2 BlockSelectHalf(const __half* __restrict__ xr, int K, int k, bool swiglu, BlockSelectShared& sh) {
  static_assert(KPT % 8 == 0 && NT % 32 == 0 && NT <= 1024, "block select shape");
  constexpr int kWarpsNT = NT / 32;
  __syncthreads();  // the caller's earlier reads of shared state are done
  if (k <= 0) return make_uint2(0xffffffffu, 0xffffffffu);
  if (k >= K) return make_uint2(0u, 0xffffffffu);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int S = ((K + NT - 1) / NT + 7) & ~7;
  const int lo = tid * S, nv = max(0, min(S, K - lo));  // this thread's channels [lo, lo + nv)
  const bool vec = (reinterpret_cast<uintptr_t>(xr) & 15u) == 0 && (!swiglu || K % 8 == 0);
  for (int i = tid; i < 512; i += NT) (&sh.hist[0][0])[i] = 0u;
  uint32_t kw[KPT / 2];
#pragma unroll
  for (int j = 0; j < KPT; j += 8) {
    uint32_t e[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
    if (j < nv) {  // the branch over whole groups of 8 is uniform except at the row's end
      const int c = lo + j;
      if (vec && j + 8 <= nv) {
        const uint4 a = __ldg(reinterpret_cast<const uint4*>(xr + c));
        const uint32_t aw[4] = {a.x, a.y, a.z, a.w};
        if (swiglu) {
          const uint4 b = __ldg(reinterpret_cast<const uint4*>(xr + K + c));
          const uint32_t bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const __half g = __ushort_as_half((unsigned short)(aw[i / 2] >> (16 * (i % 2))));
            const __half u = __ushort_as_half((unsigned short)(bw[i / 2] >> (16 * (i % 2))));
            e[i] = HalfKey(SwiGluOf<__half>(g, u));
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) e[i] = HalfKey(__ushort_as_half((unsigned short)(aw[i / 2] >> (16 * (i % 2)))));
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (j + i < nv) e[i] = InputKey(xr, c + i, K, swiglu);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) kw[j / 2 + i] = e[2 * i] | (e[2 * i + 1] << 16);
  }
  __syncthreads();  // histograms zeroed
  // pass 1: the high byte
#pragma unroll
  for (int j = 0; j < KPT; ++j)
    if (j < nv) atomicAdd(&sh.hist[0][KeyAt(kw, j) >> 8], 1u);
  __syncthreads();
  if (warp == 0) SelectBinOf(sh.hist[0], lane, 0u, k + 1, 8, &sh.prefix[0], &sh.remaining[0]);
  __syncthreads();
  const uint32_t hi = sh.prefix[0] >> 8;
  const int rem = sh.remaining[0];
  // pass 2: the low byte among the keys with that high byte
#pragma unroll
  for (int j = 0; j < KPT; ++j)
    if (j < nv && (KeyAt(kw, j) >> 8) == hi) atomicAdd(&sh.hist[1][KeyAt(kw, j) & 255u], 1u);
  __syncthreads();
  if (warp == 0) SelectBinOf(sh.hist[1], lane, hi << 8, rem, 0, &sh.prefix[1], &sh.remaining[1]);
  __syncthreads();
  const uint32_t cut = sh.prefix[1];
  const int target = sh.remaining[1] - 1;  // the first target channels with the cut key are kept (key 0 never)
  if (cut == 0 || target == 0) {
    __syncthreads();  // every thread has read prefix / remaining
    return make_uint2(cut, 0xffffffffu);
  }
  int cnt = 0;
#pragma unroll
  for (int j = 0; j < KPT; ++j) cnt += (j < nv && KeyAt(kw, j) == cut) ? 1 : 0;
  int before = BlockExclusiveCount(cnt, lane, warp, kWarpsNT, sh.warp);  // ties in the channels of lower threads
  if (before < target && target <= before + cnt) {
#pragma unroll
    for (int j = 0; j < KPT; ++j)
      if (j < nv && KeyAt(kw, j) == cut && ++before == target) sh.result = make_uint2(cut, (uint32_t)(lo + j));
  }
  __syncthreads();
  const uint2 r = sh.result;
  __syncthreads();  // every thread has read the result
  return r;
}

template <typename T, bool kHalfKeys>
inline cudaError_t LaunchTopKSelectKeys(const T* x, int64_t M, const SelectParams& p, uint2* sel, cudaStream_t stream) {
  const dim3 grid((unsigned)M, (unsigned)p.members);
  // Register-resident selection only where it measured faster on H200 (docs/kernels.md: 6.1 vs 6.7-9.2 us
  // at K = 11008, but 5.7 vs 3.9-4.6 us at K = 4096). Both as programmatic dependents of the previous kernel on sm_90+
  // (ACTTAIL_PDL; common/cuda/dependent_launch.cuh).
  if (p.K > kSelectRegMinK && p.K <= (int64_t)kSelectThreads * kSelectSeg) {
    auto kernel = TopKSelectRegKernel<T, kHalfKeys>;
    return LaunchDependent(DependentLaunchWanted(), kernel, grid, dim3(kSelectThreads), 0, stream, x, p, sel);
  }
  auto kernel = TopKSelectKernel<T, kHalfKeys>;
  return LaunchDependent(DependentLaunchWanted(), kernel, grid, dim3(kSelectThreads), 0, stream, x, p, sel);
}

/// Enqueue the top-k selection of every row of x [M, K] and member (writes sel[M * p.members]).
template <typename T>
inline cudaError_t LaunchTopKSelect(const T* x, int64_t M, const SelectParams& p, uint2* sel, cudaStream_t stream) {
  if (M > 2147483647LL || p.members > 65535) return cudaErrorInvalidConfiguration;
  if constexpr (sizeof(T) == 2) {
    if (p.scale == nullptr) return LaunchTopKSelectKeys<T, true>(x, M, p, sel, stream);
  }
  return LaunchTopKSelectKeys<T, false>(x, M, p, sel, stream);
}

}  // namespace cuda
}  // namespace acttail
