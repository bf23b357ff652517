// The one-row decode GEMV of SparseMatMulNBits on sm_90+: quant groups per warp, split-K over a thread-block
// cluster, no global scratch.
//
// Work: a *tile* is 32 lanes x CPL columns of one member (the lane groups of GemvArgs, as in gemv.cuh); a
// *group* is 32 consecutive rows of Q (inside one quant block: B >= 32). The grid is (S, tiles) blocks of
// WARPS warps; the S blocks of a tile form one cluster and split its ceil(K / 32) groups into S contiguous
// ranges; warp w of a block takes the groups w, w + WARPS, ... of its range. Per group:
//   1. lane l evaluates the rule of row 32g + l (one 2-byte load of x), a ballot gives the kept rows;
//      a group without kept rows costs nothing more (its scales are not read either);
//   2. the lane loads its CPL columns of the group's scales / offsets and of every kept row of Q at once
//      (predicated loads, up to 32 in flight per lane, no shared memory and no block barrier), then
//      accq[c] += v * q, sv += v over the kept rows (v from the owner lane by shuffle), and flushes
//      acc[c] += s[c] * accq[c] + o[c] * sv.
// So the only serial latencies are the x load and one round of row loads per group: with ~1-2 groups per warp
// and 24+ warps per SM, the DRAM queue holds most of the matrix at once.
// End: the block adds its warps' sums in shared memory (column-major: conflict-free), then, after a cluster
// barrier, rank r adds slice r of the tile's columns over the S blocks' shared memory (distributed shared
// memory) in rank order, so the result is deterministic, and writes Y; a second barrier keeps every block's
// shared memory alive until it is read. No atomics, no scratch, nothing to zero between calls.
// Only for one row of X, B >= 32 and the vector-load ("fast") layout; everything else uses gemv.cuh.
#pragma once

#include <cooperative_groups.h>

#include "gemv.cuh"

namespace acttail {
namespace nbits {
namespace cuda {

constexpr int kGroupRows = 32;

template <int CPL>
__device__ __forceinline__ void LoadRowFast(RowBits<CPL>& r, const uint8_t* p) {
  if constexpr (CPL == 16) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    r.w[0] = v.x; r.w[1] = v.y;
  } else if constexpr (CPL == 8) {
    r.w[0] = __ldcs(reinterpret_cast<const unsigned int*>(p));
  } else {
    static_assert(CPL == 4, "4, 8 or 16 columns per lane");
    r.w[0] = __ldcs(reinterpret_cast<const unsigned short*>(p));
  }
}

template <typename T, int CPL>
__device__ __forceinline__ void LoadColsFast(ColBits<T, CPL>& c, const T* p) {
  constexpr int kWords = ColBits<T, CPL>::kWords;
  if constexpr (kWords % 4 == 0) {
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      c.w[4 * i] = v.x; c.w[4 * i + 1] = v.y; c.w[4 * i + 2] = v.z; c.w[4 * i + 3] = v.w;
    }
  } else if constexpr (kWords == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    c.w[0] = v.x; c.w[1] = v.y;
  } else {
    static_assert(kWords == 1, "scales of 2 float16 columns");
    c.w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  }
}

/// One warp, one group of 32 rows: the kept rows of the lane's CPL columns into acc.
template <typename T, int CPL>
__device__ __forceinline__ void ClusterGroup(const GemvArgs& a, const Rule& rule, int grp, int col0, bool active, float (&acc)[CPL]) {
  const int lane = threadIdx.x & 31, r = grp * kGroupRows + lane;
  const T* x = static_cast<const T*>(a.x);
  const float v = r < a.K ? MaskedValue<T>(x[r], r, rule, a.dm) : 0.0f;
  const unsigned kept = __ballot_sync(0xffffffffu, IsKeptValue(v));
  if (kept == 0u) return;  // warp-uniform: a group without kept rows reads nothing
  ColBits<T, CPL> s, o;
  RowBits<CPL> raw[kGroupRows];
  const uint8_t* base = a.q + (int64_t)grp * kGroupRows * a.rowbytes + col0 / 2;
  if (active) {
    const int64_t b = (int64_t)(grp * kGroupRows) >> a.blog2;
    LoadColsFast<T, CPL>(s, static_cast<const T*>(a.scales) + b * a.N + col0);
    LoadColsFast<T, CPL>(o, static_cast<const T*>(a.offsets) + b * a.N + col0);
  }
#pragma unroll
  for (int j = 0; j < kGroupRows; ++j) {
#pragma unroll
    for (int w = 0; w < RowBits<CPL>::kWords; ++w) raw[j].w[w] = 0u;
    if (active && ((kept >> j) & 1u)) LoadRowFast<CPL>(raw[j], base + (int64_t)j * a.rowbytes);
  }
  float accq[CPL], sv = 0.0f;
#pragma unroll
  for (int c = 0; c < CPL; ++c) accq[c] = 0.0f;
#pragma unroll
  for (int j = 0; j < kGroupRows; ++j) {
    if ((kept >> j) & 1u) {  // warp-uniform
      const float vj = __shfl_sync(0xffffffffu, v, j);
      sv += vj;
      float qf[CPL];
      Unpack<CPL>(raw[j], qf);
#pragma unroll
      for (int c = 0; c < CPL; ++c) accq[c] = fmaf(vj, qf[c], accq[c]);
    }
  }
  if (active) FlushColumns<T, CPL>(s, o, accq, sv, acc);
}

template <typename T, int CPL, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) NBitsClusterGemvKernel(const GemvArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int TN = 32 * CPL;
  __shared__ float red[WARPS * TN];  // [warp][c][lane]
  __shared__ float part[TN];         // the block's sums, [c][lane]
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
  const int t = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const TileSpan sp = SpanOfTile<CPL>(a, t, lane);
  const int g = sp.g, lg_first = sp.lg_first, col0 = sp.col0, lo = sp.lo, hi = sp.hi;
  const bool active = sp.active;
  const int groups = (a.K + kGroupRows - 1) / kGroupRows;
  const int g0 = (int)((int64_t)rank * groups / splits), g1 = (int)((int64_t)(rank + 1) * groups / splits);
  const Rule rule = LoadRule(a.dm, 0, a.M, g);
  float acc[CPL];
#pragma unroll
  for (int c = 0; c < CPL; ++c) acc[c] = 0.0f;
  for (int grp = g0 + warp; grp < g1; grp += WARPS) ClusterGroup<T, CPL>(a, rule, grp, col0, active, acc);

#pragma unroll
  for (int c = 0; c < CPL; ++c) red[warp * TN + c * 32 + lane] = acc[c];
  __syncthreads();
  for (int i = tid; i < TN; i += WARPS * 32) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += red[w * TN + i];
    part[i] = s;
  }
  cluster.sync();  // every block's part is written
  T* y = static_cast<T*>(a.y);
  const int i0 = rank * TN / splits, i1 = (rank + 1) * TN / splits;
  for (int i = i0 + tid; i < i1; i += WARPS * 32) {
    float s = 0.0f;
    for (int r = 0; r < splits; ++r) s += cluster.map_shared_rank(part, r)[i];
    const int col = (lg_first + i % 32) * CPL + i / 32;
    if (col >= lo && col < hi) y[col] = Traits<T>::FromFloat(s);
  }
  cluster.sync();  // no block leaves while another still reads its part
#else
  __trap();  // launched only on sm_90+ (ClusterDecodeUsable)
#endif
}

}  // namespace cuda
}  // namespace nbits
}  // namespace acttail
