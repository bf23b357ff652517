// The mask rule of common/mask.h on the CPU, one row at a time (branch-free selects: which entries pass
// is random, and a mispredicted branch per entry cost more than the whole GEMM's share of a row at 50 %).
#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

#include "common/float16.h"
#include "common/mask.h"

namespace acttail {
namespace {

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) { return HalfToFloat(v); }

/// Ranking keys of a row and the float score of a key.
template <typename T>
struct Keys {
  static constexpr bool kHalfBits = std::is_same<T, uint16_t>::value;
  const float* scale;
  bool half_keys() const { return kHalfBits && scale == nullptr; }
  uint32_t Key(const T& v, int64_t c) const {
    if constexpr (kHalfBits) {
      if (scale == nullptr) return HalfMagnitudeKey(v);
    }
    const float mag = std::fabs(ToFloat(v));
    return ScoreKey(scale == nullptr ? mag : mag * scale[c]);
  }
  float Score(uint32_t key) const {
    if (half_keys()) return HalfToFloat((uint16_t)key);
    float f;
    std::memcpy(&f, &key, 4);
    return f;
  }
};

/// The key of the r-th largest (1-based, r <= keys.size()) of `keys`: a 2048-bin histogram of the keys' top
/// bits finds the bin that holds it, then nth_element runs on that bin's few keys only (nth_element over all
/// K keys mispredicts a branch per key and per pass: +10-20 us per call at K = 1536).
uint32_t NthLargest(const std::vector<uint32_t>& keys, int64_t r, int shift) {
  constexpr int kBins = 2048;
  uint32_t hist[kBins] = {};
  for (uint32_t k : keys) ++hist[k >> shift];
  int64_t above = 0;
  uint32_t b = kBins - 1;
  for (; b > 0 && above + (int64_t)hist[b] < r; --b) above += hist[b];
  thread_local std::vector<uint32_t> bin;
  bin.clear();
  for (uint32_t k : keys)
    if ((k >> shift) == b) bin.push_back(k);
  const int64_t rank = r - above;  // 1-based rank inside the bin
  std::nth_element(bin.begin(), bin.begin() + (rank - 1), bin.end(), std::greater<uint32_t>());
  return bin[(size_t)(rank - 1)];
}

/// Value stored for a kept channel: x * f, with -0.0f standing for a product of 0 (still multiplied).
inline float KeptValue(float x, float f) {
  const float v = x * f;
  return v == 0.0f ? -0.0f : v;
}

/// Ramp factor min(1, (s - t) / (ramp * t)); 1 when ramp == 0 or t <= 0; NaN when s = t = Inf (as the reference).
inline float RampFactor(float s, float t, float ramp) {
  if (ramp == 0.0f || !(t > 0.0f)) return 1.0f;
  const float f = (s - t) / (ramp * t);
  return f > 1.0f ? 1.0f : f;
}

template <typename T>
int64_t ThresholdRow(const T* x, int64_t K, const MemberRule& rule, float* out) {
  const float t = rule.threshold;
  int64_t n = 0;
  for (int64_t c = 0; c < K; ++c) {
    const float v = ToFloat(x[c]);
    const float mag = std::fabs(v);
    const float s = rule.scale == nullptr ? mag : mag * rule.scale[c];
    const bool keep = s > t && v != 0.0f;  // NaN never passes
    if (rule.ramp == 0.0f) {
      out[c] = keep ? v : 0.0f;
    } else {
      out[c] = keep ? KeptValue(v, RampFactor(s, t, rule.ramp)) : 0.0f;
    }
    n += keep;
  }
  return n;
}

template <typename T>
int64_t TopKRow(const T* x, int64_t K, const MemberRule& rule, float* out) {
  const Keys<T> kf{rule.scale};
  thread_local std::vector<uint32_t> keys;
  keys.resize((size_t)K);
  for (int64_t c = 0; c < K; ++c) keys[c] = kf.Key(x[c], c);
  // cut = key of the (k+1)-th largest score (the largest dropped one); keep keys above it and the first
  // (k - #above) channels whose key equals it. k >= K: keep every positive key, t = 0.
  uint32_t cut = 0;
  int64_t ties = 0;
  if (rule.k < K) {
    cut = NthLargest(keys, rule.k + 1, kf.half_keys() ? 4 : 20);  // keys < 2^15 or < 2^31: 2048 bins
    int64_t greater = 0;
    for (int64_t c = 0; c < K; ++c) greater += keys[c] > cut;
    ties = cut == 0 ? 0 : rule.k - greater;  // key 0 (zero, NaN, negative score) is never kept
  }
  const float t = rule.ramp == 0.0f ? 0.0f : kf.Score(cut);
  int64_t n = 0;
  for (int64_t c = 0; c < K; ++c) {
    const bool tie = keys[c] == cut && ties > 0;  // the first `ties` channels with the cut key, in order
    ties -= tie;
    const bool keep = keys[c] > cut || tie;
    if (rule.ramp == 0.0f) {
      out[c] = keep ? ToFloat(x[c]) : 0.0f;
    } else {
      out[c] = keep ? KeptValue(ToFloat(x[c]), RampFactor(kf.Score(keys[c]), t, rule.ramp)) : 0.0f;
    }
    n += keep;
  }
  return n;
}

}  // namespace

template <typename T>
int64_t MaskRowCpu(const T* x, int64_t K, const MemberRule& rule, float* out) {
  if (rule.mode == Mode::kThreshold) return ThresholdRow(x, K, rule, out);
  if (rule.k == 0) {
    std::fill(out, out + K, 0.0f);
    return 0;
  }
  return TopKRow(x, K, rule, out);
}

template int64_t MaskRowCpu<float>(const float*, int64_t, const MemberRule&, float*);
template int64_t MaskRowCpu<uint16_t>(const uint16_t*, int64_t, const MemberRule&, float*);

}  // namespace acttail
