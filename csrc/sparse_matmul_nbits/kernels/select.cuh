// Top-k selection of SparseMatMulNBits: one 1024-thread block per (row, selection group).
// Exact radix select (8-bit digits, KB/8 passes) of the k-th largest score key, the lower-index tie cut,
// and (when the ramp needs it) t = the largest dropped score. Thread i owns the contiguous channels
// [i*seg, (i+1)*seg), seg = ceil(K / 1024); for seg <= 16 (K <= 16384) their keys stay in registers,
// beyond that they are recomputed from X (L1 / L2) in every pass.
// Output sel[row * groups + group] = (kth key, last kept tie index, t as float bits, 0); k = 0 keeps
// nothing (kth = 0xffffffff, tie = -1), k >= K keeps every channel (kth = 0, tie = K, t = 0).
#pragma once

#include "sparse_matmul_nbits/kernels/rule.cuh"

namespace acttail {
namespace nbits {
namespace cuda {

constexpr int kSelectThreads = 1024;
constexpr int kSelectRegKeys = 16;

struct SelectArgs {
  const void* x;
  int M, K;
  const float* scale;  // may be null
  int scale_per_group;
  int groups;
  int ks[8];  // channels kept, per group
  int need_t;  // ramp > 0: compute t
  uint4* sel;
};

template <typename T, int KB>
__device__ __forceinline__ uint32_t SelectKey(const T* xr, const float* sc, int i) {
  if constexpr (KB == 16) {
    return HalfKey16(reinterpret_cast<const __half*>(xr)[i]);
  } else {
    return ScoreKey32(fabsf(Traits<T>::ToFloat(xr[i])) * (sc != nullptr ? sc[i] : 1.0f));
  }
}

/// Block-wide exclusive prefix sum of one int per thread (thread order); also returns the total.
__device__ __forceinline__ int BlockExclusiveSum(int v, int* s_warp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += n;
  }
  __syncthreads();  // s_warp may still be read by a previous call
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < nwarps ? s_warp[lane] : 0;
    int wincl = w;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, wincl, off);
      if (lane >= off) wincl += n;
    }
    if (lane < nwarps) s_warp[lane] = wincl - w;
    if (lane == 31) s_warp[32] = wincl;
  }
  __syncthreads();
  total = s_warp[32];
  return s_warp[warp] + incl - v;
}

template <typename T, int KB>
__global__ void __launch_bounds__(kSelectThreads) TopKSelectKernel(SelectArgs a) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining, s_bin_count;
  __shared__ int s_warp[33];
  __shared__ unsigned s_max;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m = blockIdx.x, gs = blockIdx.y, K = a.K;
  int k = a.ks[0];
#pragma unroll
  for (int i = 1; i < 8; ++i)  // static indices: a dynamically indexed parameter array would go to local memory
    if (i == gs) k = a.ks[i];
  const T* xr = static_cast<const T*>(a.x) + (int64_t)m * K;
  const float* sc = a.scale == nullptr ? nullptr : a.scale + (int64_t)(a.scale_per_group ? gs : 0) * K;
  uint4* out = a.sel + (int64_t)m * a.groups + gs;
  if (k <= 0 || k >= K) {
    if (tid == 0) *out = k <= 0 ? make_uint4(0xffffffffu, 0xffffffffu, 0u, 0u) : make_uint4(0u, (unsigned)K, 0u, 0u);
    return;
  }
  const int seg = (K + blockDim.x - 1) / blockDim.x, lo = tid * seg, n = max(0, min(K, lo + seg) - lo);
  const bool reg = seg <= kSelectRegKeys;
  uint32_t keys[kSelectRegKeys];
  if (reg) {
#pragma unroll
    for (int j = 0; j < kSelectRegKeys; ++j) keys[j] = j < n ? SelectKey<T, KB>(xr, sc, lo + j) : 0u;
  }
// Runs BODY with (key, ch) bound to every channel of this thread (registers for seg <= 16, else recomputed).
#define ACTTAIL_FOR_EACH_KEY(BODY)                                      \
  if (reg) {                                                            \
    _Pragma("unroll") for (int j_ = 0; j_ < kSelectRegKeys; ++j_) {     \
      if (j_ < n) {                                                     \
        const uint32_t key = keys[j_];                                  \
        const int ch = lo + j_;                                         \
        BODY                                                            \
      }                                                                 \
    }                                                                   \
  } else {                                                              \
    for (int j_ = 0; j_ < n; ++j_) {                                    \
      const uint32_t key = SelectKey<T, KB>(xr, sc, lo + j_);           \
      const int ch = lo + j_;                                           \
      BODY                                                              \
    }                                                                   \
  }
  uint32_t prefix = 0, mask = 0;
  int remaining = k;  // 1-based rank, from the top, of the wanted key among the keys matching prefix
  for (int shift = KB - 8; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    ACTTAIL_FOR_EACH_KEY((void)ch; if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);)
    __syncthreads();
    if (warp == 0) {  // lane owns bins 255-8*lane .. 248-8*lane (descending)
      unsigned c[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = hist[255 - 8 * lane - j];
        sum += c[j];
      }
      unsigned incl = sum;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      unsigned cum = incl - sum;
      if (cum < (unsigned)remaining && (unsigned)remaining <= incl) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (cum + c[j] >= (unsigned)remaining) {
            s_prefix = prefix | ((uint32_t)(255 - 8 * lane - j) << shift);
            s_remaining = remaining - (int)cum;
            s_bin_count = (int)c[j];
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
  const uint32_t kth = prefix;
  const int equal = s_bin_count;  // channels whose key is kth; the first `remaining` of them are kept
  // tie cut: the channel of the remaining-th key equal to kth, in channel order
  int cnt = 0;
  ACTTAIL_FOR_EACH_KEY((void)ch; cnt += key == kth;)
  int total = 0;
  int before = BlockExclusiveSum(cnt, s_warp, total);
  if (before < remaining && remaining <= before + cnt) {
    ACTTAIL_FOR_EACH_KEY(if (key == kth && ++before == remaining) out->y = (unsigned)ch;)  // one thread, one channel
  }
  float t = 0.0f;
  if (a.need_t) {
    if (equal > remaining) {
      t = KB == 16 ? KeyValue16(kth) : KeyValue32(kth);
    } else {  // every tie kept: t is the largest key below kth (k < K, so there is one)
      if (tid == 0) s_max = 0u;
      __syncthreads();
      uint32_t best = 0u;
      ACTTAIL_FOR_EACH_KEY((void)ch; if (key < kth && key > best) best = key;)
      best = __reduce_max_sync(0xffffffffu, best);
      if (lane == 0) atomicMax(&s_max, best);
      __syncthreads();
      t = KB == 16 ? KeyValue16(s_max) : KeyValue32(s_max);
    }
  }
  if (tid == 0) {
    out->x = kth;
    out->z = __float_as_uint(t);
    out->w = 0u;
  }
}

#undef ACTTAIL_FOR_EACH_KEY

template <typename T>
cudaError_t LaunchTopKSelect(const SelectArgs& a, bool key16, cudaStream_t stream) {
  const dim3 grid((unsigned)a.M, (unsigned)a.groups);
  if constexpr (sizeof(T) == 2) {
    if (key16) {
      TopKSelectKernel<T, 16><<<grid, kSelectThreads, 0, stream>>>(a);
      return cudaGetLastError();
    }
  }
  TopKSelectKernel<T, 32><<<grid, kSelectThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace nbits
}  // namespace acttail
