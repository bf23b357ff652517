// The row-skipping 4-bit kernel of SparseMatMulNBits: decode GEMV (split mode, M <= 8) and the exact
// prefill fallback (FULL mode).
//
// Work: a *tile* is 32 lanes x CPL columns of one member (lane group lg covers columns [lg*CPL, (lg+1)*CPL),
// aligned globally, so a window shared by two members is processed by both, each adding only its own
// columns); a *unit* is (tile, row k of Q). Split mode is stream-K: the tiles*K units are cut into
// gridDim.x equal contiguous ranges, one per block of WARPS warps (gridDim.x = SMs x blocks per SM, so
// every SM streams the same number of rows); a range covers rows of one or two tiles (segments).
// A segment is processed in chunks of WARPS*32*RPL rows (RPL = 2 for one row of X, else 1):
//   1. lane l of warp w evaluates the rule of rows c0 + (j*WARPS + w)*32 + l, j < RPL, for the MR rows of X (one
//      2-byte load of x per row), the block pools the kept rows (ballots, warp counts, shared-memory list in row
//      order) with their values and a kept-bit per row of X;
//   2. warp w takes the contiguous slice [w*n/WARPS, (w+1)*n/WARPS) of the n pooled rows (every warp gets the
//      same number of rows +-1, and about one quant block of them), and for each quant block b in its slice:
//      loads the block's scales / offsets for its lane's CPL columns (cached loads: the block's other warps
//      hit L1), streams the kept rows of Q (CPL/2 bytes per lane per row, evict-first, U rows in flight),
//      accumulates accq[m][c] += v * q, sv[m] += v in float32, and flushes
//      acc[m][c] += s[c] * accq[m][c] + o[c] * sv[m] for the rows m that kept a channel of b.
// Nibbles become floats without conversions: (word & 0xF << 4j) | 0x4B000000 is the float 2^23 + q*16^j,
// minus 2^23 gives q*16^j exactly; the 16^-j goes into the scale at the flush.
// End of segment: the warps' sums are added in shared memory, then (split mode) one float32 atomicAdd
// per column into a zeroed scratch [M, N]; the last block of a tile (arrival counter, acq_rel) writes Y
// and zeroes its columns and counter again. FULL mode (prefill fallback): blocks loop over (tile, group of
// MR rows) with all K rows and write Y directly; with run_if it runs only when *run_if != 0 and the last
// block resets *run_if.
#pragma once

#include <type_traits>

#include "common/cuda/activation.cuh"
#include "common/cuda/dependent_launch.cuh"
#include "common/cuda/mask_rule.cuh"
#include "common/cuda/topk_select.cuh"

namespace acttail {
namespace nbits {
namespace cuda {

using namespace ::acttail::cuda;  // Traits, DeviceMask, Rule, LoadRule, MaskedValue, IsKeptValue (the mask rule)

struct GemvArgs {
  const void* x;
  const uint8_t* q;
  const void* scales;
  const void* offsets;
  void* y;
  int M, K, N, rowbytes, blog2;
  DeviceMask dm;
  int G;
  int begin[kMaxMembers], end[kMaxMembers];  // member column ranges
  int tile0[kMaxMembers + 1];                // tiles of member g: [tile0[g], tile0[g + 1])
  int lg0[kMaxMembers];                      // first lane group of member g: begin[g] / CPL
  int tiles;
  long long units;       // split mode: tiles * K
  float* acc;            // split mode: zeroed float32 scratch [M, N]
  unsigned* counters;    // split mode: zeroed arrival counters [tiles]
  unsigned* run_if;      // FULL mode: run only when *run_if != 0 (null: always); reset by the last block
  unsigned* done;        // FULL mode with run_if: zeroed arrival counter
  int row_groups;        // FULL mode: ceil(M / MR)
  int fast;              // 16-byte aligned Q / scales / offsets and N % 32 == 0: vector loads
  int prefetch;          // 1: each warp first prefetches its whole slice of rows (and their scales) into L2
  int stage;             // 1 (one row of X, STAGE kernels): rows of Q staged through shared memory with cp.async
  int swiglu;            // 1: x is [M, 2K] = [gate | up], the input silu(gate) * up (common/activation.h)
  int one;               // 1: the one-row loop (StreamRowsOne; plan kernel 3: one row of X, vector layout, K * rowbytes < 2^32)
  int pipe;              // with one: the software-pipelined one-row loop (StreamRowsPipe; plan kernel 4)
  int early;             // split mode, before the wait on the previous kernel: 1 = prefetch the range's scales /
                         // offsets into L2, 2 = those and the range's rows of Q (every row, kept or not), 0 = nothing
  int pdl;               // host: split mode launched as a programmatic dependent (sm_90+)
  int self_select;       // host: top-k with the selection computed by every block (SELF kernels: one float16 row, no scale)
  int sel_k[kMaxMembers];  // SELF: k of each selection group (dm.sel_members groups)
};

/// Shared state of a SELF kernel: the block's own top-k selections (BlockSelectHalf), one per selection group.
struct SelfSelectState {
  BlockSelectShared sh;
  uint2 sel[kMaxMembers];  // the selection of group g' (DeviceMask::sel_members groups), as the selection kernel writes it
  int group;               // the group whose selection the last segment computed (-1: none yet)
};
/// At a fixed shared address (no pointer held in registers by the row loops); allocated only in the kernels that use it.
static __shared__ SelfSelectState self_select_state;

// ---- tensor-core rows (MMA kernels: float16, one row of X, 16 columns per virtual lane, the vector layout) -------
// Warp w takes the columns of virtual lanes [8 (w % 4), 8 (w % 4) + 8) of the tile (128 columns) and half (w / 4) of the
// pooled rows. Per group of up to 16 pooled rows of one quant block, thread (g = lane / 4, t = lane % 4) loads the 8-byte
// pieces (16 columns of virtual lane 8 (w % 4) + g) of the group's rows 2t, 2t+1, 2t+8, 2t+9, dequantizes them to
// float16 pairs of rows (nibble -> 1024 + q by a LOP3 into a float16 mantissa, minus 1024, times the scale plus the
// offset: W rounded to float16 once, as the cuBLAS prefill path does), and issues eight mma.m16n8k16 (float32
// accumulation) with A = W^T (rows: columns j and 8 + j of each group g) and B = the group's kept values in column 0.
// C[g][0] / C[g + 8][0] (lanes t = 0) then hold columns j / 8 + j of virtual lane 8 (w % 4) + g.

/// (x & mask) | magic in one LOP3.
template <uint32_t kMask>
__device__ __forceinline__ uint32_t MaskOr6400(uint32_t x) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(kMask), "n"(0x64006400u));
  return d;
}

__device__ __forceinline__ void MmaF16F32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the host launches MMA kernels only on sm_80+
#endif
}

__device__ __forceinline__ uint32_t H2Bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 BitsH2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

/// Column c (0..15) of a pair of rows (r0 in the low half, r1 in the high half) as float16 W = s q + o, from the
/// byte-permuted words px[0..3] (columns 0-3, 4-7, 8-11, 12-15 of both rows) and the 16 scales / offsets.
template <int C>
__device__ __forceinline__ uint32_t DequantPair(const uint32_t (&px)[4], const uint32_t (&s)[8], const uint32_t (&o)[8]) {
  const uint32_t x = (C % 4) >= 2 ? px[C / 4] >> 8 : px[C / 4];
  __half2 q;
  if constexpr (C % 2 == 0) {
    q = __hsub2(BitsH2(MaskOr6400<0x000F000Fu>(x)), __float2half2_rn(1024.0f));  // 1024 + q - 1024
  } else {
    q = __hfma2(BitsH2(MaskOr6400<0x00F000F0u>(x)), __float2half2_rn(0.0625f), __float2half2_rn(-64.0f));  // (1024 + 16q) / 16 - 64
  }
  const __half2 sp = BitsH2(s[C / 2]), op = BitsH2(o[C / 2]);
  const __half2 sc = C % 2 == 0 ? __low2half2(sp) : __high2half2(sp);
  const __half2 oc = C % 2 == 0 ? __low2half2(op) : __high2half2(op);
  return H2Bits(__hfma2(q, sc, oc));
}

/// Rows r0, r1 (16 columns each, uint2) -> px: [r0 bytes 0-1 | r1 bytes 0-1], [r0 2-3 | r1 2-3], then the second words.
__device__ __forceinline__ void PermutePair(uint2 r0, uint2 r1, uint32_t (&px)[4]) {
  px[0] = __byte_perm(r0.x, r1.x, 0x5410);
  px[1] = __byte_perm(r0.x, r1.x, 0x7632);
  px[2] = __byte_perm(r0.y, r1.y, 0x5410);
  px[3] = __byte_perm(r0.y, r1.y, 0x7632);
}

/// CPL/2 bytes of Q per lane and row.
template <int CPL>
struct RowBits {
  static constexpr int kWords = CPL >= 8 ? CPL / 8 : 1;
  uint32_t w[kWords];
};

template <int CPL>
__device__ __forceinline__ void LoadRow(RowBits<CPL>& r, const uint8_t* row, int col0, int rowbytes, bool fast) {
  const uint8_t* p = row + col0 / 2;
  if (fast) {
    if constexpr (CPL == 32) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
      r.w[0] = v.x; r.w[1] = v.y; r.w[2] = v.z; r.w[3] = v.w;
    } else if constexpr (CPL == 16) {
      const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
      r.w[0] = v.x; r.w[1] = v.y;
    } else if constexpr (CPL == 8) {
      r.w[0] = __ldcs(reinterpret_cast<const unsigned int*>(p));
    } else {
      r.w[0] = __ldcs(reinterpret_cast<const unsigned short*>(p));
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < RowBits<CPL>::kWords; ++i) r.w[i] = 0u;
#pragma unroll
  for (int j = 0; j < CPL / 2; ++j)
    if (col0 / 2 + j < rowbytes) r.w[j / 4] |= (uint32_t)__ldcs(p + j) << (8 * (j % 4));
}

/// (x & kMask) | 2^23's bits in one LOP3 (written as C, the compiler emits an AND and an OR: two instructions).
template <uint32_t kMask>
__device__ __forceinline__ uint32_t MaskOr4B00(uint32_t x) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "n"(kMask), "n"(0x4B000000u));
  return d;
}

/// The CPL columns of one row as floats q * 16^(c % 4) (exact).
template <int CPL>
__device__ __forceinline__ void Unpack(const RowBits<CPL>& r, float (&f)[CPL]) {
#pragma unroll
  for (int i = 0; i < (CPL + 7) / 8; ++i) {
#pragma unroll
    for (int h = 0; h < (CPL >= 8 ? 2 : 1); ++h) {
      const uint32_t w = h ? r.w[i] >> 16 : r.w[i];
      f[8 * i + 4 * h + 0] = __uint_as_float(MaskOr4B00<0x000Fu>(w)) - 8388608.0f;
      f[8 * i + 4 * h + 1] = __uint_as_float(MaskOr4B00<0x00F0u>(w)) - 8388608.0f;
      f[8 * i + 4 * h + 2] = __uint_as_float(MaskOr4B00<0x0F00u>(w)) - 8388608.0f;
      f[8 * i + 4 * h + 3] = __uint_as_float(MaskOr4B00<0xF000u>(w)) - 8388608.0f;
    }
  }
}

/// CPL scales (or offsets) of one quant block as raw bits, loaded once per block.
template <typename T, int CPL>
struct ColBits {
  static constexpr int kWords = CPL * (int)sizeof(T) / 4;
  uint32_t w[kWords];
};

template <typename T, int CPL>
__device__ __forceinline__ void LoadCols(ColBits<T, CPL>& c, const T* row, int col0, int N, bool fast) {
  constexpr int kWords = ColBits<T, CPL>::kWords;
  const T* p = row + col0;
  if (fast) {
    if constexpr (kWords % 4 == 0) {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
        c.w[4 * i] = v.x; c.w[4 * i + 1] = v.y; c.w[4 * i + 2] = v.z; c.w[4 * i + 3] = v.w;
      }
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      c.w[0] = v.x; c.w[1] = v.y;
    }
    return;
  }
  T* e = reinterpret_cast<T*>(c.w);
#pragma unroll
  for (int j = 0; j < CPL; ++j) e[j] = col0 + j < N ? p[j] : Traits<T>::FromFloat(0.0f);
}

/// 16^-(c % 4): undoes the position of column c's nibble inside its 16-bit half (Unpack), applied with the scale.
__device__ __forceinline__ constexpr float NibbleScale(int c) {
  return c % 4 == 0 ? 1.0f : c % 4 == 1 ? 0.0625f : c % 4 == 2 ? 0.00390625f : 0.000244140625f;
}

template <typename T, int CPL>
__device__ __forceinline__ float ColValue(const ColBits<T, CPL>& c, int j) {
  return Traits<T>::ToFloat(reinterpret_cast<const T*>(c.w)[j]);
}

/// One flush of a quant block's sums into acc: acc[c] += s[c] 16^-(c % 4) accq[c] + o[c] sv.
template <typename T, int CPL>
__device__ __forceinline__ void FlushColumns(const ColBits<T, CPL>& s, const ColBits<T, CPL>& o, const float (&accq)[CPL], float sv,
                                             float (&acc)[CPL]) {
#pragma unroll
  for (int c = 0; c < CPL; ++c) acc[c] = fmaf(ColValue<T, CPL>(s, c) * NibbleScale(c), accq[c], fmaf(ColValue<T, CPL>(o, c), sv, acc[c]));
}

__device__ __forceinline__ unsigned ArriveAcqRel(unsigned* counter) {
  unsigned prev;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(prev) : "l"(counter) : "memory");
  return prev;
}

/// arr[i] with static indices only (a dynamically indexed kernel-parameter array is copied to local memory).
template <int N>
__device__ __forceinline__ int Pick(const int (&arr)[N], int i) {
  int v = arr[0];
#pragma unroll
  for (int j = 1; j < N; ++j)
    if (j == i) v = arr[j];
  return v;
}

/// Where tile t lies: its member g, its first lane group, this lane's first column, the member's columns [lo, hi).
struct TileSpan {
  int g, lg_first, col0, lo, hi;
  bool active;  // the lane's first column lies inside the member
};

template <int CPL>
__device__ __forceinline__ TileSpan SpanOfTile(const GemvArgs& a, int t, int lane) {
  TileSpan sp;
  sp.g = 0;
#pragma unroll
  for (int j = 1; j < kMaxMembers; ++j)
    if (j < a.G && t >= a.tile0[j]) sp.g = j;
  sp.lg_first = Pick(a.lg0, sp.g) + (t - Pick(a.tile0, sp.g)) * 32;
  sp.col0 = (sp.lg_first + lane) * CPL;
  sp.lo = Pick(a.begin, sp.g);
  sp.hi = Pick(a.end, sp.g);
  sp.active = sp.col0 < sp.hi;
  return sp;
}

/// Block (of the stream-K grid) holding unit u.
__device__ __forceinline__ long long BlockOfUnit(long long u, long long units, long long grid) { return ((u + 1) * grid - 1) / units; }

/// Rows of Q whose rule a lane evaluates per chunk: 2 for one row of X (a chunk of 512 rows: a typical stream-K range is
/// one pooling phase), 1 with more rows of X (their values take the shared memory).
template <int MR>
constexpr int PoolRowsPerLane() { return MR == 1 ? 2 : 1; }

template <int MR, int WARPS>
struct Pool {
  static constexpr int kRows = WARPS * 32 * PoolRowsPerLane<MR>();
  int row[kRows];
  unsigned off[MR == 1 ? kRows : 1];  // one row of X (the ONE loop): the row's byte offset in Q, row * rowbytes
  unsigned char km[kRows];
  float v[MR][kRows];
  // 16-byte aligned: the per-chunk sum of the counts is then read as whole LDS.128 words of cnt alone (unaligned,
  // ptxas widened it to a word starting at v's last entry, which compute-sanitizer's racecheck reported as a
  // write-after-read hazard against that entry's store in the same interval: harmless, the value was discarded)
  alignas(16) int cnt[PoolRowsPerLane<MR>() * WARPS];
};

__device__ __forceinline__ void PrefetchL2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// ---- staged rows (one row of X): cp.async copies of a warp's whole row slice into shared memory ----------------
/// Bytes of a warp's stage buffer (three parts): 48 tile rows of 256 B (CPL 16), 24 of 512 B (CPL 32). A typical
/// slice of a warp (<= 48 rows of 16 columns per lane) is then in flight at once, and two blocks of 8 warps fit an SM.
constexpr int kStageWarpBytes = 12288;
template <int CPL>
constexpr int StageRows() { return kStageWarpBytes / (16 * CPL); }
/// Dynamic shared memory of a STAGE kernel: the warps' stage buffers (also the reduction buffer afterwards).
template <int CPL, int WARPS>
constexpr int StageBytes() { return WARPS * kStageWarpBytes; }

__device__ __forceinline__ void CpAsync16(void* smem, const void* g) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(g) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

/// One warp, one row of X: the pooled rows [e0, e1) into acc. The slice is copied into the warp's stage buffer in
/// parts of H rows, three buffers in rotation (cp.async, 16 B per lane and instruction, no registers held): two parts
/// are in flight before the first is used, and part h + 2 is requested before part h is computed, so the copies
/// overlap the arithmetic. The scales / offsets of the parts' quant blocks are prefetched into L2; the rows are read
/// from shared memory quant block by quant block (a block's scales are loaded when it starts and used at its flush,
/// so their latency hides behind its rows).
template <typename T, int CPL, int WARPS>
__device__ __forceinline__ void StreamRowsStaged(const GemvArgs& a, const Pool<1, WARPS>& pool, int e0, int e1, int col0, int tb0,
                                                 bool active, uint8_t* stage, float (&acc)[1][CPL]) {
  constexpr int TB = CPL * 16, P = TB / 16, H = StageRows<CPL>() / 3;
  const int lane = threadIdx.x & 31, n = e1 - e0;
  if (n <= 0) return;
  const T* scales = static_cast<const T*>(a.scales);
  const T* offsets = static_cast<const T*>(a.offsets);
  const int parts = (n + H - 1) / H;
  auto issue = [&](int h) {
    uint8_t* base = stage + (h % 3) * H * TB;
    const int r0 = e0 + h * H, nr = min(H, e1 - r0);
    for (int p = lane; p < nr * P; p += 32) {
      const int i = p / P, byte = tb0 + (p % P) * 16;
      if (byte < a.rowbytes) CpAsync16(base + i * TB + (p % P) * 16, a.q + (int64_t)pool.row[r0 + i] * a.rowbytes + byte);
    }
    CpAsyncCommit();
    if (active) {
      int last_b = h == 0 ? -1 : pool.row[r0 - 1] >> a.blog2;
      for (int i = r0; i < r0 + nr; ++i) {
        const int b = pool.row[i] >> a.blog2;
        if (b != last_b) {
          PrefetchL2(scales + (int64_t)b * a.N + col0);
          PrefetchL2(offsets + (int64_t)b * a.N + col0);
          last_b = b;
        }
      }
    }
  };
  issue(0);
  if (parts > 1) issue(1);
  ColBits<T, CPL> s, o;
  float accq[CPL], sv = 0.0f;
#pragma unroll
  for (int c = 0; c < CPL; ++c) accq[c] = 0.0f;
  auto flush = [&]() {
    if (active) FlushColumns<T, CPL>(s, o, accq, sv, acc[0]);
#pragma unroll
    for (int c = 0; c < CPL; ++c) accq[c] = 0.0f;
    sv = 0.0f;
  };
  int cur = -1;
  for (int h = 0; h < parts; ++h) {
    if (h + 1 < parts) {
      CpAsyncWait<1>();  // part h + 1 may still be in flight
    } else {
      CpAsyncWait<0>();
    }
    // part h is visible to every lane, and every lane has finished reading part h - 1, whose buffer part h + 2 takes
    __syncwarp();
    if (h + 2 < parts) issue(h + 2);
    const uint8_t* base = stage + (h % 3) * H * TB + lane * (CPL / 2);
    const int r0 = e0 + h * H, r1 = min(e1, r0 + H);
    for (int i = r0; i < r1; ++i) {
      const int b = pool.row[i] >> a.blog2;  // warp-uniform
      if (b != cur) {
        if (cur >= 0) flush();
        if (active) {
          LoadCols<T, CPL>(s, scales + (int64_t)b * a.N, col0, a.N, true);
          LoadCols<T, CPL>(o, offsets + (int64_t)b * a.N, col0, a.N, true);
        }
        cur = b;
      }
      RowBits<CPL> raw;
      const uint8_t* src = base + (i - r0) * TB;
      if constexpr (CPL == 32) {
        const uint4 v = *reinterpret_cast<const uint4*>(src);
        raw.w[0] = v.x; raw.w[1] = v.y; raw.w[2] = v.z; raw.w[3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(src);
        raw.w[0] = v.x; raw.w[1] = v.y;
      }
      const float v = pool.v[0][i];  // one row of X: every pooled row is kept
      sv += v;
      float qf[CPL];
      Unpack<CPL>(raw, qf);
#pragma unroll
      for (int c = 0; c < CPL; ++c) accq[c] = fmaf(v, qf[c], accq[c]);
    }
  }
  __syncwarp();  // every lane is done with the buffers before the block's next use of them
  flush();
}

/// End (exclusive) of the pooled rows of the quant block ending before row rend that start at i: the rows are sorted,
/// so they are a prefix of [i, e1), found by ballots over 32 pooled rows at a time.
template <int WARPS>
__device__ __forceinline__ int BlockEnd(const Pool<1, WARPS>& pool, int i, int e1, int rend, int lane) {
  int j = i;
  for (;;) {
    const int r = j + lane;
    const unsigned in = __ballot_sync(0xffffffffu, r < e1 && pool.row[r] < rend);
    j += __popc(in);
    if (in != 0xffffffffu) return j;
  }
}

/// The first n (at most U are read) of the pooled rows whose byte offsets start at off, under predicates (zeros past n).
template <int CPL, int U>
__device__ __forceinline__ void LoadBatch(RowBits<CPL> (&raw)[U], const uint8_t* qb, const unsigned* off, int n) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int w = 0; w < RowBits<CPL>::kWords; ++w) raw[u].w[w] = 0u;
    if (u < n) LoadRow<CPL>(raw[u], qb + off[u], 0, 0, true);
  }
}

/// One batch of the one-row loops: the first n (<= U) rows of raw with their kept values v into the quant block's
/// sums (accq[c] += v q 16^j, sv += v), in row order.
template <int CPL, int U>
__device__ __forceinline__ void AccumulateBatch(const RowBits<CPL> (&raw)[U], const float* v, int n, float (&accq)[CPL], float& sv) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (u < n) {  // warp-uniform
      sv += v[u];
      float qf[CPL];
      Unpack<CPL>(raw[u], qf);
#pragma unroll
      for (int c = 0; c < CPL; ++c) accq[c] = fmaf(v[u], qf[c], accq[c]);
    }
  }
}

/// The end of a quant block in the one-row loops: racc[c] += s[c] 16^-(c % 4) accq[c] + o[c] sv.
template <typename T, int CPL>
__device__ __forceinline__ void FlushOne(const ColBits<T, CPL>& s, const ColBits<T, CPL>& o, const float (&accq)[CPL], float sv,
                                         float* racc) {
#pragma unroll
  for (int c = 0; c < CPL; ++c) {
    const float sc = ColValue<T, CPL>(s, c) * NibbleScale(c), off = ColValue<T, CPL>(o, c);
    racc[c] = fmaf(sc, accq[c], fmaf(off, sv, racc[c]));
  }
}

/// One warp, one row of X, vector layout (`fast`): StreamRows' row loop with its per-row work cut to the arithmetic.
/// Every pooled row is kept (one row of X), so there is no kept-bit test; the end of a quant block's rows is found
/// by ballots over 32 pooled rows at a time instead of a scan; a lane whose columns lie outside the member reads
/// the member's row start (a valid address, never flushed) instead of branching; the rows of a batch are loaded
/// under a predicate, not a branch; the lane's column sums live in its row of the block's reduction buffer (racc,
/// flushed once per quant block), which frees CPL registers for the rows in flight and the nibble arithmetic.
/// Same operations in the same order as StreamRows: bit-identical results.
template <typename T, int CPL, int WARPS, int U>
__device__ __forceinline__ void StreamRowsOne(const GemvArgs& a, const Pool<1, WARPS>& pool, int e0, int e1, int col0, bool active,
                                              float* racc) {
  const T* scales = static_cast<const T*>(a.scales);
  const T* offsets = static_cast<const T*>(a.offsets);
  const int lane = threadIdx.x & 31, blog2 = a.blog2;
  const uint8_t* qb = a.q + (active ? col0 / 2 : 0);
  if (a.prefetch && active) {
    int last_b = -1;
    for (int i = e0; i < e1; ++i) {
      const int row = pool.row[i], b = row >> blog2;
      PrefetchL2(qb + pool.off[i]);
      if (b != last_b) {
        PrefetchL2(scales + (int64_t)b * a.N + col0);
        PrefetchL2(offsets + (int64_t)b * a.N + col0);
        last_b = b;
      }
    }
  }
  int i = e0;
  while (i < e1) {  // warp-uniform
    const int b = pool.row[i] >> blog2;
    const int j = BlockEnd<WARPS>(pool, i, e1, (b + 1) << blog2, lane);
    ColBits<T, CPL> s, o;
    if (active) {
      LoadCols<T, CPL>(s, scales + (int64_t)b * a.N, col0, a.N, true);
      LoadCols<T, CPL>(o, offsets + (int64_t)b * a.N, col0, a.N, true);
    }
    float accq[CPL], sv = 0.0f;
#pragma unroll
    for (int c = 0; c < CPL; ++c) accq[c] = 0.0f;
    for (int ii = i; ii < j; ii += U) {
      RowBits<CPL> raw[U];
      LoadBatch<CPL, U>(raw, qb, pool.off + ii, j - ii);
      AccumulateBatch<CPL, U>(raw, pool.v[0] + ii, j - ii, accq, sv);
    }
    if (active) FlushOne<T, CPL>(s, o, accq, sv, racc);
    i = j;
  }
}

/// One warp, one row of X, vector layout: StreamRowsOne software-pipelined. The slice is cut into batches of at most
/// U rows of one quant block (as StreamRowsOne does); the loads of batch h + 1 (its rows, and when it starts a quant
/// block that block's scales / offsets) are issued before batch h is computed, so a warp always has a batch in flight
/// while it computes and the DRAM latency overlaps the nibble arithmetic instead of following it. Same operations in
/// the same order as StreamRowsOne (and StreamRows): bit-identical results.
template <typename T, int CPL, int WARPS, int U>
__device__ __forceinline__ void StreamRowsPipe(const GemvArgs& a, const Pool<1, WARPS>& pool, int e0, int e1, int col0, bool active,
                                               float* racc) {
  const T* scales = static_cast<const T*>(a.scales);
  const T* offsets = static_cast<const T*>(a.offsets);
  const int lane = threadIdx.x & 31, blog2 = a.blog2;
  const uint8_t* qb = a.q + (active ? col0 / 2 : 0);
  if (e0 >= e1) return;  // warp-uniform
  int i = e0;
  int b = pool.row[i] >> blog2;
  int j = BlockEnd<WARPS>(pool, i, e1, (b + 1) << blog2, lane);
  ColBits<T, CPL> s, o;
  if (active) {
    LoadCols<T, CPL>(s, scales + (int64_t)b * a.N, col0, a.N, true);
    LoadCols<T, CPL>(o, offsets + (int64_t)b * a.N, col0, a.N, true);
  }
  RowBits<CPL> cur[U];
  LoadBatch<CPL, U>(cur, qb, pool.off + i, min(U, j - i));
  float accq[CPL], sv = 0.0f;
#pragma unroll
  for (int c = 0; c < CPL; ++c) accq[c] = 0.0f;
  for (;;) {  // warp-uniform: one batch [i, i + n) of quant block b per pass
    const int n = min(U, j - i), ni = i + n;
    const bool block_done = ni >= j, more = ni < e1;
    // the next batch: a new quant block's end and scales / offsets, then its rows
    int nj = j;
    ColBits<T, CPL> sn, on;
    if (more && block_done) {
      const int nb = pool.row[ni] >> blog2;
      nj = BlockEnd<WARPS>(pool, ni, e1, (nb + 1) << blog2, lane);
      if (active) {
        LoadCols<T, CPL>(sn, scales + (int64_t)nb * a.N, col0, a.N, true);
        LoadCols<T, CPL>(on, offsets + (int64_t)nb * a.N, col0, a.N, true);
      }
    }
    RowBits<CPL> nxt[U];
    LoadBatch<CPL, U>(nxt, qb, pool.off + ni, more ? min(U, nj - ni) : 0);
    AccumulateBatch<CPL, U>(cur, pool.v[0] + i, n, accq, sv);  // this batch
    if (block_done) {
      if (active) FlushOne<T, CPL>(s, o, accq, sv, racc);
#pragma unroll
      for (int c = 0; c < CPL; ++c) accq[c] = 0.0f;
      sv = 0.0f;
      if (more && active) {
        s = sn;
        o = on;
      }
    }
    if (!more) break;
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u] = nxt[u];
    i = ni;
    j = nj;
  }
}

/// One warp: the pooled rows [e0, e1) (sorted by row) into acc, quant block by quant block.
template <typename T, int MR, int CPL, int WARPS, int U>
__device__ __forceinline__ void StreamRows(const GemvArgs& a, const Pool<MR, WARPS>& pool, int e0, int e1, int col0, bool active, int Mb,
                                           float (&acc)[MR][CPL]) {
  const T* scales = static_cast<const T*>(a.scales);
  const T* offsets = static_cast<const T*>(a.offsets);
  const bool fast = a.fast != 0;
  if (a.prefetch && active) {  // the DRAM requests of the whole slice at once, no registers held for them
    int last_b = -1;
    for (int i = e0; i < e1; ++i) {
      const int row = pool.row[i], b = row >> a.blog2;
      PrefetchL2(a.q + (int64_t)row * a.rowbytes + col0 / 2);
      if (b != last_b) {
        PrefetchL2(scales + (int64_t)b * a.N + col0);
        PrefetchL2(offsets + (int64_t)b * a.N + col0);
        last_b = b;
      }
    }
  }
  int i = e0;
  while (i < e1) {  // warp-uniform
    const int b = pool.row[i] >> a.blog2;
    int j = i + 1;
    while (j < e1 && (pool.row[j] >> a.blog2) == b) ++j;
    ColBits<T, CPL> s, o;
    if (active) {
      LoadCols<T, CPL>(s, scales + (int64_t)b * a.N, col0, a.N, fast);
      LoadCols<T, CPL>(o, offsets + (int64_t)b * a.N, col0, a.N, fast);
    }
    float accq[MR][CPL], sv[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      sv[m] = 0.0f;
#pragma unroll
      for (int c = 0; c < CPL; ++c) accq[m][c] = 0.0f;
    }
    unsigned kmask = 0;
    for (int ii = i; ii < j; ii += U) {
      RowBits<CPL> raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (ii + u < j && active) {
          // u32 x u32 -> u64 plus the base: one IMAD.WIDE.U32 (rows and row bytes are non-negative ints)
          LoadRow<CPL>(raw[u], a.q + (uint64_t)(uint32_t)pool.row[ii + u] * (uint32_t)a.rowbytes, col0, a.rowbytes, fast);
        } else {
#pragma unroll
          for (int w = 0; w < RowBits<CPL>::kWords; ++w) raw[u].w[w] = 0u;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (ii + u < j) {
          const unsigned km = pool.km[ii + u];
          kmask |= km;
          float qf[CPL];
          Unpack<CPL>(raw[u], qf);
#pragma unroll
          for (int m = 0; m < MR; ++m) {
            if (m < Mb && ((km >> m) & 1u)) {
              const float v = pool.v[m][ii + u];
              sv[m] += v;
#pragma unroll
              for (int c = 0; c < CPL; ++c) accq[m][c] = fmaf(v, qf[c], accq[m][c]);
            }
          }
        }
      }
    }
    if (active) {
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const float pw = NibbleScale(c);
        const float sc = ColValue<T, CPL>(s, c) * pw, off = ColValue<T, CPL>(o, c);
#pragma unroll
        for (int m = 0; m < MR; ++m)
          if ((kmask >> m) & 1u) acc[m][c] = fmaf(sc, accq[m][c], fmaf(off, sv[m], acc[m][c]));
      }
    }
    i = j;
  }
}

/// Groups of the MMA kernels per step of the row loop (their loads are issued before the first one is computed).
constexpr int kMmaGroups = 2;

/// One warp of an MMA kernel: the pooled rows [e0, e1) (one row of X) for the 16 columns of virtual lane vl into cf.
template <int WARPS>
__device__ __forceinline__ void StreamRowsMma(const GemvArgs& a, const Pool<1, WARPS>& pool, int e0, int e1, int col0, bool active,
                                              float (&cf)[8][4]) {
  const int lane = threadIdx.x & 31, t = lane & 3;
  const __half* scales = static_cast<const __half*>(a.scales);
  const __half* offsets = static_cast<const __half*>(a.offsets);
  const uint8_t* qcol = a.q + col0 / 2;
  if (a.prefetch && active && t == 0) {  // the DRAM requests of the warp's rows at once (8 lanes: one 128-column row piece)
    for (int i = e0; i < e1; ++i) PrefetchL2(qcol + (int64_t)pool.row[i] * a.rowbytes);
  }
  int i = e0;
  while (i < e1) {  // warp-uniform
    int start[kMmaGroups], cnt[kMmaGroups], blk[kMmaGroups];
#pragma unroll
    for (int u = 0; u < kMmaGroups; ++u) {  // the next groups: rows of one quant block, at most 16
      start[u] = i;
      cnt[u] = 0;
      blk[u] = 0;
      if (i < e1) {
        blk[u] = pool.row[i] >> a.blog2;
        const int r = i + (lane & 15);
        const bool same = r < e1 && (pool.row[r] >> a.blog2) == blk[u];
        cnt[u] = __popc(__ballot_sync(0xffffffffu, same) & 0xffffu);  // sorted rows: a prefix
        i += cnt[u];
      }
    }
    uint2 raw[kMmaGroups][4];
    uint4 sv[kMmaGroups][2], ov[kMmaGroups][2];
#pragma unroll
    for (int u = 0; u < kMmaGroups; ++u) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int k = 2 * t + (r & 1) + (r >> 1) * 8;
        raw[u][r] = make_uint2(0u, 0u);
        if (k < cnt[u] && active) raw[u][r] = __ldcs(reinterpret_cast<const uint2*>(qcol + (int64_t)pool.row[start[u] + k] * a.rowbytes));
      }
      sv[u][0] = sv[u][1] = ov[u][0] = ov[u][1] = make_uint4(0u, 0u, 0u, 0u);
      if (cnt[u] > 0 && active) {
        const uint4* sp = reinterpret_cast<const uint4*>(scales + (int64_t)blk[u] * a.N + col0);
        const uint4* op = reinterpret_cast<const uint4*>(offsets + (int64_t)blk[u] * a.N + col0);
        sv[u][0] = __ldg(sp);
        sv[u][1] = __ldg(sp + 1);
        ov[u][0] = __ldg(op);
        ov[u][1] = __ldg(op + 1);
      }
    }
#pragma unroll
    for (int u = 0; u < kMmaGroups; ++u) {
      if (cnt[u] == 0) break;  // warp-uniform
      // B: the kept values of the group's rows 2t, 2t + 1 / 2t + 8, 2t + 9 in column 0 (lanes 0-3), zero elsewhere
      uint32_t b0 = 0u, b1 = 0u;
      if (lane < 4) {
        const int k = start[u] + 2 * t;
        const float v0 = 2 * t < cnt[u] ? pool.v[0][k] : 0.0f, v1 = 2 * t + 1 < cnt[u] ? pool.v[0][k + 1] : 0.0f;
        const float v8 = 2 * t + 8 < cnt[u] ? pool.v[0][k + 8] : 0.0f, v9 = 2 * t + 9 < cnt[u] ? pool.v[0][k + 9] : 0.0f;
        b0 = H2Bits(__floats2half2_rn(v0, v1));
        b1 = H2Bits(__floats2half2_rn(v8, v9));
      }
      const uint32_t s[8] = {sv[u][0].x, sv[u][0].y, sv[u][0].z, sv[u][0].w, sv[u][1].x, sv[u][1].y, sv[u][1].z, sv[u][1].w};
      const uint32_t o[8] = {ov[u][0].x, ov[u][0].y, ov[u][0].z, ov[u][0].w, ov[u][1].x, ov[u][1].y, ov[u][1].z, ov[u][1].w};
      uint32_t p01[4], p89[4];
      PermutePair(raw[u][0], raw[u][1], p01);  // rows 2t, 2t + 1
      PermutePair(raw[u][2], raw[u][3], p89);  // rows 2t + 8, 2t + 9
#define ACTTAIL_MMA_TILE(J)                                                                                         \
  MmaF16F32(cf[J], DequantPair<J>(p01, s, o), DequantPair<J + 8>(p01, s, o), DequantPair<J>(p89, s, o), DequantPair<J + 8>(p89, s, o), \
            b0, b1)
      ACTTAIL_MMA_TILE(0);
      ACTTAIL_MMA_TILE(1);
      ACTTAIL_MMA_TILE(2);
      ACTTAIL_MMA_TILE(3);
      ACTTAIL_MMA_TILE(4);
      ACTTAIL_MMA_TILE(5);
      ACTTAIL_MMA_TILE(6);
      ACTTAIL_MMA_TILE(7);
#undef ACTTAIL_MMA_TILE
    }
  }
}

/// One warp of the raw-nibble MMA kernel (plan kernel 5): the pooled rows [e0, e1) (one float16 row of X) for the 16
/// columns of virtual lane vl = 8 (w % 4) + lane / 4, as StreamRowsMma, but the tensor cores multiply the nibbles
/// themselves: A holds 1024 + m q per weight (one LOP3 per pair of rows into a float16 mantissa; m = 1 for even columns,
/// 16 for odd ones, from the nibble's place in its byte; no subtraction, no scale, no offset), B the group's kept values
/// (float16, in every column, so all four lanes of a quad hold every result), and a ninth mma with A = 1 gives
/// SV = Σ v of the same float16 values. The scale and offset of a quant block are applied once, at its end:
/// y[c] += s[c] (C[c] - 1024 SV) / m + o[c] SV, lane t of the quad flushing columns t, t + 4, t + 8, t + 12 of its
/// virtual lane (yacc[0..3]). Float32 accumulation throughout; the error of C - 1024 SV is that of float32 sums of
/// magnitude ~1300 Σ|v|, i.e. ~1e-4 |s| Σ|v| (the tolerance of the tests: 2e-3 of Σ|v| (|s| q + |o|)).
/// Rows [k0, k1) of tile t for rows [m0, m0 + Mb) of X: accumulate, reduce over the block's warps, then add
/// to the scratch (split mode) or write Y (FULL).
template <typename T, int MR, int CPL, int WARPS, int U, bool FULL, bool STAGE, bool MMA = false, bool ONE = false, bool PIPE = false,
          bool SELF = false>
__device__ __forceinline__ void Segment(const GemvArgs& a, Pool<MR, WARPS>& pool, float* red, uint8_t* stage, unsigned* s_last, int t, int k0,
                                        int k1, int m0, int Mb, float* redm = nullptr) {
  constexpr int TN = 32 * CPL, RPL = PoolRowsPerLane<MR>(), CH = WARPS * 32 * RPL;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const TileSpan sp = SpanOfTile<CPL>(a, t, lane);
  const int g = sp.g, lg_first = sp.lg_first, col0 = sp.col0, lo = sp.lo, hi = sp.hi;
  const bool active = sp.active;
  const T* x = static_cast<const T*>(a.x) + (int64_t)m0 * a.K * (a.swiglu ? 2 : 1);
  float acc[MR][CPL];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int c = 0; c < CPL; ++c) acc[m][c] = 0.0f;
  static_assert(!MMA || (std::is_same<T, __half>::value && MR == 1 && CPL == 16 && WARPS == 8 && !FULL && !STAGE), "MMA kernel shape");
  static_assert(!ONE || (MR == 1 && !FULL && !STAGE && !MMA), "ONE: the one-row vector-layout kernel");
  static_assert(!SELF || (std::is_same<T, __half>::value && MR == 1 && !FULL && !STAGE && !MMA), "SELF: one float16 row, split mode");
  // ONE: the lane's column sums accumulate in its row of the reduction buffer (free since the last segment's barrier)
  float* racc = red + (warp * 32 + lane) * (CPL + 1);
  if constexpr (ONE) {
#pragma unroll
    for (int c = 0; c < CPL; ++c) racc[c] = 0.0f;
  }
  float cf[8][4];  // MMA: the accumulator fragments of eight m16n8 tiles
#pragma unroll
  for (int j = 0; j < 8; ++j) cf[j][0] = cf[j][1] = cf[j][2] = cf[j][3] = 0.0f;

  for (int c0 = k0; c0 < k1; c0 += CH) {
    // pass j of lane l of warp w: row c0 + (j * WARPS + w) * 32 + l; the pool lists rows in order
    float v[RPL][MR];
    unsigned km[RPL], ballot[RPL];
#pragma unroll
    for (int j = 0; j < RPL; ++j) {
      const int r = c0 + (j * WARPS + warp) * 32 + lane;
      km[j] = 0;
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        v[j][m] = 0.0f;
        if (r < k1 && m < Mb) {
          // the rule is re-read per chunk (cached loads) rather than held in registers while rows stream
          const T raw = a.swiglu ? SwiGluAt<T>(x, m, r, a.K) : x[(int64_t)m * a.K + r];
          // SELF: the block's own selection of the segment's group (SelectForSegment; one row, m0 + m = 0)
          const Rule rule = SELF ? TopKRule(a.dm, self_select_state.sel[a.dm.sel_members == 1 ? 0 : g], g) : LoadRule(a.dm, m0 + m, a.M, g);
          v[j][m] = MaskedValue<T>(raw, r, rule, a.dm);
          if (IsKeptValue(v[j][m])) km[j] |= 1u << m;
        }
      }
      ballot[j] = __ballot_sync(0xffffffffu, km[j] != 0);
      if (lane == 0) pool.cnt[j * WARPS + warp] = __popc(ballot[j]);
    }
    __syncthreads();
    int total = 0;
#pragma unroll
    for (int q = 0; q < RPL * WARPS; ++q) total += pool.cnt[q];
#pragma unroll
    for (int j = 0; j < RPL; ++j) {
      if (km[j] != 0) {
        int pos = __popc(ballot[j] & ((1u << lane) - 1u));
#pragma unroll
        for (int q = 0; q < RPL * WARPS; ++q) pos += q < j * WARPS + warp ? pool.cnt[q] : 0;
        pool.row[pos] = c0 + (j * WARPS + warp) * 32 + lane;
        if constexpr (ONE) pool.off[pos] = (unsigned)pool.row[pos] * (unsigned)a.rowbytes;
        pool.km[pos] = (unsigned char)km[j];
#pragma unroll
        for (int m = 0; m < MR; ++m) pool.v[m][pos] = ((km[j] >> m) & 1u) ? v[j][m] : 0.0f;
      }
    }
    __syncthreads();
    const int e0 = warp * total / WARPS, e1 = (warp + 1) * total / WARPS;
    if constexpr (ONE && PIPE) {
      StreamRowsPipe<T, CPL, WARPS, U>(a, pool, e0, e1, col0, active, racc);
    } else if constexpr (ONE) {
      StreamRowsOne<T, CPL, WARPS, U>(a, pool, e0, e1, col0, active, racc);
    } else if constexpr (MMA) {
      const int vl = 8 * (warp & 3) + (lane >> 2), col0v = (lg_first + vl) * CPL, half_rows = total / 2;
      StreamRowsMma<WARPS>(a, pool, warp >= 4 ? half_rows : 0, warp >= 4 ? total : half_rows, col0v, col0v < hi, cf);
    } else if constexpr (STAGE && MR == 1) {
      const int tb0 = lg_first * CPL / 2;  // first byte of the tile in a row of Q
      if (a.stage && a.fast && tb0 % 16 == 0) {
        StreamRowsStaged<T, CPL, WARPS>(a, pool, e0, e1, col0, tb0, active, stage + warp * kStageWarpBytes, acc);
      } else {
        StreamRows<T, MR, CPL, WARPS, U>(a, pool, e0, e1, col0, active, Mb, acc);
      }
    } else {
      StreamRows<T, MR, CPL, WARPS, U>(a, pool, e0, e1, col0, active, Mb, acc);
    }
    __syncthreads();  // the pool is rewritten by the next chunk
  }

  // ---- reduce over the warps (padded rows: conflict-free), then emit ----
  T* y = static_cast<T*>(a.y);
  for (int m = 0; m < Mb; ++m) {
    if constexpr (MMA) {
      if ((lane & 3) == 0) {  // C[g][0] / C[g + 8][0]: columns j / 8 + j of virtual lane 8 (w % 4) + g
        float* r = redm + ((warp >> 2) * 32 + 8 * (warp & 3) + (lane >> 2)) * (CPL + 1);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          r[j] = cf[j][0];
          r[8 + j] = cf[j][2];
        }
      }
    } else if constexpr (!ONE) {  // ONE: the sums are in red already
#pragma unroll
      for (int mm = 0; mm < MR; ++mm)  // static register index
        if (mm == m) {
#pragma unroll
          for (int c = 0; c < CPL; ++c) red[(warp * 32 + lane) * (CPL + 1) + c] = acc[mm][c];
        }
    }
    __syncthreads();
    for (int i = tid; i < TN; i += WARPS * 32) {
      const int l = i / CPL, c = i % CPL, col = (lg_first + l) * CPL + c;
      if (col >= lo && col < hi) {
        float s = 0.0f;
        if constexpr (MMA) {
          s = redm[l * (CPL + 1) + c] + redm[(32 + l) * (CPL + 1) + c];  // warps w and w + 4 (the two row halves)
        } else {
#pragma unroll
          for (int q = 0; q < WARPS; ++q) s += red[(q * 32 + l) * (CPL + 1) + c];
        }
        if constexpr (FULL) {
          y[(int64_t)(m0 + m) * a.N + col] = Traits<T>::FromFloat(s);
        } else {
          atomicAdd(a.acc + (int64_t)m * a.N + col, s);
        }
      }
    }
    __syncthreads();
  }
  if constexpr (!FULL) {
    // The barrier above orders every thread's atomicAdds before thread 0's arrival, whose release makes
    // them visible with it (cumulativity); its acquire orders the last block's reads after all arrivals.
    if (tid == 0) {
      const long long units = a.units, grid = gridDim.x;
      const long long contributors =
          BlockOfUnit((long long)(t + 1) * a.K - 1, units, grid) - BlockOfUnit((long long)t * a.K, units, grid) + 1;
      *s_last = ArriveAcqRel(a.counters + t) == (unsigned)(contributors - 1);
    }
    __syncthreads();
    if (*s_last) {
      for (int i = tid; i < Mb * TN; i += WARPS * 32) {
        const int m = i / TN, l = (i % TN) / CPL, c = i % CPL, col = (lg_first + l) * CPL + c;
        if (col >= lo && col < hi) {
          float* p = a.acc + (int64_t)m * a.N + col;
          y[(int64_t)m * a.N + col] = Traits<T>::FromFloat(__ldcg(p));
          *p = 0.0f;
        }
      }
      if (tid == 0) a.counters[t] = 0u;
    }
    __syncthreads();  // s_last is rewritten by the next segment
  }
}

/// SELF kernels, before segment t: the top-k selection of the tile's selection group into self_select_state.sel, unless
/// the block's previous segment had the same group (its `group` is written only between barriers: block-uniform). Called from the
/// kernel's loop rather than from Segment, so that the keys' registers are not live together with the segment's.
template <int WARPS, int CPL>
__device__ __forceinline__ void SelectForSegment(const GemvArgs& a, int t) {
  SelfSelectState& ss = self_select_state;
  const int gs = a.dm.sel_members == 1 ? 0 : SpanOfTile<CPL>(a, t, 0).g;
  if (ss.group == gs) return;
  const uint2 r = BlockSelectHalf<WARPS * 32, kBlockSelectPerThread>(static_cast<const __half*>(a.x), a.K, Pick(a.sel_k, gs), a.swiglu != 0,
                                                                     ss.sh);
  if (threadIdx.x == 0) {
    ss.sel[gs] = r;
    ss.group = gs;  // every thread read ss.group before the call's barriers
  }
  __syncthreads();
}

/// Prefetches into L2, in 128-byte lines, the constant data of the stream-K range [u, u1): the scales and offsets of
/// its quant blocks over each tile's columns and (early == 2) its rows of Q. Reads no activation, writes nothing.
template <typename T, int CPL, int WARPS>
__device__ __forceinline__ void EarlyPrefetch(const GemvArgs& a, long long u, const long long u1) {
  constexpr int kLine = 128;
  const int tid = threadIdx.x;
  while (u < u1) {
    const int t = (int)(u / a.K), k0 = (int)(u % a.K);
    const int k1 = (int)min((long long)a.K, k0 + (u1 - u));
    const TileSpan sp = SpanOfTile<CPL>(a, t, 0);
    const int c0 = max(sp.lg_first * CPL, sp.lo), c1 = min((sp.lg_first + 32) * CPL, sp.hi);  // the tile's columns
    if (c0 < c1) {
      const int b0 = k0 >> a.blog2, b1 = ((k1 - 1) >> a.blog2) + 1;
      const char* s0 = reinterpret_cast<const char*>(static_cast<const T*>(a.scales) + c0);
      const char* o0 = reinterpret_cast<const char*>(static_cast<const T*>(a.offsets) + c0);
      const long long sb = (long long)(c1 - c0) * (long long)sizeof(T), srow = (long long)a.N * (long long)sizeof(T);
      const int slines = (int)((sb + kLine - 1) / kLine) + 1;  // + 1: a start inside a line
      for (int i = tid; i < (b1 - b0) * slines; i += WARPS * 32) {
        const int b = b0 + i / slines, l = i % slines;
        if ((long long)l * kLine < sb + kLine - 1) {
          PrefetchL2(s0 + b * srow + min((long long)l * kLine, sb - 1));
          PrefetchL2(o0 + b * srow + min((long long)l * kLine, sb - 1));
        }
      }
      if (a.early >= 2) {
        const int qb0 = c0 / 2, qbytes = (c1 + 1) / 2 - qb0, qlines = (qbytes + kLine - 1) / kLine + 1;
        for (int i = tid; i < (k1 - k0) * qlines; i += WARPS * 32) {
          const int r = k0 + i / qlines, l = i % qlines;
          if (l * kLine < qbytes + kLine - 1) PrefetchL2(a.q + (long long)r * a.rowbytes + qb0 + min(l * kLine, qbytes - 1));
        }
      }
    }
    u += k1 - k0;
  }
}

template <typename T, int MR, int CPL, int WARPS, int U, bool FULL, int MINB, bool STAGE = false, bool MMA = false, bool ONE = false,
          bool PIPE = false, bool SELF = false>
__global__ void __launch_bounds__(WARPS * 32, MINB) NBitsGemvKernel(const GemvArgs a) {
  static_assert(!STAGE || (MR == 1 && !FULL && StageBytes<CPL, WARPS>() >= WARPS * 32 * (CPL + 1) * 4), "stage buffer");
  __shared__ Pool<MR, WARPS> pool;
  __shared__ unsigned s_last;
  // STAGE: the dynamic shared memory holds the warps' stage buffers, and the reduction buffer after the rows
  extern __shared__ __align__(16) uint8_t dyn_smem[];
  __shared__ float red_static[STAGE || MMA ? 1 : WARPS * 32 * (CPL + 1)];
  __shared__ float redm_static[MMA ? 2 * 32 * (CPL + 1) : 1];  // MMA: the tensor cores' sums per row half
  float* red = STAGE ? reinterpret_cast<float*>(dyn_smem) : red_static;
  uint8_t* stage = STAGE ? dyn_smem : nullptr;
  if constexpr (FULL) {
    if (a.run_if != nullptr && *reinterpret_cast<volatile unsigned*>(a.run_if) == 0u) return;
    const int items = a.tiles * a.row_groups;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
      const int t = item % a.tiles, m0 = item / a.tiles * MR;
      Segment<T, MR, CPL, WARPS, U, true, false>(a, pool, red, stage, &s_last, t, 0, a.K, m0, min(MR, a.M - m0));
    }
    if (a.run_if != nullptr) {
      __syncthreads();
      if (threadIdx.x == 0 && ArriveAcqRel(a.done) == gridDim.x - 1) {
        *a.run_if = 0u;  // every block has read it: the flag is left zero for the next call
        *a.done = 0u;
      }
    }
  } else {
    const long long units = a.units, grid = gridDim.x;
    long long u = blockIdx.x * units / grid;
    const long long u1 = (blockIdx.x + 1) * units / grid;
    // Launched as a programmatic dependent (sm_90+), the block may start while the previous kernel still runs: only
    // the constant weights are touched before the wait; X, the scratch and Y after it.
    // The next kernel, when launched as a dependent (the down projection after gate|up), may start its own prefetch on
    // the SMs this grid's blocks leave as they finish.
    GridLaunchDependents();
    if (a.early > 0) EarlyPrefetch<T, CPL, WARPS>(a, u, u1);
    GridDependencyWait();
    if constexpr (SELF) {
      if (threadIdx.x == 0) self_select_state.group = -1;
      __syncthreads();  // every thread reads it before its first segment
    }
    while (u < u1) {
      const int t = (int)(u / a.K), k0 = (int)(u % a.K);
      const int k1 = (int)min((long long)a.K, k0 + (u1 - u));
      if constexpr (SELF) SelectForSegment<WARPS, CPL>(a, t);
      Segment<T, MR, CPL, WARPS, U, false, STAGE, MMA, ONE, PIPE, SELF>(a, pool, red, stage, &s_last, t, k0, k1, 0, a.M, redm_static);
      u += k1 - k0;
    }
  }
}

}  // namespace cuda
}  // namespace nbits
}  // namespace acttail
