// Decode GEMV, split-K (M <= 8 rows of X): see the comment above SplitKGemvKernel. Its scratch invariant (the
// float32 accumulator and the tile arrival counters are zero before and after every launch) is documented
// there and checked in debug builds by ScratchIsZeroKernel (csrc/sparse_matmul/cuda.cu, LaunchDecode).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cassert>
#include <cstdint>

#include "common/cuda/activation.cuh"
#include "common/cuda/dependent_launch.cuh"
#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// decode GEMV helpers
// ------------------------------------------------------------------------------------------------
/// 16 raw bytes -> V floats.
__device__ __forceinline__ void Unpack(const uint4& v, float (&out)[4], float) {
  out[0] = __uint_as_float(v.x); out[1] = __uint_as_float(v.y); out[2] = __uint_as_float(v.z); out[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void Unpack(const uint4& v, float (&out)[8], __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// ------------------------------------------------------------------------------------------------
// decode GEMV, split-K: Y[M<=8, N] from the kept rows of W, read as long contiguous row segments
// ------------------------------------------------------------------------------------------------
// Grid (tiles, splits). Tiles are numbered member by member (GemvTiles): block (tile, split) owns output columns
// [c0, c0 + TN) of one member g (never crossing into the next member: its rule differs), TN = 32 lanes x SEG x
// 16 bytes, and input channels [split*C, (split+1)*C), C = WARPS*32*chunks: warp w owns the 32-channel groups
// (split*chunks + r)*WARPS + w, r < chunks, one channel per lane. A warp loads its 32 x values (one per lane), ballots the kept ones
// and walks the set bits: for each kept channel every lane loads SEG 16-byte vectors of that row of W,
// so a warp reads one contiguous 512*SEG-byte row segment per kept row, U rows in flight. No scan, no
// shared-memory compaction. The warps' partial sums are reduced in shared memory, then added to a
// float32 accumulator in global memory (one atomicAdd per column and row of X per block); the last
// block of a tile (arrival counter) converts the tile to T, writes Y, and zeroes the accumulator and its
// counter again, so the scratch is left as it was found: zero. THE INVARIANT: the scratch is all zero
// before a launch (zeroed once when allocated, cuda.cu StreamScratch) and the last block of every tile
// leaves its part zero, so every launch leaves it zero for the next one without a memset.
// With `swiglu` x is [M, 2K] = [gate | up] and each block computes silu(gate) * up of its channels as it reads them.
struct GemvTiles {
  int G = 1;
  int tile_start[kMaxMembers + 1] = {0};  // first tile of member g; tile_start[G] = number of tiles
  int begin[kMaxMembers] = {0};           // member g's columns [begin[g], end[g])
  int end[kMaxMembers] = {0};
};


template <typename T>
__device__ __forceinline__ void LoadRowSegment(uint4& out, const T* src, int col, int end, bool aligned) {
  constexpr int V = Traits<T>::kVec;
  if (aligned && col + V <= end) {
    out = __ldcs(reinterpret_cast<const uint4*>(src));
  } else {
    T* r = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int e = 0; e < V; ++e) r[e] = col + e < end ? src[e] : Traits<T>::FromFloat(0.0f);
  }
}

template <typename T, int MR, int SEG, int U>
__device__ __forceinline__ void AccumulateRows(float (&a)[MR][SEG][Traits<T>::kVec], const uint4 (&raw)[U][SEG], const float (&xs)[U][MR],
                                               const bool (&valid)[U]) {
  constexpr int V = Traits<T>::kVec;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (!valid[u]) continue;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (IsKeptValue(xs[u][m])) {  // a row kept only for another row of X is skipped, not multiplied
#pragma unroll
        for (int s = 0; s < SEG; ++s) {
          float wv[V];
          Unpack(raw[u][s], wv, T());
#pragma unroll
          for (int e = 0; e < V; ++e) a[m][s][e] = fmaf(xs[u][m], wv[e], a[m][s][e]);
        }
      }
    }
  }
}

template <typename T, int SEG, int U>
__device__ __forceinline__ void LoadRows(uint4 (&raw)[U][SEG], const T* __restrict__ w, const int (&rows)[U], const bool (&valid)[U],
                                         int N, int colbase, int col_end, bool aligned) {
  constexpr int V = Traits<T>::kVec;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (!valid[u]) continue;
    const T* row = w + (int64_t)rows[u] * N;
#pragma unroll
    for (int s = 0; s < SEG; ++s) {
      const int col = colbase + s * 32 * V;
      if (col < col_end) LoadRowSegment<T>(raw[u][s], row + col, col, col_end, aligned);
      else raw[u][s] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <typename T, int MR, int WARPS, int SEG, int U, bool BAL>
__global__ void __launch_bounds__(WARPS * 32) SplitKGemvKernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                                                int M, int K, int N, DeviceMask dm, GemvTiles tiles, int chunks,
                                                                bool w_aligned, bool swiglu, float* __restrict__ acc,
                                                                unsigned* __restrict__ arrived) {
  constexpr int V = Traits<T>::kVec;
  constexpr int TN = 32 * SEG * V;
  __shared__ float s_red[WARPS][TN];
  __shared__ bool s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = blockIdx.x;
  int g = 0;
  while (g + 1 < tiles.G && tile >= tiles.tile_start[g + 1]) ++g;
  const int col0 = tiles.begin[g] + (tile - tiles.tile_start[g]) * TN, col_end = tiles.end[g];
  const int colbase = col0 + lane * V;  // first column of this lane's vector 0
  // launched as a programmatic dependent (sm_90+): X, the rule (top-k's selection), the scratch and Y only after the wait
  GridLaunchDependents();
  GridDependencyWait();
  Rule rules[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) rules[m] = LoadRule(dm, m, M, g);

  float a[MR][SEG][V];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int s = 0; s < SEG; ++s)
#pragma unroll
      for (int e = 0; e < V; ++e) a[m][s][e] = 0.0f;

  for (int r = 0; r < chunks; ++r) {
    const int chan0 = ((blockIdx.y * chunks + r) * WARPS + warp) * 32;  // first channel of this warp's group
    const int c = chan0 + lane;
    float xv[MR];
    bool mine = false;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      xv[m] = 0.0f;
      if (m < M && c < K) {
        // swiglu: x is [M, 2K] = [gate | up] and the input is silu(gate) * up (common/activation.h)
        xv[m] = MaskedValue(swiglu ? SwiGluAt<T>(x, m, c, K) : x[(int64_t)m * K + c], c, rules[m], dm);
        mine |= IsKeptValue(xv[m]);
      }
    }
    unsigned kept = __ballot_sync(0xffffffffu, mine);

    if constexpr (BAL) {
      // balance (chunks == 1): one block-wide list of the kept channels (warp order = channel order), entry
      // i streamed by warp i % WARPS, so every warp of the block gets the same number of rows (+-1)
      __shared__ int s_cnt[WARPS];
      __shared__ int s_idx[WARPS * 32];
      __shared__ float s_x[MR][WARPS * 32];
      if (lane == 0) s_cnt[warp] = __popc(kept);
      __syncthreads();
      int before = 0, total = 0;
#pragma unroll
      for (int q = 0; q < WARPS; ++q) {
        const int v = s_cnt[q];
        before += q < warp ? v : 0;
        total += v;
      }
      if (mine) {
        const int pos = before + __popc(kept & ((1u << lane) - 1u));
        s_idx[pos] = c;
#pragma unroll
        for (int m = 0; m < MR; ++m) s_x[m][pos] = xv[m];
      }
      __syncthreads();
      for (int i0 = warp; i0 < total; i0 += WARPS * U) {
        int rows[U];
        bool valid[U];
        float xs[U][MR];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = i0 + u * WARPS;
          valid[u] = i < total;
          rows[u] = valid[u] ? s_idx[i] : 0;
#pragma unroll
          for (int m = 0; m < MR; ++m) xs[u][m] = valid[u] ? s_x[m][i] : 0.0f;
        }
        uint4 raw[U][SEG];
        LoadRows<T, SEG, U>(raw, w, rows, valid, N, colbase, col_end, w_aligned);
        AccumulateRows<T, MR, SEG, U>(a, raw, xs, valid);
      }
      kept = 0;
    }

    while (kept) {  // warp-uniform
      int rows[U];
      bool valid[U];
      float xs[U][MR];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int idx = kept ? __ffs(kept) - 1 : -1;
        kept &= kept - 1;  // kept == 0 stays 0
        valid[u] = idx >= 0;
        rows[u] = chan0 + (valid[u] ? idx : 0);
#pragma unroll
        for (int m = 0; m < MR; ++m) xs[u][m] = __shfl_sync(0xffffffffu, xv[m], valid[u] ? idx : 0);
      }
      uint4 raw[U][SEG];
      LoadRows<T, SEG, U>(raw, w, rows, valid, N, colbase, col_end, w_aligned);
      AccumulateRows<T, MR, SEG, U>(a, raw, xs, valid);
    }
  }

  // ---- reduce the warps of the block, then add to the float32 accumulator ----
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    if (m >= M) break;  // uniform
#pragma unroll
    for (int s = 0; s < SEG; ++s)
#pragma unroll
      for (int e = 0; e < V; ++e) s_red[warp][s * 32 * V + lane * V + e] = a[m][s][e];
    __syncthreads();
    for (int i = tid; i < TN; i += WARPS * 32) {
      const int col = col0 + i;
      if (col < col_end) {
        float v = 0.0f;
#pragma unroll
        for (int q = 0; q < WARPS; ++q) v += s_red[q][i];
        atomicAdd(acc + (int64_t)m * N + col, v);
      }
    }
    __syncthreads();
  }
  // ---- the last block of this tile writes Y and re-zeroes the scratch ----
  // The barrier orders every thread's atomicAdds before thread 0's arrival, whose release makes them
  // visible with it (cumulativity); its acquire orders the last block's reads after all arrivals. One
  // acq_rel atomic instead of fence + atomic + fence: 0.2-0.35 us less per call on H200 (docs/kernels.md).
  __syncthreads();
  if (tid == 0) {
    unsigned prev;
    asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(prev) : "l"(arrived + tile) : "memory");
    s_last = prev == gridDim.y - 1;
  }
  __syncthreads();
  if (!s_last) return;
  for (int i = tid; i < M * TN; i += WARPS * 32) {
    const int m = i / TN, col = col0 + i % TN;
    if (col < col_end) {
      float* p = acc + (int64_t)m * N + col;
      y[(int64_t)m * N + col] = Traits<T>::FromFloat(__ldcg(p));
      *p = 0.0f;
    }
  }
  if (tid == 0) arrived[tile] = 0u;
}

/// Debug builds: asserts that `words` 32-bit words of the decode scratch are zero (the invariant above).
template <int kUnused = 0>
__global__ void ScratchIsZeroKernel(const unsigned* __restrict__ p, int64_t words) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += (int64_t)gridDim.x * blockDim.x)
    assert(p[i] == 0u && "decode scratch left non-zero");
}

}  // namespace cuda
}  // namespace acttail
