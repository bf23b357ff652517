// Decode GEMV launch templates (see launch.h); included only by the decode_*.cu instantiation units.
#pragma once

#include <algorithm>
#include <type_traits>

#include "common/cuda/dependent_launch.cuh"
#include "sparse_matmul/kernels/splitk_gemv.cuh"
#include "sparse_matmul/launch.h"

namespace acttail {
namespace detail {

// ---- decode GEMV launch -------------------------------------------------------------------------
template <typename T, int MR, int WARPS, int SEG, int U, bool BAL>
cudaError_t LaunchSplitK(const CudaArgs& a, const Layout& l, const cuda::DeviceMask& dm, int chunks, void* scratch, bool dependent,
                         cudaStream_t stream) {
  constexpr int V = cuda::Traits<T>::kVec, TN = 32 * SEG * V;
  cuda::GemvTiles tiles;
  tiles.G = l.G;
  bool aligned = reinterpret_cast<uintptr_t>(a.w) % 16 == 0 && (a.N * sizeof(T)) % 16 == 0;
  int total = 0;
  for (int g = 0; g < l.G; ++g) {
    tiles.tile_start[g] = total;
    tiles.begin[g] = (int)l.begin[g];
    tiles.end[g] = (int)l.end[g];
    total += (int)((l.end[g] - l.begin[g] + TN - 1) / TN);
    aligned &= l.begin[g] % V == 0;
  }
  tiles.tile_start[l.G] = total;
  const int64_t per_block = (int64_t)WARPS * 32 * chunks;
  const int64_t splits = std::max<int64_t>(1, (a.K + per_block - 1) / per_block);  // K == 0: one split writes zeros
  if (splits > 65535) return cudaErrorInvalidConfiguration;
  unsigned* arrived = static_cast<unsigned*>(scratch);
  float* acc = reinterpret_cast<float*>(static_cast<char*>(scratch) + CounterBytes(a.N, l.G));
  cudaError_t err = cuda::LaunchDependent(dependent, cuda::SplitKGemvKernel<T, MR, WARPS, SEG, U, BAL>, dim3((unsigned)total, (unsigned)splits),
                                          dim3(WARPS * 32), 0, stream, static_cast<const T*>(a.x), static_cast<const T*>(a.w),
                                          static_cast<T*>(a.y), (int)a.M, (int)a.K, (int)a.N, dm, tiles, chunks, aligned, (bool)a.swiglu, acc,
                                          arrived);
#ifndef NDEBUG
  if (err == cudaSuccess) {  // the invariant of splitk_gemv.cuh: every launch leaves its scratch zero
    const int64_t words = SplitScratchBytes(a.M, a.N, l.G) / 4;
    cuda::ScratchIsZeroKernel<<<cuda::ElementwiseBlocks(words), 256, 0, stream>>>(static_cast<const unsigned*>(scratch), words);
    err = cudaGetLastError();
  }
#endif
  return err;
}

/// Kernel parameters compiled for (T, MR): every GemvConfig of the sweep for float16 one-row decode, the
/// default (8 warps, 1 segment, 4 rows in flight) for the rest.
template <typename T, int MR>
cudaError_t DispatchGemv(const GemvConfig& c, bool pooled, const CudaArgs& a, const Layout& l, const cuda::DeviceMask& dm, void* scratch,
                         bool dependent, cudaStream_t stream) {
  const int chunks = pooled ? 1 : c.chunks;
#define ACTTAIL_GEMV(W, S, U)                                                                                  \
  if (c.warps == W && c.seg == S && c.unroll == U)                                                             \
    return pooled ? LaunchSplitK<T, MR, W, S, U, true>(a, l, dm, chunks, scratch, dependent, stream)          \
                  : LaunchSplitK<T, MR, W, S, U, false>(a, l, dm, chunks, scratch, dependent, stream);
  if constexpr (std::is_same<T, __half>::value && MR == 1) {
    ACTTAIL_GEMV(4, 1, 4) ACTTAIL_GEMV(4, 1, 8) ACTTAIL_GEMV(4, 2, 4) ACTTAIL_GEMV(4, 2, 8)
    ACTTAIL_GEMV(8, 1, 8) ACTTAIL_GEMV(8, 2, 4) ACTTAIL_GEMV(8, 2, 8)
  }
  ACTTAIL_GEMV(8, 1, 4)
#undef ACTTAIL_GEMV
  return cudaErrorInvalidValue;  // a configuration not compiled for this type and row count (harness only)
}

/// Decode GEMV (M <= 8). Unless the plan says, grids of fewer than 3 blocks per multiprocessor pool each
/// block's kept channels first: with few blocks the slowest warp sets the time (LLaMA-7B 4096x4096 at
/// 50-80 %: 9.0 vs 9.8 us, 5.8 vs 6.7 us on H200), with many the extra block barrier costs more than it
/// saves (11008x4096 at 50 %: 18.0 vs 14.7 us); docs/kernels.md.
template <typename T, int MR>
cudaError_t LaunchDecode(const CudaArgs& a, const CudaPlan& plan, const Layout& l, const cuda::DeviceMask& dm, void* per_call_scratch,
                         cudaStream_t stream) {
  const size_t bytes = SplitScratchBytes(a.M, a.N, l.G);
  void* scratch = plan.stream_scratch ? StreamScratch(stream, bytes) : nullptr;
  if (scratch == nullptr) {
    scratch = per_call_scratch;
    cudaError_t err = cudaMemsetAsync(scratch, 0, bytes, stream);
    if (err != cudaSuccess) return err;
  }
  const GemvConfig& c = plan.gemv;
  const int64_t tn = 32 * c.seg * cuda::Traits<T>::kVec, per_block = (int64_t)c.warps * 32 * std::max(1, c.chunks);
  const int64_t blocks = ((a.N + tn - 1) / tn + l.G - 1) * std::max<int64_t>(1, (a.K + per_block - 1) / per_block);
  const bool pooled = c.pooled == 1 || (c.pooled == -1 && blocks < 3 * (int64_t)CurrentSms());
  // as a programmatic dependent (sm_90+): its blocks start while the previous kernel drains and wait before reading X
  return DispatchGemv<T, MR>(c, pooled, a, l, dm, scratch, plan.pdl, stream);
}

}  // namespace detail
}  // namespace acttail
