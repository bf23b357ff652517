// Device side of the mask rule (common/mask.h), shared by every op's CUDA kernels: element traits, the
// per-(row, member) rule and the masked value of one element, Inf/NaN words.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/mask.h"

namespace acttail {
namespace cuda {

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  static constexpr int kVec = 4;  // elements per 16-byte load
  __device__ __forceinline__ static float ToFloat(float v) { return v; }
  __device__ __forceinline__ static float FromFloat(float v) { return v; }
};

template <>
struct Traits<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float ToFloat(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half FromFloat(float v) { return __float2half_rn(v); }
};

/// Ranking key of a float32 score: its bit pattern when > 0 (Inf included), else 0 (NaN, zero, negative).
__device__ __forceinline__ uint32_t ScoreKey(float s) {
  const uint32_t b = __float_as_uint(s);
  return (b & 0x80000000u) || b > 0x7f800000u ? 0u : b;
}
/// Ranking key of |x| for float16 x without a scale: the magnitude bits (NaN -> 0); 16-bit keys, 2 radix passes.
__device__ __forceinline__ uint32_t HalfKey(__half v) {
  const uint32_t b = __half_as_ushort(v) & 0x7fffu;
  return b > 0x7c00u ? 0u : b;
}

/// What a kernel needs to apply the rule of any (row, member); passed by value.
struct DeviceMask {
  bool topk = false;
  bool half_keys = false;           // topk keys are float16 magnitude bits (float16 x, no scale)
  float ramp = 0.0f;
  const float* thr = nullptr;       // threshold mode: thr[g * thr_stride]
  int thr_stride = 0;
  const float* scale = nullptr;     // optional: scale[g * scale_stride + c]
  int64_t scale_stride = 0;
  const uint2* sel = nullptr;       // topk: (cut key, last kept tie index) at sel[m * sel_members + g']
  int sel_members = 1;              // 1: one selection shared by every member, else G
};

/// The rule of one (row, member): topk keeps key > cut or (key == cut and c <= tie); threshold keeps s > t.
/// t is the threshold, or in topk mode the largest dropped score (ramp only).
struct Rule {
  uint32_t cut;
  int32_t tie;
  float t;
  const float* scale;
};

__device__ __forceinline__ float KeyScore(uint32_t key, bool half_keys) {
  return half_keys ? __half2float(__ushort_as_half((unsigned short)key)) : __uint_as_float(key);
}

/// Top-k rule of member g from its selection s = (cut key, last kept tie index).
__device__ __forceinline__ Rule TopKRule(const DeviceMask& dm, uint2 s, int g) {
  Rule r;
  r.scale = dm.scale != nullptr ? dm.scale + g * dm.scale_stride : nullptr;
  r.cut = s.x;
  r.tie = (int32_t)s.y;
  r.t = dm.ramp != 0.0f && s.x != 0xffffffffu ? KeyScore(s.x, dm.half_keys) : 0.0f;
  return r;
}

/// Rule of row m (of M) and member g; rows past M keep nothing.
__device__ __forceinline__ Rule LoadRule(const DeviceMask& dm, int64_t m, int64_t M, int g) {
  Rule r{0xffffffffu, -1, __int_as_float(0x7f800000), nullptr};
  if (m >= M) return r;
  if (dm.topk) return TopKRule(dm, dm.sel[m * dm.sel_members + (dm.sel_members == 1 ? 0 : g)], g);
  r.scale = dm.scale != nullptr ? dm.scale + g * dm.scale_stride : nullptr;
  r.t = dm.thr[g * dm.thr_stride];
  return r;
}

/// Ranking key of element c (value raw) under the rule's scale.
template <typename T>
__device__ __forceinline__ uint32_t ElementKey(T raw, int c, const float* scale, bool half_keys) {
  if constexpr (sizeof(T) == 2) {
    if (half_keys) return HalfKey(raw);
  }
  const float mag = fabsf(Traits<T>::ToFloat(raw));
  return ScoreKey(scale != nullptr ? mag * __ldg(scale + c) : mag);
}

/// Masked value of element c: +0.0f when dropped (or x == 0), else x * f, with -0.0f standing for a kept
/// product of 0 (kept channels are multiplied: IsKeptValue).
template <typename T>
__device__ __forceinline__ float MaskedValue(T raw, int c, const Rule& r, const DeviceMask& dm) {
  const float v = Traits<T>::ToFloat(raw);
  const float mag = fabsf(v);
  // a zero x is never kept whatever its scale: no scale load for it (the tensor-core kernel's zero-filled K tail
  // passes channels c >= K)
  const float s = r.scale != nullptr && mag != 0.0f ? mag * __ldg(r.scale + c) : mag;
  bool keep;
  if (dm.topk) {
    uint32_t key;
    if constexpr (sizeof(T) == 2) {
      key = dm.half_keys ? HalfKey(raw) : ScoreKey(s);
    } else {
      key = ScoreKey(s);
    }
    keep = key > r.cut || (key == r.cut && c <= r.tie);
  } else {
    keep = s > r.t && v != 0.0f;
  }
  if (!keep) return 0.0f;
  if (dm.ramp == 0.0f) return v;
  float f = r.t > 0.0f ? (s - r.t) / (dm.ramp * r.t) : 1.0f;  // NaN when s = t = Inf, as the reference
  f = f > 1.0f ? 1.0f : f;
  const float out = v * f;
  return out == 0.0f ? -0.0f : out;
}

__device__ __forceinline__ bool IsKeptValue(float v) { return __float_as_uint(v) != 0u; }

template <typename T>
__device__ __forceinline__ bool NonFiniteWord(uint32_t w);
template <>
__device__ __forceinline__ bool NonFiniteWord<float>(uint32_t w) { return (w & 0x7f800000u) == 0x7f800000u; }
template <>
__device__ __forceinline__ bool NonFiniteWord<__half>(uint32_t w) {
  return (w & 0x7c00u) == 0x7c00u || (w & 0x7c000000u) == 0x7c000000u;
}

/// Grid of a grid-stride elementwise kernel of 256 threads over n items.
inline unsigned ElementwiseBlocks(int64_t n) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 4096));
}

}  // namespace cuda
}  // namespace acttail
