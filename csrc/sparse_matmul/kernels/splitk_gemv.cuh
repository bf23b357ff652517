// Decode GEMV, split-K (M <= 8 rows of X): see the comment above SplitKGemvKernel.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

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
// Grid (tiles, splits). Block (tile, split) owns output columns [tile*TN, (tile+1)*TN), TN = 32 lanes x
// SEG x 16 bytes, and input channels [split*WARPS*32, (split+1)*WARPS*32): warp w of the block owns 32
// of those channels, one per lane. A warp loads its 32 x values (one per lane), ballots the kept ones
// and walks the set bits: for each kept channel every lane loads SEG 16-byte vectors of that row of W,
// so a warp reads one contiguous 512*SEG-byte row segment per kept row, U rows in flight. No scan, no
// shared-memory compaction. The warps' partial sums are reduced in shared memory, then added to a
// float32 accumulator in global memory (one atomicAdd per column and row of X per block); the last
// block of a tile (arrival counter) converts the tile to T, writes Y, and zeroes the accumulator and its
// counter again, so the scratch is left as it was found: zero.

template <typename T>
__device__ __forceinline__ void LoadRowSegment(uint4& out, const T* src, int col, int N, bool aligned) {
  constexpr int V = Traits<T>::kVec;
  if (aligned && col + V <= N) {
    out = __ldcs(reinterpret_cast<const uint4*>(src));
  } else {
    T* r = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int e = 0; e < V; ++e) r[e] = col + e < N ? src[e] : Traits<T>::FromFloat(0.0f);
  }
}

template <typename T, int MR, int WARPS, int SEG, int U, bool BAL>
__global__ void __launch_bounds__(WARPS * 32) SplitKGemvKernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                                                     int M, int K, int N, const float* __restrict__ thr,
                                                                     const uint2* __restrict__ sel, bool topk, bool w_aligned,
                                                                     float* __restrict__ acc, unsigned* __restrict__ arrived) {
  constexpr int V = Traits<T>::kVec;
  constexpr int TN = 32 * SEG * V;
  __shared__ float s_red[WARPS][TN];
  __shared__ bool s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = blockIdx.x;
  const int chan0 = (blockIdx.y * WARPS + warp) * 32;  // first channel of this warp
  const int c = chan0 + lane;                                 // this lane's channel
  const int colbase = tile * TN + lane * V;                   // first column of this lane's vector 0

  float xv[MR];
  bool mine = false;
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    xv[m] = 0.0f;
    if (m < M && c < K) {
      const Rule r = LoadRule(m, M, topk, thr, sel);
      const T raw = x[(int64_t)m * K + c];
      if (Keep(raw, c, r, topk)) {
        xv[m] = Traits<T>::ToFloat(raw);
        mine = true;
      }
    }
  }
  unsigned kept = __ballot_sync(0xffffffffu, mine);

  float a[MR][SEG][V];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int s = 0; s < SEG; ++s)
#pragma unroll
      for (int e = 0; e < V; ++e) a[m][s][e] = 0.0f;

  if constexpr (BAL) {
    // balance: one block-wide list of the kept channels (warp order = channel order), entry i
    // streamed by warp i % WARPS, so every warp of the block gets the same number of rows (+-1)
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
      uint4 raw[U][SEG];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * WARPS;
        if (i < total) {
          const T* row = w + (int64_t)s_idx[i] * N;
#pragma unroll
          for (int s = 0; s < SEG; ++s) {
            const int col = colbase + s * 32 * V;
            if (col < N) LoadRowSegment<T>(raw[u][s], row + col, col, N, w_aligned);
            else raw[u][s] = make_uint4(0u, 0u, 0u, 0u);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * WARPS;
        if (i < total) {
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            const float xs = s_x[m][i];
            if (xs != 0.0f) {
#pragma unroll
              for (int s = 0; s < SEG; ++s) {
                float wv[V];
                Unpack(raw[u][s], wv, T());
#pragma unroll
                for (int e = 0; e < V; ++e) a[m][s][e] = fmaf(xs, wv[e], a[m][s][e]);
              }
            }
          }
        }
      }
    }
    kept = 0;
  }

  while (kept) {  // warp-uniform
    int idx[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      idx[u] = kept ? __ffs(kept) - 1 : -1;
      kept &= kept - 1;  // kept == 0 stays 0
    }
    uint4 raw[U][SEG];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (idx[u] >= 0) {
        const T* row = w + (int64_t)(chan0 + idx[u]) * N;
#pragma unroll
        for (int s = 0; s < SEG; ++s) {
          const int col = colbase + s * 32 * V;
          if (col < N) LoadRowSegment<T>(raw[u][s], row + col, col, N, w_aligned);
          else raw[u][s] = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (idx[u] >= 0) {
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          const float xs = __shfl_sync(0xffffffffu, xv[m], idx[u]);
          if (xs != 0.0f) {  // a row kept only for another row of X is skipped, not multiplied
#pragma unroll
            for (int s = 0; s < SEG; ++s) {
              float wv[V];
              Unpack(raw[u][s], wv, T());
#pragma unroll
              for (int e = 0; e < V; ++e) a[m][s][e] = fmaf(xs, wv[e], a[m][s][e]);
            }
          }
        }
      }
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
      const int col = tile * TN + i;
      if (col < N) {
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
    const int m = i / TN, col = tile * TN + i % TN;
    if (col < N) {
      float* p = acc + (int64_t)m * N + col;
      y[(int64_t)m * N + col] = Traits<T>::FromFloat(__ldcg(p));
      *p = 0.0f;
    }
  }
  if (tid == 0) arrived[tile] = 0u;
}



}  // namespace cuda
}  // namespace acttail
