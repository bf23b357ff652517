// Device side of the mask rule of SparseMatMulNBits (the same arithmetic as cpu.cc, so CPU and CUDA keep
// the same channels): float32 scores, order-preserving ranking keys, the per-(row, member) rule, the ramp.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace acttail {
namespace nbits {
namespace cuda {

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  __device__ __forceinline__ static float ToFloat(float v) { return v; }
  __device__ __forceinline__ static float FromFloat(float v) { return v; }
};
template <>
struct Traits<__half> {
  __device__ __forceinline__ static float ToFloat(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half FromFloat(float v) { return __float2half_rn(v); }
};

/// 32-bit ranking key of a float32 score (cpu.cc ScoreKey): NaN and -0 rank as +0, negatives below zero.
__device__ __forceinline__ uint32_t ScoreKey32(float s) {
  uint32_t b = __float_as_uint(s);
  if (isnan(s) || s == 0.0f) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float KeyValue32(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
/// 16-bit key of a float16 x without a scale: the bits of |x| (monotone), NaN -> 0. Same order and ties
/// as ScoreKey32 of the float32 score |x|.
__device__ __forceinline__ uint32_t HalfKey16(__half x) {
  const uint32_t b = __half_as_ushort(x) & 0x7fffu;
  return b > 0x7c00u ? 0u : b;
}
__device__ __forceinline__ float KeyValue16(uint32_t key) { return __half2float(__ushort_as_half((unsigned short)key)); }

/// Everything a kernel needs to apply the rule (device pointers; passed by value).
struct RuleArgs {
  const float* thresholds = nullptr;  // threshold mode: [1] or [G]
  int thr_per_member = 0;
  const uint4* sel = nullptr;  // topk: [M, sel_groups] of (kth key, last kept tie index, t as float bits, 0)
  int sel_groups = 1;
  const float* scale = nullptr;  // optional per-channel score scale, row (scale_per_member ? g : 0) of [*, K]
  int scale_per_member = 0;
  float ramp = 0.0f;
  int topk = 0;
  int key16 = 0;  // topk keys are HalfKey16 (float16 X, no scale)
};

/// The rule of one (row, member): keep key > kth or (key == kth and index <= tie) [topk], s > t [threshold].
struct MemberRule {
  float t;
  uint32_t kth;
  int tie;
};

__device__ __forceinline__ MemberRule LoadRule(const RuleArgs& a, int m, int g) {
  MemberRule r{0.0f, 0xffffffffu, -1};
  if (a.topk) {
    const uint4 s = a.sel[(int64_t)m * a.sel_groups + (a.sel_groups > 1 ? g : 0)];
    r.kth = s.x;
    r.tie = (int)s.y;
    r.t = __uint_as_float(s.z);
  } else {
    r.t = a.thresholds[a.thr_per_member ? g : 0];
  }
  return r;
}

__device__ __forceinline__ const float* ScaleRow(const RuleArgs& a, int g, int K) {
  return a.scale == nullptr ? nullptr : a.scale + (int64_t)(a.scale_per_member ? g : 0) * K;
}

/// Kept value of x at channel k (score scale sc, 1 without a scale): true and v = x * f when kept.
template <typename T>
__device__ __forceinline__ bool KeepValue(T raw, int k, float sc, const MemberRule& r, const RuleArgs& a, float& v) {
  const float xv = Traits<T>::ToFloat(raw);
  const float s = fabsf(xv) * sc;
  bool keep;
  if (a.topk) {
    uint32_t key;
    if constexpr (sizeof(T) == 2) {
      key = a.key16 ? HalfKey16(raw) : ScoreKey32(s);
    } else {
      key = ScoreKey32(s);
    }
    keep = key > r.kth || (key == r.kth && k <= r.tie);
  } else {
    keep = s > r.t;
  }
  if (!keep || xv == 0.0f || isnan(s)) return false;  // zeros are skipped; NaN scores are never kept
  float f = 1.0f;
  if (a.ramp > 0.0f) {
    const float width = a.ramp * r.t;
    if (width > 0.0f) f = fminf(1.0f, fmaxf(0.0f, __fdiv_rn(s - r.t, width)));
  }
  v = xv * f;
  return true;
}

}  // namespace cuda
}  // namespace nbits
}  // namespace acttail
