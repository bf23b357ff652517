// Internal to SparseMatMul's CUDA launchers (cuda.cu, decode_*.cu): member layout, decode scratch sizes, and
// the decode GEMV launcher, instantiated per (type, rows) in decode_f16_m1.cu and decode_rest.cu so that nvcc
// compiles the GEMV instances in parallel.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda/mask_rule.cuh"
#include "sparse_matmul/cuda.h"

namespace acttail {
namespace detail {

// ---- members: how the G members map onto launches -----------------------------------------------
/// Members with one shared rule (one threshold or equal ks, scale absent or [K]) run as one member
/// covering all N columns; otherwise every member has its own rule, selection and column tiles.
struct Layout {
  int G = 1;
  int64_t begin[kMaxMembers] = {0};
  int64_t end[kMaxMembers] = {0};
};

// ---- split-K decode GEMV scratch (kernels/splitk_gemv.cuh: every launch leaves it zero) ----------------

constexpr int64_t kMinTileCols = 128;  // smallest TN of any SplitKGemvKernel instance (float32, SEG 1)

/// Bytes of the split-K scratch for M rows, N columns and G members: tile arrival counters (members tile
/// their columns separately: at most N / kMinTileCols + G tiles), then the float32 accumulator [M, N].
inline int64_t CounterBytes(int64_t N, int G) { return (((N + kMinTileCols - 1) / kMinTileCols + G) * 4 + 255) / 256 * 256; }
inline size_t SplitScratchBytes(int64_t M, int64_t N, int G) { return (size_t)(CounterBytes(N, G) + M * N * 4); }

/// Multiprocessor count of the current device (cached per device).
int CurrentSms();

/// Zeroed scratch of at least `bytes` owned by (device, stream); every split-K launch leaves it zero
/// again, so only its allocation is zeroed (cudaMemsetAsync, stream-ordered, no host sync). Returns
/// null if it would have to grow while the stream is being captured into a CUDA graph (the caller
/// then zeroes per-call scratch instead). Grown buffers are not freed: a graph captured earlier may
/// still replay into one, and each stays zero between launches.
void* StreamScratch(cudaStream_t stream, size_t bytes);

/// Enqueue the decode GEMV for M <= MR rows (MR = 1, 2, 4, 8); cudaErrorInvalidValue: the plan's GemvConfig is not
/// compiled for (T, MR) (harness only).
template <typename T, int MR>
cudaError_t LaunchDecode(const CudaArgs& a, const CudaPlan& plan, const Layout& l, const cuda::DeviceMask& dm, void* per_call_scratch,
                         cudaStream_t stream);

}  // namespace detail
}  // namespace acttail
