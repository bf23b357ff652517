// Device side of the mask rule (common/mask.h): element traits, the per-row keep rule, Inf/NaN words.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace acttail {
namespace cuda {

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  static constexpr int kVec = 4;  // elements per 16-byte load
  static constexpr int kKeyBits = 32;
  __device__ __forceinline__ static float ToFloat(float v) { return v; }
  __device__ __forceinline__ static float FromFloat(float v) { return v; }
  __device__ __forceinline__ static uint32_t Key(float v) {
    uint32_t b = __float_as_uint(v) & 0x7fffffffu;
    return b > 0x7f800000u ? 0u : b;  // NaN ranks with zeros
  }
};

template <>
struct Traits<__half> {
  static constexpr int kVec = 8;
  static constexpr int kKeyBits = 16;
  __device__ __forceinline__ static float ToFloat(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half FromFloat(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static uint32_t Key(__half v) {
    uint32_t b = __half_as_ushort(v) & 0x7fffu;
    return b > 0x7c00u ? 0u : b;
  }
};

/// Per-row keep rule: topk keeps key > kth or (key == kth and index <= tie); threshold keeps |x| > t.
struct Rule {
  uint32_t kth;
  int32_t tie;
  float t;
};

template <typename T>
__device__ __forceinline__ bool Keep(T v, int idx, const Rule& r, bool topk) {
  const float f = Traits<T>::ToFloat(v);
  if (topk) {
    const uint32_t key = Traits<T>::Key(v);
    return key > r.kth || (key == r.kth && idx <= r.tie);
  }
  return fabsf(f) > r.t && f != 0.0f;
}

__device__ __forceinline__ Rule LoadRule(int m, int M, bool topk, const float* thr, const uint2* sel) {
  Rule r{0xffffffffu, -1, __int_as_float(0x7f800000)};  // keeps nothing
  if (m < M) {
    if (topk) {
      const uint2 s = sel[m];
      r.kth = s.x;
      r.tie = (int32_t)s.y;
    } else {
      r.t = *thr;
    }
  }
  return r;
}


template <typename T>
__device__ __forceinline__ bool NonFiniteWord(uint32_t w);
template <>
__device__ __forceinline__ bool NonFiniteWord<float>(uint32_t w) { return (w & 0x7f800000u) == 0x7f800000u; }
template <>
__device__ __forceinline__ bool NonFiniteWord<__half>(uint32_t w) {
  return (w & 0x7c00u) == 0x7c00u || (w & 0x7c000000u) == 0x7c000000u;
}

/// *flag = 1 if any of the n elements of y is Inf or NaN (flag zeroed earlier on the stream).

/// Grid of a grid-stride elementwise kernel of 256 threads over n items.
inline unsigned ElementwiseBlocks(int64_t n) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 4096));
}


}  // namespace cuda
}  // namespace acttail
