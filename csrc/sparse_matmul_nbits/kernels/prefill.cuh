// Prefill preparation of SparseMatMulNBits (M > 8 rows), one launch:
//  * blocks [0, dq_blocks): W[k, n] = fl_T(s[k/B, n] * q[k, n] + o[k/B, n]) for the chunk k in [k0, k1), n in [n0, n1)
//    into the workspace (row-major, leading dimension ldw), 8 rows x 16 columns per item (the block's scales / offsets
//    read once for 8 rows; 8 bytes of Q and 16-byte scale / offset / output vectors per row when the chunk's columns
//    are 16-aligned); any Inf/NaN produced sets
//    *flag, which arms the exact row-skipping kernel after the GEMM (a masked x times an Inf/NaN weight
//    would otherwise turn into NaN in cuBLAS);
//  * the other blocks: xm[group, m, k] = kept value v (rounded to T) or 0, 8 channels per item when K % 8 == 0.
#pragma once

#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace nbits {
namespace cuda {

using namespace ::acttail::cuda;  // the mask rule

struct PrepArgs {
  const void* x;
  int M, K, N, rowbytes, blog2;
  DeviceMask dm;
  int groups;
  void* xm;  // [groups, M, K]
  const uint8_t* q;
  const void* scales;
  const void* offsets;
  void* w;                // [k1 - k0, ldw]: the chunk's rows and columns
  int k0, k1, n0, n1, ldw;  // the chunk of W dequantized by this launch
  unsigned* flag;
  int dq_blocks;
  int fast_w;  // n0, n1 (or N), ldw multiples of 16 and 16-byte aligned pointers
  int fast_x;  // K % 8 == 0 and 16-byte aligned x / xm
};

template <typename T>
__device__ __forceinline__ bool NonFinite(T v) {
  return !isfinite(Traits<T>::ToFloat(v));
}

constexpr int kDqRows = 8;  // rows of Q per dequantization item (one quant block: B >= 16), scales loaded once

/// Item (group of 8 rows, 16 columns of the chunk): W[k, c0:c0+16] for the group's rows; true when a result is Inf/NaN.
template <typename T>
__device__ bool DequantItem(const PrepArgs& a, int64_t item) {
  const int chunks = (a.n1 - a.n0 + 15) / 16;
  const int k0 = a.k0 + (int)(item / chunks) * kDqRows, c0 = a.n0 + (int)(item % chunks) * 16;
  const int rows = min(kDqRows, a.k1 - k0);
  const int64_t b = k0 >> a.blog2;
  const T* s = static_cast<const T*>(a.scales) + b * a.N + c0;
  const T* o = static_cast<const T*>(a.offsets) + b * a.N + c0;
  bool bad = false;
  if (a.fast_w) {
    constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector
    float sf[16], of[16];
#pragma unroll
    for (int v = 0; v < 16 / kVec; ++v) {
      union {
        uint4 u;
        T e[kVec];
      } sv, ov;
      sv.u = __ldg(reinterpret_cast<const uint4*>(s) + v);
      ov.u = __ldg(reinterpret_cast<const uint4*>(o) + v);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        sf[v * kVec + e] = Traits<T>::ToFloat(sv.e[e]);
        of[v * kVec + e] = Traits<T>::ToFloat(ov.e[e]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int64_t k = k0 + r;
      const uint2 qb = __ldcs(reinterpret_cast<const uint2*>(a.q + k * a.rowbytes + c0 / 2));
      T* w = static_cast<T*>(a.w) + (k - a.k0) * a.ldw + (c0 - a.n0);
#pragma unroll
      for (int v = 0; v < 16 / kVec; ++v) {
        union {
          uint4 u;
          T e[kVec];
        } out;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const int c = v * kVec + e;
          const uint32_t word = c < 8 ? qb.x : qb.y;
          out.e[e] = Traits<T>::FromFloat(fmaf(sf[c], (float)((word >> (4 * (c % 8))) & 15u), of[c]));
          bad |= NonFinite(out.e[e]);
        }
        __stcs(reinterpret_cast<uint4*>(w) + v, out.u);
      }
    }
    return bad;
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t k = k0 + r;
    const uint8_t* qrow = a.q + k * a.rowbytes + c0 / 2;
    T* w = static_cast<T*>(a.w) + (k - a.k0) * a.ldw + (c0 - a.n0);
    for (int c = 0; c < 16 && c0 + c < a.n1; ++c) {
      const float qv = (float)((qrow[c / 2] >> (4 * (c % 2))) & 15u);
      const T res = Traits<T>::FromFloat(fmaf(Traits<T>::ToFloat(s[c]), qv, Traits<T>::ToFloat(o[c])));
      w[c] = res;
      bad |= NonFinite(res);
    }
  }
  return bad;
}

/// Mask items: x [M, K] -> xm[gr, M, K] with group gr's rule (a group per member, or group 0 = every member's).
template <typename T>
__device__ __forceinline__ T MaskOne(T raw, int k, const Rule& rule, const DeviceMask& dm) {
  const float v = MaskedValue<T>(raw, k, rule, dm);
  return IsKeptValue(v) ? (dm.ramp == 0.0f ? raw : Traits<T>::FromFloat(v)) : Traits<T>::FromFloat(0.0f);
}

template <typename T>
__device__ void MaskItem(const PrepArgs& a, int64_t item, int per) {
  const int64_t MK = (int64_t)a.M * a.K;
  const int64_t e0 = item * per;
  const int gr = (int)(e0 / MK);
  const int64_t rem = e0 % MK;
  const int m = (int)(rem / a.K), k0 = (int)(rem % a.K);
  const Rule rule = LoadRule(a.dm, m, a.M, gr);
  const T* xr = static_cast<const T*>(a.x) + (int64_t)m * a.K + k0;
  T* out = static_cast<T*>(a.xm) + e0;
  if (per == 8) {
    constexpr int kVec = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < 8 / kVec; ++v) {
      union {
        uint4 u;
        T e[kVec];
      } in, res;
      in.u = __ldcs(reinterpret_cast<const uint4*>(xr) + v);
#pragma unroll
      for (int e = 0; e < kVec; ++e) res.e[e] = MaskOne<T>(in.e[e], k0 + v * kVec + e, rule, a.dm);
      reinterpret_cast<uint4*>(out)[v] = res.u;
    }
    return;
  }
  *out = MaskOne<T>(*xr, k0, rule, a.dm);
}

template <typename T>
__global__ void __launch_bounds__(256) PrefillPrepKernel(const PrepArgs a) {
  if ((int)blockIdx.x < a.dq_blocks) {
    const int64_t items = (int64_t)((a.k1 - a.k0 + kDqRows - 1) / kDqRows) * ((a.n1 - a.n0 + 15) / 16);
    bool bad = false;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < items; i += (int64_t)a.dq_blocks * blockDim.x)
      bad |= DequantItem<T>(a, i);
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(a.flag, 1u);
    return;
  }
  const int per = a.fast_x ? 8 : 1;
  const int64_t items = (int64_t)a.groups * a.M * a.K / per;
  const int64_t stride = (int64_t)(gridDim.x - a.dq_blocks) * blockDim.x;
  for (int64_t i = (int64_t)(blockIdx.x - a.dq_blocks) * blockDim.x + threadIdx.x; i < items; i += stride) MaskItem<T>(a, i, per);
}

/// y[m, n] = fl_T(acc[m, n]) for the chunk's columns n < cols (acc: float32, leading dimension lda; y: T, ldy).
template <typename T>
__global__ void __launch_bounds__(256) StoreChunkKernel(const float* acc, int lda, T* y, int ldy, int M, int cols) {
  const int64_t total = (int64_t)M * cols;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    y[(i / cols) * ldy + i % cols] = Traits<T>::FromFloat(acc[(i / cols) * lda + i % cols]);
}

}  // namespace cuda
}  // namespace nbits
}  // namespace acttail
