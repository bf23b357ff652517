// com.acttail::SparseMatMul — shared definitions of the CPU and CUDA kernels.
//
// Y[..., N] = mask(X)[..., K] @ W[K, N]  (W in ONNX MatMul layout: a masked channel k skips row k of W).
//
// Semantics (identical on CPU and CUDA):
//  * threshold mode keeps x with |x| > t (float32 comparison; NaN x or NaN t keep nothing; t = +inf
//    keeps nothing; t < 0 keeps every non-NaN entry).
//  * topk mode keeps the k entries of largest |x| per row. The ranking key is the bit pattern of |x|
//    (monotone in |x|); NaN gets key 0, so NaN ranks with zeros and is never multiplied: when fewer
//    than k entries are non-zero and non-NaN, only those are kept (zeros contribute nothing anyway).
//    Ties at the k-th key are broken by channel index (lowest first), the same on every device.
//  * Masked channels and zero entries of X are skipped, not multiplied, so Inf/NaN in such a row of
//    W never reaches Y: Y[m, n] = sum over kept k with x[m, k] != 0 of x[m, k] * W[k, n].
//    Kept Inf entries of X propagate as in an ordinary matmul (Inf * 0 = NaN).
//  * Accumulation is float32 for float32 and float16.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace acttail {

enum class Mode : int { kThreshold = 0, kTopK = 1 };

/// Thrown for bad input; the op turns it into an ORT_INVALID_ARGUMENT status.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// Problem size after flattening X to [M, K].
struct Problem {
  int64_t M = 0, K = 0, N = 0;
  std::vector<int64_t> y_shape;
};

/// Validate shapes of X [..., K] and W [K, N]; throws InvalidArgument naming the fix.
Problem CheckShapes(const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape, const std::string& node);

// ---- ranking keys -------------------------------------------------------------------------------
inline uint32_t MagnitudeKey(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  b &= 0x7fffffffu;
  return b > 0x7f800000u ? 0u : b;  // NaN -> 0
}
inline uint32_t MagnitudeKey16(uint16_t bits) {
  uint32_t b = bits & 0x7fffu;
  return b > 0x7c00u ? 0u : b;  // NaN -> 0
}

/// IEEE half bits -> float (exact).
inline float HalfToFloat(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// float -> IEEE half bits, round to nearest even (overflow -> Inf, NaN stays NaN).
inline uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520 -> Inf
  if (ax < 0x38800000u) {                                      // subnormal half or zero
    if (ax < 0x33000000u) return (uint16_t)sign;               // < 2^-25 rounds to 0
    uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;                                   // 14..24 ->  m >> (shift) gives half mantissa
    uint32_t half = m >> shift, rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return (uint16_t)(sign | half);
  }
  uint32_t half = ((ax - 0x38000000u) >> 13);
  uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return (uint16_t)(sign | half);
}

// ---- CPU kernel ---------------------------------------------------------------------------------
/// Parallel-for callback: fn(i) for i in [0, total).
using ParallelFn = void (*)(void* ctx, void (*fn)(void*, size_t), size_t total, void* data);

/// Run the CPU kernel; T is float or uint16_t (IEEE half bits). `parallel` may be null (serial).
template <typename T>
void SparseMatMulCpu(const T* x, const T* w, T* y, const Problem& p, Mode mode, float threshold, int64_t k,
                     ParallelFn parallel, void* parallel_ctx);

// ---- CUDA kernels (sparse_matmul_impl.cu; only in builds with ACTTAIL_WITH_CUDA) ----------------
/// Arguments of one CUDA launch; pointers are device memory, `stream` is a cudaStream_t.
struct CudaArgs {
  const void* x = nullptr;
  const void* w = nullptr;
  void* y = nullptr;
  const float* threshold = nullptr;  // device scalar (threshold mode)
  void* workspace = nullptr;         // CudaWorkspaceBytes() bytes of device memory (may be null if 0)
  void* stream = nullptr;
  int64_t M = 0, K = 0, N = 0;
  Mode mode = Mode::kThreshold;
  int64_t k = 0;
  int gemv_variant = 0;  // benchmarks only (csrc/sparse_matmul_bench.cu): 0 = the shipped decode kernel
  int prefill_variant = 0;  // benchmarks only: 0 = cuBLAS when it can be loaded, 1 = the op's own GEMM kernels
};

/// Device scratch needed by SparseMatMulCuda for this problem.
size_t CudaWorkspaceBytes(int64_t M, int64_t K, int64_t N, Mode mode);

/// Enqueue the kernels on args.stream without synchronizing; returns "" or the CUDA error text.
std::string SparseMatMulCuda(bool half, const CudaArgs& args);

}  // namespace acttail
