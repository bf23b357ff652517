// The CUDA side of SparseMatMul as the op (op.cc) and the benchmark harness (csrc/bench/) call it.
// Only in builds with ACTTAIL_WITH_CUDA; no CUDA header needed to include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/mask.h"

namespace acttail {

/// Arguments of one call; pointers are device memory, `stream` is a cudaStream_t.
struct CudaArgs {
  const void* x = nullptr;
  const void* w = nullptr;
  void* y = nullptr;
  const float* thresholds = nullptr;  // threshold mode: 1 or G float32 values
  int64_t threshold_count = 0;
  const float* scale = nullptr;       // optional per-channel score scale: [K] (scale_rows 1) or [G, K]
  int64_t scale_rows = 0;
  void* workspace = nullptr;          // CudaWorkspaceBytes() bytes (may be null if 0)
  void* stream = nullptr;
  int64_t M = 0, K = 0, N = 0;
  Mode mode = Mode::kThreshold;
  float ramp = 0.0f;
  bool swiglu = false;                // x is [M, 2K] = [gate | up]; the op's input is silu(gate) * up (common/activation.h)
  int G = 1;                          // members: columns [begin[g], end[g]) use threshold g / k[g] / scale row g
  int64_t begin[kMaxMembers] = {0};
  int64_t end[kMaxMembers] = {0};
  int64_t k[kMaxMembers] = {0};       // topk mode
};

/// Kernel parameters of the decode GEMV (M <= 8), chosen per shape (gemv_table.h) or forced by the harness.
struct GemvConfig {
  int warps = 8;    // warps per block (4 or 8): a block owns warps * 32 * chunks input channels
  int seg = 1;      // 16-byte vectors per lane per W row: a block owns 32 * seg * (16 / sizeof(T)) columns
  int unroll = 4;   // kept rows of W in flight per warp (2, 4 or 8)
  int chunks = 1;   // 32-channel groups per warp (1, 2 or 4; pooled needs 1)
  int pooled = -1;  // 1: pool the block's kept channels first; 0: plain; -1: by grid size (LaunchDecode)
};

/// How a call runs; the op derives it (DefaultPlan), the harness may force any of it.
struct CudaPlan {
  GemvConfig gemv;
  bool use_cublas = true;       // prefill: mask into the workspace + cuBLAS when libcublas loads
  bool stream_scratch = true;   // decode: the per-stream self-cleaning scratch (false: per-call, memset)
  bool fuse_prefill = false;    // cuBLAS prefill: every member's mask in one pass over X, one batched GEMM for equally wide
                                // members, SwiGLU inside the mask pass (threshold mode, w_finite); false: a mask pass and a
                                // GEMM per member, the activation kernel apart (DefaultPlan: on unless ACTTAIL_PREFILL_FUSE=0)
  bool w_finite = false;        // W known to hold no Inf/NaN (NonFiniteWeights when the kernel was created): the cuBLAS
                                // prefill skips the Inf/NaN scan of Y and the exact kernel that scan arms
  bool pdl = false;             // decode GEMV as a programmatic dependent launch on sm_90+ (DefaultPlan: on unless ACTTAIL_PDL=0)
};

/// Device scratch needed for this call under `plan`.
size_t CudaWorkspaceBytes(const CudaArgs& args, const CudaPlan& plan);

/// The op's plan for this call: GEMV parameters from the per-shape table, cuBLAS unless ACTTAIL_CUBLAS=0.
CudaPlan DefaultPlan(bool half, const CudaArgs& args);

/// One-time check (synchronous, on a private stream; for kernel creation): *nonfinite = W ([count] elements of float16
/// or float32, device memory) holds an Inf or NaN. Returns "" or the CUDA error text.
std::string NonFiniteWeights(bool half, const void* w, int64_t count, bool* nonfinite);

/// Enqueue the kernels on args.stream without synchronizing; returns "" or the error text.
std::string SparseMatMulCuda(bool half, const CudaArgs& args, const CudaPlan& plan);

}  // namespace acttail
