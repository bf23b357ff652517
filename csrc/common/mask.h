// The ActTail mask rule shared by every op of the library (numpy reference: acttail_export/reference.py).
//
// Per row of X [M, K] and per member g of the op (a column segment of the output; one member when the
// node has no `segments`):
//  * score s_i = |x_i|, or fl32(|x_i| * scale_g[i]) with the optional float32 `scale` input ([K] or [G, K]);
//    float16 x is widened first. A NaN score is never kept, nor is a zero x.
//  * threshold mode keeps s_i > t_g (float32 comparison; t_g = NaN or +inf keeps nothing; t_g < 0 keeps every
//    non-zero x whose score is not NaN).
//  * topk mode keeps the k_g largest scores (ties: lower channel index first); the ranking key is the bit
//    pattern of the score (monotone), NaN / zero / negative scores get key 0 and are never kept, so a row with
//    fewer than k_g positive scores keeps only those. t_g(row) := the largest dropped score (0 if none).
//  * a kept x_i contributes v_i = x_i * f_i with the ramp factor f_i = min(1, (s_i - t) / (ramp * t))
//    (f = 1 when ramp == 0 or t <= 0): continuous in x for ramp > 0, same zero set as the hard mask.
//  * dropped channels and zero x are skipped, never multiplied (Inf/NaN in their rows of W never reach Y);
//    a kept channel is multiplied even when v_i rounds to 0 (kernels store such a v as -0.0f: "kept" is
//    "bit pattern != 0", see IsKept).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace acttail {

enum class Mode : int { kThreshold = 0, kTopK = 1 };

/// Most members (segments) one node may have (kernel launch parameters are sized for it).
constexpr int kMaxMembers = 16;

/// Host-side rule of one member for one call.
struct MemberRule {
  Mode mode = Mode::kThreshold;
  float threshold = 0.0f;         // threshold mode
  int64_t k = 0;                  // topk mode
  const float* scale = nullptr;   // [K] per-channel score scale, or null (s = |x|)
  float ramp = 0.0f;
  bool SameMask(const MemberRule& o) const {
    return mode == o.mode && scale == o.scale && ramp == o.ramp &&
           (mode == Mode::kTopK ? k == o.k : std::memcmp(&threshold, &o.threshold, sizeof(float)) == 0);
  }
};

/// A masked value that is kept (any bit set: -0.0f marks a kept value that is 0).
inline bool IsKept(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b != 0;
}

/// Ranking key of a float32 score: its bit pattern when the score is > 0 (Inf included), else 0.
inline uint32_t ScoreKey(float s) {
  uint32_t b;
  std::memcpy(&b, &s, 4);
  return (b & 0x80000000u) || b > 0x7f800000u ? 0u : b;  // negative, -0, NaN -> 0
}
/// Ranking key of |x| for float16 bits (no scale): the magnitude bits, NaN -> 0.
inline uint32_t HalfMagnitudeKey(uint16_t bits) {
  uint32_t b = bits & 0x7fffu;
  return b > 0x7c00u ? 0u : b;
}

/// Masked row on the CPU: out[c] = x_c * f_c for kept channels (-0.0f when that product is 0), +0.0f for
/// the others. T is float or uint16_t (float16 bits). Returns the number of kept channels.
template <typename T>
int64_t MaskRowCpu(const T* x, int64_t K, const MemberRule& rule, float* out);

/// Column spans of the members of a node: member g owns output columns [begin[g], end[g]).
struct MemberSpans {
  std::vector<int64_t> begin, end;
  int count() const { return (int)end.size(); }
};

/// The G members' column spans [begin[g], end[g]) are equally wide and adjacent (one strided-batched GEMM covers them).
inline bool EqualAdjacentMembers(const int64_t* begin, const int64_t* end, int G) {
  for (int g = 1; g < G; ++g)
    if (end[g] - begin[g] != end[0] - begin[0] || begin[g] != end[g - 1]) return false;
  return true;
}

}  // namespace acttail
