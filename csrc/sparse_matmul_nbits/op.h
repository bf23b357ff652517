// com.acttail::SparseMatMulNBits — definitions shared by the ORT glue (op.cc), the CPU kernel (cpu.cc), the CUDA
// launchers (cuda.cu, kernels/*.cuh) and the benchmark harness (bench.cu).
//
// Y[..., N] = mask(X)[..., K] @ W[K, N] with 4-bit block-quantized W:
//   W[k, n] = scales[k / B, n] * q[k, n] + offsets[k / B, n],   q in 0..15,
//   Q uint8 [K, ceil(N/2)]: row k holds column n in byte n/2, low nibble for even n (a kept row k is
//   ceil(N/2) contiguous bytes), scales / offsets T [ceil(K/B), N] (the last block may be partial).
// The mask rule (per member, threshold / top-k, score scale, ramp) is common/mask.h.
// Accumulation (every path, float32): per row m and quant block b,
//   y[m, n] += s_{b,n} * sum_{k in b kept} v_k q_{k,n} + o_{b,n} * sum_{k in b kept} v_k,
// only for the blocks where row m keeps at least one channel (Inf/NaN scales of unused blocks never reach Y).
// The CUDA prefill (M > 8 rows) multiplies mask(X) by W dequantized to T instead (cuBLAS) and reruns the exact
// kernel when that dequantized W holds an Inf/NaN.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/mask.h"

namespace acttail {
namespace nbits {

constexpr const char* kOpName = "SparseMatMulNBits";
constexpr size_t kThresholdInput = 4, kScaleInput = 5;

/// Shape attributes of one node (the mask attributes are common/attributes.h's MaskAttributes).
struct Shape {
  int64_t K = 0, N = 0, B = 0;
  int64_t Blocks() const { return (K + B - 1) / B; }
};

/// One call: X flattened to [M, K], the members and the optional inputs as the kernels see them.
struct Problem {
  int64_t M = 0, K = 0, N = 0, B = 0, blocks = 0;  // blocks = ceil(K / B)
  std::vector<int64_t> y_shape;
  MemberSpans spans;
  int64_t threshold_count = 0;  // threshold mode: 1 or G values
  int64_t scale_rows = 0;       // 0: no scale input, 1: [K] shared, G: [G, K]
  float density = -1.0f;        // threshold mode: the expected kept fraction (attribute density; < 0: unknown)
};

// ---- CPU ----------------------------------------------------------------------------------------
using ParallelFn = void (*)(void* ctx, void (*fn)(void*, size_t), size_t total, void* data);

/// T = float or uint16_t (IEEE half bits); rules[g] applies to the columns of member g.
template <typename T>
void CpuRun(const Problem& p, const std::vector<MemberRule>& rules, const T* x, const uint8_t* q, const T* scales, const T* offsets,
            T* y, ParallelFn parallel, void* parallel_ctx);

// ---- CUDA (cuda.cu; builds with ACTTAIL_WITH_CUDA) ------------------------------------------------
/// Decode kernel parameters (per shape: ChooseDecode in cuda.cu; the harness may force them). 0 = choose.
struct DecodeConfig {
  int cols_per_lane = 0;  // one row of X, float16: stream-K 32 (16-byte loads of Q) or 16 (8-byte); cluster 4, 8 or 16
  int blocks_per_sm = 0;  // stream-K grid = SMs x blocks_per_sm blocks of 256 threads (capped by occupancy)
  int prefetch = -1;      // 1: prefetch each warp's rows into L2 before streaming them; 0: no; -1: choose
  int stage = -1;         // one row of X: 1 = stage each warp's rows in shared memory (cp.async), 0 = register loads; -1: choose
  int kernel = -1;        // one row of X: 1 = the cluster GEMV (sm_90+, gemv_cluster.cuh), 0 = stream-K, 2 = stream-K with the
                          // tensor-core row loop (float16, sm_80+), 3 = stream-K with the one-row loop (StreamRowsOne),
                          // 4 = the one-row loop software-pipelined (StreamRowsPipe); -1: choose
  int splits = 0;         // cluster GEMV: blocks per tile (the cluster size, 1..16); 0: choose
  // stream-K GEMV, before it waits for the previous kernel (programmatic dependent launch): 1 = prefetch the scales /
  // offsets of the block's range into L2, 2 = those and its rows of Q, 0 = nothing; -1: choose (ACTTAIL_EARLY_PREFETCH)
  int early = -1;
  int pdl = -1;  // stream-K GEMV: 1 = programmatic dependent launch (sm_90+), 0 = a plain launch; -1: choose (ACTTAIL_PDL)
};

/// Expected kept fraction from which one-row decode calls take the one-row loop (kernel 3) when the table does not
/// choose: it is faster with most rows kept and slower with few (docs/kernels.md).
constexpr float kOneRowMinDensity = 0.35f;
/// What the stream-K decode GEMV prefetches into L2 before it waits for the previous kernel (DecodeConfig::early) when
/// ACTTAIL_EARLY_PREFETCH does not say: nothing (per call on the H200, against the dependent launch alone, the scales
/// measured -1 % to +9 %, scales and rows +1 % to +12 %; docs/kernels.md).
constexpr int kEarlyPrefetch = 0;

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
  Mode mode = Mode::kThreshold;
  float ramp = 0.0f;
  bool swiglu = false;      // x is [M, 2K] = [gate | up]; the op's input is silu(gate) * up (common/activation.h)
  std::vector<int64_t> ks;  // topk: per member
};

/// How a call runs; the op derives it, the harness may force any of it.
struct CudaPlan {
  DecodeConfig decode;
  bool use_cublas = true;      // prefill: mask + dequantize into the workspace + cuBLAS, when libcublas loads
  bool stream_scratch = true;  // decode: the per-stream self-cleaning scratch (false: per-call, memset)
  // prefill with cuBLAS: W is dequantized in chunks of at most this many bytes (<= 0, the op's plan: all of W at once;
  // chunks measured slower on the H200, docs/kernels.md), each multiplied before the next is written over it; chunks of
  // prefill_chunk_cols columns (0: 4096) when W is larger
  int64_t prefill_chunk_bytes = 0;
  int64_t prefill_chunk_cols = 0;
  // the dequantized W known to hold no Inf/NaN (NonFiniteDequantized when the kernel was created): the cuBLAS prefill
  // does not launch the exact kernel its Inf/NaN flag arms
  bool w_finite = false;
  // prefill with cuBLAS: one strided-batched GEMM for equally wide adjacent members and, in threshold mode with w_finite,
  // the SwiGLU input computed from [gate | up] by the mask pass itself (no activation kernel, no [M, K] copy of it);
  // false: a GEMM per member, the activation kernel first (DefaultPlan: on unless ACTTAIL_PREFILL_FUSE=0)
  bool fuse_prefill = false;
  // decode of one float16 row in top-k mode without a score scale: every GEMV block computes the selection itself
  // (BlockSelectHalf) instead of a selection kernel before it, and a SwiGLU input is computed inline
  // (DefaultPlan: off unless ACTTAIL_FUSED_SELECT=1; measured 1.17-1.44x slower, docs/kernels.md)
  bool self_select = false;
};

/// Device workspace of one call under `plan` (the prefill's chunk of W depends on it).
size_t CudaWorkspaceBytes(const Problem& p, const CudaArgs& args, const CudaPlan& plan, bool half);
/// The op's plan: decode parameters from the per-shape table, cuBLAS unless ACTTAIL_CUBLAS=0, all of W dequantized at
/// once for prefill.
CudaPlan DefaultPlan(const Problem& p, bool half);
/// One-time check (synchronous, on a private stream; for kernel creation): *nonfinite = some fl_T(s * q + o), q in
/// [0, 15], of the [count] scales / offsets (device memory) is Inf or NaN — the extremes q = 0 and 15 decide, fmaf being
/// monotone in q. Returns "" or the CUDA error text.
std::string NonFiniteDequantized(bool half, const void* scales, const void* offsets, int64_t count, bool* nonfinite);
/// Enqueue on args.stream without synchronizing; returns "" or the CUDA / cuBLAS error text.
std::string CudaRun(bool half, const Problem& p, const CudaArgs& args, const CudaPlan& plan);

}  // namespace nbits
}  // namespace acttail
