// com.acttail::SparseMatMulNBits — definitions shared by the ORT glue (op.cc), the CPU kernel (cpu.cc) and
// the CUDA kernels (cuda.cu, kernels/*.cuh).
//
// Y[..., N] = mask(X)[..., K] @ W[K, N] with 4-bit block-quantized W:
//   W[k, n] = scales[k / B, n] * q[k, n] + offsets[k / B, n],   q in 0..15,
//   Q uint8 [K, ceil(N/2)]: row k holds column n in byte n/2, low nibble for even n (a kept row k is
//   ceil(N/2) contiguous bytes), scales / offsets T [ceil(K/B), N] (the last block may be partial).
//
// Mask rule (acttail_export/reference.py), per member g (output columns segments[g-1]..segments[g]):
//   score s_i = |x_i| (or fl32(|x_i| * scale_g[i])), float32;
//   threshold: keep s_i > t_g (float32 compare; NaN never kept);
//   topk: keep the k_g largest scores (ties: lower index first; NaN ranks as 0 and is then dropped);
//         t_g(row) = largest dropped score (0 if none dropped);
//   kept value v_i = x_i * f_i, f_i = min(1, (s_i - t) / (ramp * t)) (1 if ramp * t <= 0);
//   zero x_i and dropped channels are skipped (never multiplied).
// Accumulation (every path, float32): per row m and quant block b,
//   y[m, n] += s_{b,n} * sum_{k in b kept} v_k q_{k,n} + o_{b,n} * sum_{k in b kept} v_k,
// only for blocks where row m keeps at least one channel (so Inf/NaN scales of unused blocks never reach Y).
// The CUDA prefill (M > 8 rows) multiplies mask(X) by W dequantized to T instead (cuBLAS), and reruns the
// exact kernel when that dequantized W holds Inf/NaN.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sparse_matmul.h"  // Mode, InvalidArgument, HalfToFloat / FloatToHalf, ParallelFn

namespace acttail {
namespace nbits {

constexpr const char* kOpName = "SparseMatMulNBits";
constexpr int kMaxMembers = 8;  // members of one packed MatMul (q/k/v: 3, gate/up: 2)

/// Attributes of one node, validated at session creation.
struct Attributes {
  std::string node;
  Mode mode = Mode::kThreshold;
  int64_t K = 0, N = 0, block = 0;
  std::vector<int64_t> ends;  // cumulative member column ends (one member: {N})
  std::vector<int64_t> ks;    // topk: channels kept per member
  float ramp = 0.0f;
  int Members() const { return (int)ends.size(); }
  int64_t Begin(int g) const { return g == 0 ? 0 : ends[(size_t)g - 1]; }
};

/// Parse and validate; `get_*` read one attribute (false when absent). Throws InvalidArgument.
struct AttributeReader {
  virtual ~AttributeReader() = default;
  virtual bool Int(const char* name, int64_t* out) const = 0;
  virtual bool Ints(const char* name, std::vector<int64_t>* out) const = 0;
  virtual bool Float(const char* name, float* out) const = 0;
  virtual bool String(const char* name, std::string* out) const = 0;
};
Attributes ParseAttributes(const AttributeReader& r, const std::string& node, size_t input_count);

/// One call: shapes after flattening X to [M, K], and the optional inputs as the kernels see them.
struct Problem {
  int64_t M = 0, K = 0, N = 0, B = 0, blocks = 0;  // blocks = ceil(K / B)
  std::vector<int64_t> y_shape;
  int64_t thresholds = 0;  // elements of the thresholds input (threshold mode: 1 or G)
  int64_t scale_rows = 0;  // 0: no scale input, 1: [K] shared, G: [G, K]
};

/// Validate the runtime shapes against the attributes. Throws InvalidArgument naming the node and the fix.
Problem CheckShapes(const Attributes& a, const std::vector<int64_t>& x, const std::vector<int64_t>& q,
                    const std::vector<int64_t>& scales, const std::vector<int64_t>& offsets, const std::vector<int64_t>* thresholds,
                    const std::vector<int64_t>* scale);

/// Selection groups: 1 when every member keeps the same channels (same rule), else one per member.
/// Threshold mode: per member when thresholds or scale rows differ per member; topk: when ks or scale rows do.
int RuleGroups(const Attributes& a, const Problem& p);

// ---- CPU ----------------------------------------------------------------------------------------
/// T = float or uint16_t (IEEE half bits). Host pointers; thresholds / scale may be null when absent.
template <typename T>
void CpuRun(const Attributes& a, const Problem& p, const T* x, const uint8_t* q, const T* scales, const T* offsets,
            const float* thresholds, const float* scale, T* y, ParallelFn parallel, void* parallel_ctx);

// ---- CUDA (cuda.cu; builds with ACTTAIL_WITH_CUDA) ------------------------------------------------
/// Decode kernel configuration (per shape; see ChooseDecode in cuda.cu). 0 = choose.
struct DecodeConfig {
  int cols_per_lane = 0;    // 32 (16-byte loads) or 16 (8-byte loads) for one row of X
  int blocks_per_sm = 0;    // stream-K grid = SMs x blocks_per_sm blocks of 256 threads
};

struct CudaArgs {
  const void* x = nullptr;
  const uint8_t* q = nullptr;
  const void* scales = nullptr;
  const void* offsets = nullptr;
  const float* thresholds = nullptr;  // device; threshold mode
  const float* scale = nullptr;       // device; may be null
  void* y = nullptr;
  void* workspace = nullptr;  // CudaWorkspaceBytes() bytes of device memory
  void* stream = nullptr;
  DecodeConfig decode;      // benchmarks only: force a decode configuration
  int prefill_variant = 0;  // benchmarks / tests: 0 = cuBLAS when loadable, 1 = the exact kernel only
};

size_t CudaWorkspaceBytes(const Attributes& a, const Problem& p, bool half);
/// Enqueue on args.stream without synchronizing; returns "" or the CUDA / cuBLAS error text.
std::string CudaRun(bool half, const Attributes& a, const Problem& p, const CudaArgs& args);

}  // namespace nbits
}  // namespace acttail
