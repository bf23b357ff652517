// Prefill preparation of SparseMatMulNBits (M > 8 rows), one launch:
//  * blocks [0, dq_blocks): W[k, n] = fl_T(s[k/B, n] * q[k, n] + o[k/B, n]) for the chunk k in [k0, k1), n in [n0, n1)
//    into the workspace *transposed*, Wt[n - n0, k - k0] (leading dimension ldw >= k1 - k0): the GEMM then reads both
//    operands K-major (cuBLAS op T on W), the layout ONNX Runtime's MatMulNBits dequantizes into, and every warp
//    store writes 512 contiguous bytes (32 lanes x 8 consecutive k). Fast path (N % 8 == 0, ldw % 8 == 0, aligned
//    pointers): tiles of 256 rows x 64 columns, the tile's Q loaded coalesced into shared memory (padded: the
//    transposed reads are conflict-free), warp w = 8 columns, lane l = 8 rows of one quant block (their scales /
//    offsets read once); otherwise one element per thread. Any Inf/NaN produced sets *flag, which arms the exact
//    row-skipping kernel after the GEMM (a masked x times an Inf/NaN weight would otherwise turn into NaN in cuBLAS);
//  * the other blocks: xm[group, m, k] = kept value v (rounded to T) or 0, 8 channels per item when K % 8 == 0; with
//    `swiglu` the value masked is silu(gate) * up of X [M, 2K] (SwiGluOf), computed here (no activation kernel before).
#pragma once

#include <type_traits>

#include "common/cuda/activation.cuh"
#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace nbits {
namespace cuda {

using namespace ::acttail::cuda;  // the mask rule

struct PrepArgs {
  const void* x;
  int M, K, N, rowbytes, blog2;
  DeviceMask dm;
  int groups;
  void* xm;  // [groups, M, K]
  const uint8_t* q;
  const void* scales;
  const void* offsets;
  void* w;                // [n1 - n0, ldw]: the chunk's columns, each holding its k1 - k0 rows (W transposed)
  int k0, k1, n0, n1, ldw;  // the chunk of W dequantized by this launch
  unsigned* flag;
  int dq_blocks;
  int fast_w;  // N, n0, ldw multiples of 8 and 16-byte aligned pointers: the tiled path
  int fast_x;  // K % 8 == 0 and 16-byte aligned x / xm
  int swiglu;  // x is [M, 2K] = [gate | up]: the masked input is silu(gate) * up, computed here (rounded to T as SwiGluAt)
};

template <typename T>
__device__ __forceinline__ bool NonFinite(T v) {
  return !isfinite(Traits<T>::ToFloat(v));
}

constexpr int kDqRows = 8;  // rows of Q per lane of a tile (inside one quant block: B >= 16 and tiles start at multiples of 32)
constexpr int kTileRows = 32 * kDqRows;  // a tile: 256 rows (a warp's 32 lanes) x 64 columns (8 warps of 8 columns)
constexpr int kTileCols = 64;
constexpr int kTileWords = kTileCols / 8;                            // 32-bit words of Q per tile row
constexpr int kTileSmemWords = kTileRows * kTileWords + kTileRows / kDqRows;  // + one pad word per 8 rows
/// Shared-memory word of (tile row r, word j): one pad word per 8 rows, so that lane l reading word j of its rows
/// 8l + i (bank 8i + j + l) touches 32 banks.
__device__ __forceinline__ int TileWord(int r, int j) { return r * kTileWords + j + (r >> 3); }

/// LOP3 (x & MASK) | 0x4B000000: with MASK = 0xF << 4j, the float 2^23 + q * 16^j (q = nibble j of x, j < 4), exactly.
template <uint32_t kMask>
__device__ __forceinline__ float NibbleBits(uint32_t x) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(kMask), "n"(0x4B000000u));
  return __uint_as_float(d);
}

/// Column c (nibble j = c % 4 of the half words h = c / 4) of a lane's 8 rows (words qw): fl_T(s * q + o) into
/// dst[0..rows) (8 consecutive k of Wt); true when one is Inf/NaN. EXACT: s is the scale itself and q comes from an
/// integer-to-float conversion; otherwise s is the scale times 16^-j and q * 16^j comes from NibbleBits (no conversion):
/// the exact product s * q is the same, so is fmaf's single rounding (the caller takes EXACT when s * 16^-j would not be
/// exact). float16: pairs rounded by one cvt.rn.f16x2.f32, Inf/NaN found on their exponent bits.
template <typename T, int J, bool EXACT>
__device__ __forceinline__ bool DequantColumn(const uint32_t (&qw)[kDqRows], int h, float s, float o, T* dst, int rows) {
  float v[kDqRows];
#pragma unroll
  for (int r = 0; r < kDqRows; ++r) {
    const uint32_t word = qw[r] >> (16 * h);
    const float q = EXACT ? (float)((word >> (4 * J)) & 15u) : NibbleBits<0xFu << (4 * J)>(word) - 8388608.0f;
    v[r] = fmaf(s, q, o);
  }
  if (rows == kDqRows) {
    if constexpr (std::is_same<T, __half>::value) {
      union {
        uint4 u;
        __half2 h2[4];
        uint32_t b[4];
      } out;
      uint32_t inf = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        out.h2[e] = __floats2half2_rn(v[2 * e], v[2 * e + 1]);
        const uint32_t t = out.b[e] & 0x7C007C00u;  // exponent bits of both halves: all ones = Inf / NaN
        inf |= (uint32_t)((t & 0xFFFFu) == 0x7C00u) | (uint32_t)(t >= 0x7C000000u);
      }
      __stcs(reinterpret_cast<uint4*>(dst), out.u);
      return inf != 0;
    } else {
      bool bad = false;
#pragma unroll
      for (int e = 0; e < kDqRows; ++e) bad |= !isfinite(v[e]);
      __stcs(reinterpret_cast<uint4*>(dst), make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3])));
      __stcs(reinterpret_cast<uint4*>(dst) + 1,
             make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7])));
      return bad;
    }
  }
  bool bad = false;
#pragma unroll
  for (int r = 0; r < kDqRows; ++r) {
    if (r < rows) {
      const T res = Traits<T>::FromFloat(v[r]);
      dst[r] = res;
      bad |= NonFinite(res);
    }
  }
  return bad;
}

/// A lane's 8 rows x 8 columns of a tile: Wt[c0 + c - n0, k0 + r - a.k0] for r < rows; true when one is Inf/NaN.
template <typename T, bool EXACT>
__device__ __forceinline__ bool DequantLane(const PrepArgs& a, const uint32_t (&qw)[kDqRows], const float (&s)[8], const float (&o)[8],
                                            T* dst, int rows) {
  bool bad = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    bad |= DequantColumn<T, 0, EXACT>(qw, h, s[4 * h + 0], o[4 * h + 0], dst + (int64_t)(4 * h + 0) * a.ldw, rows);
    bad |= DequantColumn<T, 1, EXACT>(qw, h, s[4 * h + 1], o[4 * h + 1], dst + (int64_t)(4 * h + 1) * a.ldw, rows);
    bad |= DequantColumn<T, 2, EXACT>(qw, h, s[4 * h + 2], o[4 * h + 2], dst + (int64_t)(4 * h + 2) * a.ldw, rows);
    bad |= DequantColumn<T, 3, EXACT>(qw, h, s[4 * h + 3], o[4 * h + 3], dst + (int64_t)(4 * h + 3) * a.ldw, rows);
  }
  return bad;
}

/// Where tile `tile` of the chunk (columns fastest) starts, and its rows and 32-bit words of Q per row.
struct Tile {
  int kt, nt, rows, words;
};
__device__ __forceinline__ Tile TileAt(const PrepArgs& a, int64_t tile) {
  const int tiles_n = (a.n1 - a.n0 + kTileCols - 1) / kTileCols;
  Tile t;
  t.kt = a.k0 + (int)(tile / tiles_n) * kTileRows;
  t.nt = a.n0 + (int)(tile % tiles_n) * kTileCols;
  t.rows = min(kTileRows, a.k1 - t.kt);
  t.words = min(kTileWords, (a.n1 - t.nt) / 8);
  return t;
}

constexpr int kPrepThreads = 256;
constexpr int kTileLoads = kTileRows * kTileWords / kPrepThreads;  // 32-bit words of Q per thread and tile
/// This thread's words of a tile's Q (coalesced: a warp loads 4 rows x 32 bytes at a time); 0 outside the tile.
__device__ __forceinline__ void LoadTile(const PrepArgs& a, const Tile& t, uint32_t (&v)[kTileLoads]) {
#pragma unroll
  for (int it = 0; it < kTileLoads; ++it) {
    const int i = (int)threadIdx.x + it * kPrepThreads, r = i / kTileWords, j = i % kTileWords;
    v[it] = r < t.rows && j < t.words ? __ldcs(reinterpret_cast<const uint32_t*>(a.q + (int64_t)(t.kt + r) * a.rowbytes + t.nt / 2) + j) : 0u;
  }
}

/// The fast path of one block: its tiles (tile = blockIdx.x + i * dq_blocks), the next tile's Q loaded into registers
/// while the current one is computed; true when this thread produced an Inf/NaN.
template <typename T>
__device__ bool DequantTiles(const PrepArgs& a, int64_t tiles, uint32_t* sq) {
  bool bad = false;
  int64_t tile = blockIdx.x;
  if (tile >= tiles) return false;
  Tile t = TileAt(a, tile);
  uint32_t next[kTileLoads];
  LoadTile(a, t, next);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (;;) {
#pragma unroll
    for (int it = 0; it < kTileLoads; ++it) {
      const int i = (int)threadIdx.x + it * kPrepThreads;
      sq[TileWord(i / kTileWords, i % kTileWords)] = next[it];
    }
    __syncthreads();
    const Tile cur = t;
    tile += a.dq_blocks;
    if (tile < tiles) {  // in flight during this tile's arithmetic
      t = TileAt(a, tile);
      LoadTile(a, t, next);
    }
    const int lane_rows = min(kDqRows, cur.rows - kDqRows * lane);
    if (warp < cur.words && lane_rows > 0) {
      const int k = cur.kt + kDqRows * lane, c0 = cur.nt + 8 * warp;
      uint32_t qw[kDqRows];
#pragma unroll
      for (int r = 0; r < kDqRows; ++r) qw[r] = sq[TileWord(kDqRows * lane + r, warp)];
      const int64_t blk = k >> a.blog2;
      const T* sp = static_cast<const T*>(a.scales) + blk * a.N + c0;
      const T* op = static_cast<const T*>(a.offsets) + blk * a.N + c0;
      constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector
      float sf[8], sj[8], of[8];
      bool tiny = false;
#pragma unroll
      for (int v = 0; v < 8 / kVec; ++v) {
        union {
          uint4 u;
          T e[kVec];
        } sv, ov;
        sv.u = __ldg(reinterpret_cast<const uint4*>(sp) + v);
        ov.u = __ldg(reinterpret_cast<const uint4*>(op) + v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const int c = v * kVec + e;
          sf[c] = Traits<T>::ToFloat(sv.e[e]);
          sj[c] = sf[c] * (1.0f / (float)(1u << (4 * (c % 4))));  // s * 16^-j: exact unless s * 2^-12 leaves the normal range
          tiny |= sf[c] != 0.0f && fabsf(sf[c]) < 1.0e-30f;        // (float32 scales below 2^-114; float16 ones are >= 2^-24)
          of[c] = Traits<T>::ToFloat(ov.e[e]);
        }
      }
      T* dst = static_cast<T*>(a.w) + (int64_t)(c0 - a.n0) * a.ldw + (k - a.k0);
      bad |= tiny ? DequantLane<T, true>(a, qw, sf, of, dst, lane_rows) : DequantLane<T, false>(a, qw, sj, of, dst, lane_rows);
    }
    if (tile >= tiles) break;
    __syncthreads();  // the next tile rewrites sq
  }
  return bad;
}

/// One element (general path): Wt[n - n0, k - k0]; true when it is Inf/NaN.
template <typename T>
__device__ __forceinline__ bool DequantElement(const PrepArgs& a, int64_t i) {
  const int kr = a.k1 - a.k0;
  const int n = a.n0 + (int)(i / kr), k = a.k0 + (int)(i % kr);
  const int64_t sb = (int64_t)(k >> a.blog2) * a.N + n;
  const float qv = (float)((a.q[(int64_t)k * a.rowbytes + n / 2] >> (4 * (n % 2))) & 15u);
  const T res = Traits<T>::FromFloat(
      fmaf(Traits<T>::ToFloat(static_cast<const T*>(a.scales)[sb]), qv, Traits<T>::ToFloat(static_cast<const T*>(a.offsets)[sb])));
  static_cast<T*>(a.w)[(int64_t)(n - a.n0) * a.ldw + (k - a.k0)] = res;
  return NonFinite(res);
}

/// Dequantization items of a launch: tiles (fast path) or elements.
__host__ __device__ inline int64_t DequantItems(int k0, int k1, int n0, int n1, bool fast) {
  return fast ? (int64_t)((k1 - k0 + kTileRows - 1) / kTileRows) * ((n1 - n0 + kTileCols - 1) / kTileCols) : (int64_t)(k1 - k0) * (n1 - n0);
}

/// Mask items: x [M, K] -> xm[gr, M, K] with group gr's rule (a group per member, or group 0 = every member's).
template <typename T>
__device__ __forceinline__ T MaskOne(T raw, int k, const Rule& rule, const DeviceMask& dm) {
  const float v = MaskedValue<T>(raw, k, rule, dm);
  return IsKeptValue(v) ? (dm.ramp == 0.0f ? raw : Traits<T>::FromFloat(v)) : Traits<T>::FromFloat(0.0f);
}

template <typename T>
__device__ void MaskItem(const PrepArgs& a, int64_t item, int per) {
  const int64_t MK = (int64_t)a.M * a.K;
  const int64_t e0 = item * per;
  const int gr = (int)(e0 / MK);
  const int64_t rem = e0 % MK;
  const int m = (int)(rem / a.K), k0 = (int)(rem % a.K);
  const Rule rule = LoadRule(a.dm, m, a.M, gr);
  const T* xr = static_cast<const T*>(a.x) + (int64_t)m * a.K * (a.swiglu ? 2 : 1) + k0;
  T* out = static_cast<T*>(a.xm) + e0;
  if (per == 8) {
    constexpr int kVec = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < 8 / kVec; ++v) {
      union Vec {
        uint4 u;
        T e[kVec];
      } in, res;
      in.u = __ldcs(reinterpret_cast<const uint4*>(xr) + v);
      if (a.swiglu) {
        Vec up;
        up.u = __ldcs(reinterpret_cast<const uint4*>(xr + a.K) + v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) in.e[e] = SwiGluOf<T>(in.e[e], up.e[e]);
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) res.e[e] = MaskOne<T>(in.e[e], k0 + v * kVec + e, rule, a.dm);
      reinterpret_cast<uint4*>(out)[v] = res.u;
    }
    return;
  }
  const T raw = a.swiglu ? SwiGluOf<T>(xr[0], xr[a.K]) : *xr;
  *out = MaskOne<T>(raw, k0, rule, a.dm);
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads, 3) PrefillPrepKernel(const PrepArgs a) {
  __shared__ uint32_t sq[kTileSmemWords];
  if ((int)blockIdx.x < a.dq_blocks) {
    const int64_t items = DequantItems(a.k0, a.k1, a.n0, a.n1, a.fast_w != 0);
    bool bad = false;
    if (a.fast_w) {
      bad = DequantTiles<T>(a, items, sq);
    } else {
      for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < items; i += (int64_t)a.dq_blocks * blockDim.x)
        bad |= DequantElement<T>(a, i);
    }
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(a.flag, 1u);
    return;
  }
  const int per = a.fast_x ? 8 : 1;
  const int64_t items = (int64_t)a.groups * a.M * a.K / per;
  const int64_t stride = (int64_t)(gridDim.x - a.dq_blocks) * blockDim.x;
  for (int64_t i = (int64_t)(blockIdx.x - a.dq_blocks) * blockDim.x + threadIdx.x; i < items; i += stride) MaskItem<T>(a, i, per);
}

/// y[m, n] = fl_T(acc[m, n]) for the chunk's columns n < cols (acc: float32, leading dimension lda; y: T, ldy).
template <typename T>
__global__ void __launch_bounds__(256) StoreChunkKernel(const float* acc, int lda, T* y, int ldy, int M, int cols) {
  const int64_t total = (int64_t)M * cols;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    y[(i / cols) * ldy + i % cols] = Traits<T>::FromFloat(acc[(i / cols) * lda + i % cols]);
}

}  // namespace cuda
}  // namespace nbits
}  // namespace acttail
