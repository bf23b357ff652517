// The activation an op may apply to its input before the mask (attribute `activation`): with "swiglu", X holds
// [gate | up] (last dimension 2K) and the op's input is x = silu(gate) * up, computed per element in float32 as
// g / (1 + exp(-g)) * u and rounded once to T (numpy reference: acttail_export/reference.py swiglu). It folds the
// Split / Sigmoid / Mul / Mul between a packed gate|up projection and the down projection into the down op.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/float16.h"

#ifdef __CUDACC__
#define ACTTAIL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ACTTAIL_HOST_DEVICE inline
#endif

namespace acttail {

enum class Activation : int { kNone = 0, kSwiGlu = 1 };

/// silu(g) * u in float32 (exp(-g) = Inf for g < -88 gives -0 * u; NaN propagates).
ACTTAIL_HOST_DEVICE float SwiGlu(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/// CPU: out[m, k] = SwiGlu(x[m, k], x[m, K + k]) rounded to T, for X [M, 2K]; T is float or uint16_t (half bits).
template <typename T>
void SwiGluRowsCpu(const T* x, T* out, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const T* g = x + m * 2 * K;
    const T* u = g + K;
    T* o = out + m * K;
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (sizeof(T) == 2) o[k] = FloatToHalf(SwiGlu(HalfToFloat(g[k]), HalfToFloat(u[k])));
      else o[k] = SwiGlu(g[k], u[k]);
    }
  }
}

/// CPU: the op's input rows — `x` itself, or with kSwiGlu silu(gate) * up of X [M, 2K] written into `buffer`.
template <typename T>
const T* ActivatedRowsCpu(Activation act, const T* x, int64_t M, int64_t K, std::vector<T>& buffer) {
  if (act != Activation::kSwiGlu) return x;
  buffer.resize((size_t)(M * K));
  SwiGluRowsCpu<T>(x, buffer.data(), M, K);
  return buffer.data();
}

}  // namespace acttail
