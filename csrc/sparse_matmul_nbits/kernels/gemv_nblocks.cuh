// Prototype decode GEMV for 4-bit weights with quant blocks along N (docs/quantization.md, "Scales that travel with
// their row"): W[k, n] = s[k, n / B] * q[k, n] + o[k, n / B]. A dropped input channel takes its scale pairs with it, so
// a kept row is read as its N/2 code bytes plus its N/B (scale, offset) pairs and nothing else is. Benchmark harness
// only (csrc/sparse_matmul_nbits/bench.cu, acttail_nblocks_bench_run); not an op input layout yet.
//
// One row of X, float16, threshold mode, one member: keep x_k where |x_k| > t (float32; NaN and zero never kept).
// Layout: Q uint8 [K, N/2] (column n in byte n/2, low nibble for even n, as SparseMatMulNBits), P half2 [K, ceil(N/B)]
// (scale, offset). Requires N % CPL == 0, B % CPL == 0, 16-byte aligned rows of Q (N % 32 == 0 for CPL 32).
//
// Grid (tiles, splits): block (t, s) owns the 32 * CPL columns of tile t and the rows [s * R, (s + 1) * R). It pools
// its kept rows (ballot, in row order, into shared memory), its 8 warps stream every 8th pooled row (U rows' loads in
// flight before they are used), a lane accumulating its CPL columns with a = v * s folded per row, b = v * o summed
// once; the warps' sums are added in shared memory and atomically into a float32 scratch [N]; the tile's last block
// (arrival counter) writes Y in float16 and zeroes the scratch and its counter (both left zero for the next call).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace acttail {
namespace nbits {
namespace nblocks {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 1536;  // rows per block (pool in shared memory)

/// The CPL / 2 code bytes of a lane's columns in one row: one 16-byte (CPL 32) or 8-byte (CPL 16) load.
template <int CPL>
using Codes = typename std::conditional<CPL == 32, uint4, uint2>::type;

/// acc[8 * i + c] += a_j * q (j = c mod 4): the nibble masked in place is the float 2^23 + q * 16^j, minus 2^23
/// exactly q * 16^j; the 16^-j is in a_j.
__device__ __forceinline__ void AddWord(uint32_t w, const float (&a)[4], float* acc) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t half = h == 0 ? w : w >> 16;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float f = __uint_as_float((half & (0xFu << (4 * j))) | 0x4B000000u) - 8388608.0f;
      acc[4 * h + j] = fmaf(a[j], f, acc[4 * h + j]);
    }
  }
}

template <int CPL, int U>
__global__ void __launch_bounds__(kThreads) NBlocksGemvKernel(const __half* __restrict__ x, float threshold,
                                                             const uint8_t* __restrict__ q, const __half2* __restrict__ pairs,
                                                             int K, int N, int B, int rows_per_block,
                                                             float* __restrict__ scratch, unsigned* __restrict__ counters,
                                                             __half* __restrict__ y) {
  using C = Codes<CPL>;
  static_assert(sizeof(C) * 2 == CPL, "a lane loads CPL / 2 bytes");
  constexpr int kWords = CPL / 8;
  constexpr int kTile = 32 * CPL;
  __shared__ int pool_k[kMaxRows];
  __shared__ float pool_v[kMaxRows];
  __shared__ float red[kWarps * kTile];
  __shared__ int warp_n[kWarps];
  __shared__ int last;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int k0 = blockIdx.y * rows_per_block;
  const int k1 = min(K, k0 + rows_per_block);

  // 1. pool the kept rows of [k0, k1) in row order
  int n = 0;
  for (int base = k0; base < k1; base += kThreads) {
    const int k = base + threadIdx.x;
    float v = 0.0f;
    bool keep = false;
    if (k < k1) {
      v = __half2float(x[k]);
      keep = fabsf(v) > threshold && v != 0.0f;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_n[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_n[w] : 0;
      total += warp_n[w];
    }
    if (keep) {
      const int pos = n + before + __popc(ballot & ((1u << lane) - 1u));
      pool_k[pos] = k;
      pool_v[pos] = v;
    }
    n += total;
    __syncthreads();
  }

  // 2. stream the pooled rows: warp w takes rows w, w + 8, ...
  const int col = blockIdx.x * kTile + lane * CPL;
  const bool active = col < N;
  const int row_bytes = N / 2, nb = (N + B - 1) / B;
  float acc[CPL];
#pragma unroll
  for (int c = 0; c < CPL; ++c) acc[c] = 0.0f;
  float bsum = 0.0f;
  if (active) {
    const uint8_t* qcol = q + col / 2;
    const __half2* pcol = pairs + col / B;
    for (int i = warp; i < n; i += kWarps * U) {
      C codes[U];
      __half2 sp[U];
      float v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int r = i + u * kWarps;
        const bool ok = r < n;
        const int k = ok ? pool_k[r] : pool_k[i];
        v[u] = ok ? pool_v[r] : 0.0f;  // a short batch reloads row i (in bounds); see the break below
        codes[u] = __ldcs(reinterpret_cast<const C*>(qcol + (size_t)k * row_bytes));
        sp[u] = __ldcs(pcol + (size_t)k * nb);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i + u * kWarps >= n) break;  // the padded loads of a short batch are not used (their row may hold Inf)
        const float2 so = __half22float2(sp[u]);
        const float av = v[u] * so.x;
        bsum = fmaf(v[u], so.y, bsum);
        const float a[4] = {av, av * 0.0625f, av * 0.00390625f, av * 0.000244140625f};
        const uint32_t* w = reinterpret_cast<const uint32_t*>(&codes[u]);  // registers: no memory access
#pragma unroll
        for (int i8 = 0; i8 < kWords; ++i8) AddWord(w[i8], a, acc + 8 * i8);
      }
    }
  }

  // 3. the warps' sums (conflict-free: element c of lane l at c * 32 + l), then one atomic per column
  if (n > 0) {  // n is the same in every thread of the block
#pragma unroll
    for (int c = 0; c < CPL; ++c) red[warp * kTile + c * 32 + lane] = acc[c] + bsum;
    __syncthreads();
    for (int e = threadIdx.x; e < kTile; e += kThreads) {
      const int cc = blockIdx.x * kTile + (e & 31) * CPL + (e >> 5);
      if (cc >= N) continue;
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[w * kTile + e];
      atomicAdd(scratch + cc, s);
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;

  // 4. the tile's last block: Y in float16, scratch and counter back to zero
  __threadfence();
  for (int e = threadIdx.x; e < kTile; e += kThreads) {
    const int cc = blockIdx.x * kTile + e;
    if (cc >= N) continue;
    y[cc] = __float2half_rn(__ldcg(scratch + cc));
    scratch[cc] = 0.0f;
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0u;
}

}  // namespace nblocks
}  // namespace nbits
}  // namespace acttail
