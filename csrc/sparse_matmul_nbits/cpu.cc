// CPU kernel of com.acttail::SparseMatMulNBits (multithreaded on ONNX Runtime's pool).
//  1. Per rule group (one when every member has the same rule, else one per member) and row: the masked row
//     (common/mask.h MaskRowCpu: kept values x * f, -0.0f for a kept 0, +0.0f for dropped channels).
//  2. Tasks (split of the quant blocks, member column chunk, block of 8 rows): for each quant block, every
//     kept row of Q is unpacked once into floats and added into each row's block sum
//     accq[m] += v * q (and sv[m] += v); at the end of the block acc[m] += s * accq[m] + o * sv[m],
//     only for rows that kept a channel of that block. Decode (M <= 8) splits K into up to 16 parts
//     (partial sums added at the end) so that all threads stream Q. One row of X on AVX2 (decode) takes
//     AccumulateOneRowAvx2 instead: per quant block the kept rows are listed once, and each 64-column tile of
//     the kept rows of Q is unpacked and accumulated in registers (eight 8-float accumulators), then flushed
//     with the block's scales and offsets; the same sums over k in the same order (the flush may round differently).
//  Many rows (16 or more, over 1/8 of the entries kept) take DenseTask first: W dequantized into packed panels, the
//  dense op's panel GEMM on the masked X; a non-finite result reruns the call on step 2 (which reads only kept data).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/env.h"
#include "common/float16.h"
#include "common/panel_gemm_cpu.h"
#include "sparse_matmul_nbits/op.h"

namespace acttail {
namespace nbits {

namespace {

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) { return HalfToFloat(v); }
inline void FromFloat(float v, float* out) { *out = v; }
inline void FromFloat(float v, uint16_t* out) { *out = FloatToHalf(v); }

constexpr int64_t kRowBlock = 8;

template <typename T>
struct Job {
  const Problem* p;
  const std::vector<MemberRule>* rules;
  const T* x;
  const uint8_t* q;
  const T* scales;
  const T* offsets;
  T* y;
  int groups;            // rule groups: 1 (every member has the same rule) or G
  std::vector<float> v;  // [groups, M, K] masked rows (IsKept: kept, a kept 0 is -0.0f)
  // column tasks
  struct Chunk {
    int g;
    int64_t c0, c1;
  };
  std::vector<Chunk> chunks;
  std::vector<Chunk> dense_chunks;  // prefill dense path: kDenseCols-wide chunks of each member
  uint8_t* nonfinite = nullptr;     // per dense task: 1 when its result is not finite
  int64_t splits = 1, row_blocks = 1;
  bool row_tiles = true;  // one row of X on AVX2: AccumulateOneRowAvx2 (ACTTAIL_CPU_ROW_TILES=0: the per-row path)
  std::vector<float> partial;  // [splits, M, N] when splits > 1

  int MemberGroup(int g) const { return groups == 1 ? 0 : g; }
};

/// Rule group rg, row m: the masked row (group rg applies member rg's rule; group 0 is every member's).
template <typename T>
void SelectTask(void* data, size_t task) {
  auto& j = *static_cast<Job<T>*>(data);
  const int64_t K = j.p->K, M = j.p->M, rg = (int64_t)task / M, m = (int64_t)task % M;
  MaskRowCpu<T>(j.x + m * K, K, (*j.rules)[(size_t)rg], j.v.data() + (rg * M + m) * K);
}

/// Column col of one row of Q (low nibble: even column, high nibble: odd column) as a float.
inline float Nibble(const uint8_t* row, int64_t col) {
  const uint8_t packed = row[col >> 1];
  return (float)((col & 1) ? packed >> 4 : packed & 15);
}

/// Unpack columns [c0, c0 + w) of one row of Q into floats.
__attribute__((always_inline)) inline void UnpackRow(const uint8_t* row, int64_t c0, int64_t w, float* out) {
  int64_t j = 0;
  if (c0 & 1) {
    out[0] = (float)(row[c0 >> 1] >> 4);
    j = 1;
  }
  const uint8_t* b = row + ((c0 + j) >> 1);
  const int64_t pairs = (w - j) / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    out[j + 2 * i] = (float)(b[i] & 15);
    out[j + 2 * i + 1] = (float)(b[i] >> 4);
  }
  if ((w - j) & 1) out[w - 1] = (float)(b[pairs] & 15);
}

/// Task (split, chunk, row block): the block-factored accumulation over the split's quant blocks. Compiled for
/// AVX2+FMA and for baseline x86-64 (AccumulateTask picks by common/cpu_isa.h), like the dense op's hot loops.
template <typename T>
__attribute__((always_inline)) inline void AccumulateImpl(Job<T>& j, size_t task) {
  const Problem& p = *j.p;
  const int64_t K = p.K, N = p.N, M = p.M, B = p.B, rb = (N + 1) / 2;
  const int64_t nc = (int64_t)j.chunks.size();
  const int64_t split = (int64_t)task / (nc * j.row_blocks), rest = (int64_t)task % (nc * j.row_blocks);
  const auto& ch = j.chunks[(size_t)(rest / j.row_blocks)];
  const int64_t r0 = (rest % j.row_blocks) * kRowBlock, rows = std::min(kRowBlock, M - r0);
  const int64_t w = ch.c1 - ch.c0, rg = j.MemberGroup(ch.g);
  const int64_t b0 = p.blocks * split / j.splits, b1 = p.blocks * (split + 1) / j.splits;
  thread_local std::vector<float> acc, accq, qf, sf, of;
  acc.assign((size_t)(kRowBlock * w), 0.0f);
  accq.resize((size_t)(kRowBlock * w));
  qf.resize((size_t)w);
  sf.resize((size_t)w);
  of.resize((size_t)w);
  const float* vals = j.v.data() + (rg * M + r0) * K;
  for (int64_t b = b0; b < b1; ++b) {
    float sv[kRowBlock] = {};
    bool any[kRowBlock] = {};
    for (int64_t k = b * B; k < std::min(K, (b + 1) * B); ++k) {
      bool used = false;
      for (int64_t r = 0; r < rows; ++r) used |= IsKept(vals[r * K + k]);
      if (!used) continue;  // a row of Q nobody keeps is never read
      UnpackRow(j.q + k * rb, ch.c0, w, qf.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float xv = vals[r * K + k];
        if (!IsKept(xv)) continue;
        float* aq = accq.data() + r * w;
        if (!any[r]) {
          std::fill(aq, aq + w, 0.0f);
          any[r] = true;
        }
        sv[r] += xv;
        for (int64_t c = 0; c < w; ++c) aq[c] += xv * qf[c];
      }
    }
    bool flush = false;
    for (int64_t r = 0; r < rows; ++r) flush |= any[r];
    if (!flush) continue;  // scales / offsets of a block nobody keeps are never read
    for (int64_t c = 0; c < w; ++c) {
      sf[c] = ToFloat(j.scales[b * N + ch.c0 + c]);
      of[c] = ToFloat(j.offsets[b * N + ch.c0 + c]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (!any[r]) continue;
      float* ac = acc.data() + r * w;
      const float* aq = accq.data() + r * w;
      for (int64_t c = 0; c < w; ++c) ac[c] += sf[c] * aq[c] + of[c] * sv[r];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* ac = acc.data() + r * w;
    if (j.splits > 1) {
      std::copy(ac, ac + w, j.partial.data() + (split * M + r0 + r) * N + ch.c0);
    } else {
      T* yr = j.y + (r0 + r) * N + ch.c0;
      for (int64_t c = 0; c < w; ++c) FromFloat(ac[c], yr + c);
    }
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) void AccumulateAvx2(Job<T>& j, size_t task) { AccumulateImpl(j, task); }
template <typename T>
void AccumulateScalar(Job<T>& j, size_t task) { AccumulateImpl(j, task); }

/// Eight scales / offsets of one block as floats.
template <typename T>
__attribute__((target("avx2,fma"), always_inline)) inline __m256 LoadFloats8(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(src);
  } else {
    alignas(32) float f[8];
    for (int i = 0; i < 8; ++i) f[i] = ToFloat(src[i]);
    return _mm256_load_ps(f);
  }
}

/// Columns [2 byte, 2 byte + 16 kGroups) of the block's n kept rows of Q, times their x, summed over the rows in order.
/// Group g (8 bytes of a row) widens to 8 int32 lanes; its low nibbles (even columns) sum into a[2g], its high
/// nibbles (odd columns) into a[2g + 1], so that a kept row costs one widening load per 16 columns and no shuffle.
template <int kGroups>
__attribute__((target("avx2,fma"), always_inline)) inline void TileSums(const uint8_t* const* rows, const float* xs, int64_t n,
                                                                         int64_t byte, __m256* a) {
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int t = 0; t < 2 * kGroups; ++t) a[t] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m256 xv = _mm256_set1_ps(xs[i]);
    for (int g = 0; g < kGroups; ++g) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[i] + byte + 8 * g)));
      a[2 * g] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), a[2 * g]);
      a[2 * g + 1] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), a[2 * g + 1]);
    }
  }
}

/// acc[c] += s[c] * aq[c] + o[c] * sv over the tile's 16 kGroups columns, aq as TileSums leaves it (even / odd columns
/// of each group in two vectors; interleaved back here, once per block).
template <typename T, int kGroups>
__attribute__((target("avx2,fma"), always_inline)) inline void FlushTile(const __m256* aq, const T* sc, const T* of, __m256 sv,
                                                                          float* acc) {
  for (int g = 0; g < kGroups; ++g) {
    const __m256 lo = _mm256_unpacklo_ps(aq[2 * g], aq[2 * g + 1]), hi = _mm256_unpackhi_ps(aq[2 * g], aq[2 * g + 1]);
    const __m256 cols[2] = {_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31)};
    for (int h = 0; h < 2; ++h) {
      const int64_t c = 16 * g + 8 * h;
      const __m256 v = _mm256_fmadd_ps(LoadFloats8(sc + c), cols[h], _mm256_loadu_ps(acc + c));
      _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(LoadFloats8(of + c), sv, v));
    }
  }
}

/// Task (split, chunk) of one row of X (decode) on AVX2: the sums of AccumulateImpl over k in the same order, with
/// each 64- (then 32-) column tile of the block's kept rows of Q unpacked and accumulated in registers; a first odd
/// column and the last columns one at a time. The flush with the block's scale and offset rounds as two FMAs, so Y may
/// differ from the per-row path in the last bit.
template <typename T>
__attribute__((target("avx2,fma"))) void AccumulateOneRowAvx2(Job<T>& j, size_t task) {
  const Problem& p = *j.p;
  const int64_t K = p.K, N = p.N, B = p.B, rb = (N + 1) / 2;
  const int64_t nc = (int64_t)j.chunks.size(), split = (int64_t)task / nc;
  const auto& ch = j.chunks[(size_t)(task % nc)];
  const int64_t c0 = ch.c0, w = ch.c1 - ch.c0;
  const int64_t b0 = p.blocks * split / j.splits, b1 = p.blocks * (split + 1) / j.splits;
  // tiles read whole bytes of a row of Q: a chunk starting at an odd column takes its first column alone
  const int64_t first = std::min<int64_t>(c0 & 1, w);
  const int64_t wide_end = first + (w - first) / 64 * 64, tiles_end = first + (w - first) / 32 * 32;
  thread_local std::vector<float> acc, kept_v;
  thread_local std::vector<const uint8_t*> kept_row;
  acc.assign((size_t)w, 0.0f);
  kept_v.resize((size_t)B);
  kept_row.resize((size_t)B);
  const float* vals = j.v.data() + j.MemberGroup(ch.g) * K;
  for (int64_t b = b0; b < b1; ++b) {
    int64_t n = 0;
    float sv = 0.0f;
    for (int64_t k = b * B; k < std::min(K, (b + 1) * B); ++k) {
      if (!IsKept(vals[k])) continue;
      kept_v[(size_t)n] = vals[k];
      kept_row[(size_t)n] = j.q + k * rb;
      sv += vals[k];
      ++n;
    }
    if (n == 0) continue;  // rows, scales and offsets of a block nobody keeps are never read
    const T* sc = j.scales + b * N + c0;
    const T* of = j.offsets + b * N + c0;
    const __m256 svv = _mm256_set1_ps(sv);
    const auto column = [&](int64_t c) {  // one column of the chunk
      const int64_t col = c0 + c;
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) sum += kept_v[(size_t)i] * Nibble(kept_row[(size_t)i], col);
      acc[(size_t)c] += ToFloat(sc[c]) * sum + ToFloat(of[c]) * sv;
    };
    __m256 aq[8];
    int64_t c = 0;
    for (; c < first; ++c) column(c);
    for (; c < wide_end; c += 64) {  // eight accumulators: even and odd columns of four groups of 16
      TileSums<4>(kept_row.data(), kept_v.data(), n, (c0 + c) >> 1, aq);
      FlushTile<T, 4>(aq, sc + c, of + c, svv, acc.data() + c);
    }
    for (; c < tiles_end; c += 32) {
      TileSums<2>(kept_row.data(), kept_v.data(), n, (c0 + c) >> 1, aq);
      FlushTile<T, 2>(aq, sc + c, of + c, svv, acc.data() + c);
    }
    for (; c < w; ++c) column(c);  // the last columns of the chunk
  }
  if (j.splits > 1) {
    std::copy(acc.begin(), acc.end(), j.partial.data() + split * N + c0);
  } else {
    for (int64_t c = 0; c < w; ++c) FromFloat(acc[(size_t)c], j.y + c0 + c);
  }
}

template <typename T>
void AccumulateTask(void* data, size_t task) {
  auto& j = *static_cast<Job<T>*>(data);
  if (CpuIsa() >= Isa::kAvx2) {
    if (j.p->M == 1 && j.row_tiles) {
      AccumulateOneRowAvx2(j, task);
    } else {
      AccumulateAvx2(j, task);
    }
  } else {
    AccumulateScalar(j, task);
  }
}

/// Task (chunk): y = sum of the splits' partial sums (decode).
template <typename T>
void ReduceTask(void* data, size_t task) {
  auto& j = *static_cast<Job<T>*>(data);
  const int64_t M = j.p->M, N = j.p->N;
  const auto& ch = j.chunks[task];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = ch.c0; c < ch.c1; ++c) {
      float v = 0.0f;
      for (int64_t s = 0; s < j.splits; ++s) v += j.partial[(size_t)((s * M + m) * N + c)];
      FromFloat(v, j.y + m * N + c);
    }
  }
}

// ---- prefill: a dense GEMM of the masked X with W dequantized into packed panels ---------------------
// As in the dense op's prefill (sparse_matmul/cpu.cc): with a finite dequantized W a masked (zero) x adds exactly 0, so
// the masked product is a dense GEMM of the masked X; an Inf/NaN scale, offset or product makes its whole result
// non-finite, and a task whose result is not finite sends the call to the exact path (which never reads what no row
// keeps). W is dequantized as s q + o in float32, once per K slice and column chunk for up to 256 rows of X.
constexpr int64_t kDenseRows = 256;   // rows per task (one packed panel serves all of them)
constexpr int64_t kDenseCols = 128;   // columns per task
constexpr int64_t kDenseDepth = 256;  // K slice dequantized and packed at a time (128 KB of floats)

/// Row kk of the panel strip at columns [cs, cs + n): d[c] = s q + o (a multiply and an add: the same roundings on every
/// ISA path; never inlined into the AVX2 caller, where the compiler could contract them into an FMA), zero past n.
template <typename T>
__attribute__((noinline)) void DequantRowScalar(const uint8_t* row, const T* sc, const T* of, int64_t cs, int64_t n, float* d) {
  for (int64_t c = 0; c < n; ++c) d[c] = ToFloat(sc[c]) * Nibble(row, cs + c) + ToFloat(of[c]);
  for (int64_t c = n; c < kPanelStrip; ++c) d[c] = 0.0f;
}

/// DequantRowScalar for a whole strip starting at an even column (its 16 codes are 8 bytes of the row) in two vectors:
/// each byte widens to a lane, its low nibble (even column) and high nibble (odd column) are interleaved back as
/// FlushTile does; other strips take the scalar code. Bit-identical to it.
template <typename T>
__attribute__((target("avx2,fma"))) void DequantRowAvx2(const uint8_t* row, const T* sc, const T* of, int64_t cs, int64_t n, float* d) {
  if (n != kPanelStrip || (cs & 1) != 0) {
    DequantRowScalar(row, sc, of, cs, n, d);
    return;
  }
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (cs >> 1))));
  const __m256 even = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  const __m256 odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
  const __m256 q[2] = {_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31)};
  for (int h = 0; h < 2; ++h) {
    __m256 product = _mm256_mul_ps(LoadFloats8(sc + 8 * h), q[h]);
    asm("" : "+x"(product));  // a rounded product: GCC would otherwise contract the multiply and the add into an FMA
    _mm256_storeu_ps(d + 8 * h, _mm256_add_ps(product, LoadFloats8(of + 8 * h)));
  }
}

template <typename T>
void DenseTask(void* data, size_t task) {
  auto& j = *static_cast<Job<T>*>(data);
  const Problem& p = *j.p;
  const int64_t K = p.K, N = p.N, M = p.M, B = p.B, rb = (N + 1) / 2;
  const int64_t row_tiles = (M + kDenseRows - 1) / kDenseRows;
  const auto& ch = j.dense_chunks[(size_t)task / (size_t)row_tiles];
  const int64_t r0 = ((int64_t)task % row_tiles) * kDenseRows, rows = std::min(kDenseRows, M - r0);
  const int64_t width = ch.c1 - ch.c0, strips = (width + kPanelStrip - 1) / kPanelStrip;
  thread_local std::vector<float> acc, panel, zeros;
  acc.assign((size_t)(kDenseRows * kDenseCols), 0.0f);
  panel.resize((size_t)(kDenseCols * kDenseDepth));
  if (zeros.size() < (size_t)kDenseDepth) zeros.assign((size_t)kDenseDepth, 0.0f);  // never written: zero once per thread
  const float* vals = j.v.data() + (j.MemberGroup(ch.g) * M + r0) * K;
  const float* a[kDenseRows];
  const bool avx2 = CpuIsa() >= Isa::kAvx2;
  for (int64_t kb = 0; kb < K; kb += kDenseDepth) {
    const int64_t depth = std::min(kDenseDepth, K - kb);
    for (int64_t st = 0; st < strips; ++st) {  // W[kb:kb+depth, strip] = s q + o as [strip][k][16], zero padded
      float* dst = panel.data() + st * depth * kPanelStrip;
      const int64_t cs = ch.c0 + st * kPanelStrip, n = std::min(kPanelStrip, ch.c1 - cs);
      for (int64_t k = 0; k < depth; ++k) {
        const int64_t kk = kb + k, b = kk / B;
        const uint8_t* row = j.q + kk * rb;
        const T* sc = j.scales + b * N + cs;
        const T* of = j.offsets + b * N + cs;
        float* d = dst + k * kPanelStrip;
        if (avx2) {
          DequantRowAvx2(row, sc, of, cs, n, d);
        } else {
          DequantRowScalar(row, sc, of, cs, n, d);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) a[r] = vals + r * K + kb;
    PanelGemm(a, rows, panel.data(), strips, depth, zeros.data(), acc.data(), kDenseCols);
  }
  j.nonfinite[task] = StoreFinite(acc.data(), kDenseCols, rows, width, j.y + r0 * N + ch.c0, N) ? 0 : 1;
}

/// Whether a call of many rows takes the dense path: at least 16 rows and more than 1/8 of the masked entries kept
/// (on SmolLM2's shapes at 128 rows the dense path still wins at 85 % masked with the AVX-512 and the AVX2 tile;
/// benchmarks/nbits_cpu_ab.py); ACTTAIL_CPU_DENSE_PREFILL=0: never (read per call).
template <typename T>
bool UseDense(const Job<T>& j) {
  const Problem& p = *j.p;
  if (p.M < 16 || p.K == 0 || EnvIs("ACTTAIL_CPU_DENSE_PREFILL", "0")) return false;
  int64_t kept = 0;
  for (float v : j.v) kept += IsKept(v) ? 1 : 0;
  return kept * 8 > (int64_t)j.v.size();
}

}  // namespace

template <typename T>
void CpuRun(const Problem& p, const std::vector<MemberRule>& rules, const T* x, const uint8_t* q, const T* scales, const T* offsets,
            T* y, ParallelFn parallel, void* parallel_ctx) {
  if (p.M == 0 || p.N == 0) return;
  Job<T> j;
  j.p = &p;
  j.rules = &rules;
  j.x = x;
  j.q = q;
  j.scales = scales;
  j.offsets = offsets;
  j.y = y;
  bool uniform = true;
  for (const MemberRule& r : rules) uniform &= r.SameMask(rules[0]);
  j.groups = uniform ? 1 : (int)rules.size();
  j.row_tiles = !EnvIs("ACTTAIL_CPU_ROW_TILES", "0");  // read per call, for A/B runs and tests
  const bool par = parallel != nullptr && p.M * std::max<int64_t>(p.K, 1) * p.N >= (1 << 16);
  const auto run = [&](void (*fn)(void*, size_t), size_t tasks) {
    if (par && tasks > 1) {
      parallel(parallel_ctx, fn, tasks, &j);
    } else {
      for (size_t t = 0; t < tasks; ++t) fn(&j, t);
    }
  };
  j.v.assign((size_t)(j.groups * p.M * p.K), 0.0f);
  if (p.K > 0) run(&SelectTask<T>, (size_t)(j.groups * p.M));
  const bool decode = p.M <= kRowBlock;
  if (!decode && UseDense(j)) {
    for (int g = 0; g < p.spans.count(); ++g)
      for (int64_t c = p.spans.begin[g]; c < p.spans.end[g]; c += kDenseCols)
        j.dense_chunks.push_back({g, c, std::min(p.spans.end[g], c + kDenseCols)});
    const size_t tasks = j.dense_chunks.size() * (size_t)((p.M + kDenseRows - 1) / kDenseRows);
    std::vector<uint8_t> nonfinite(tasks, 0);
    j.nonfinite = nonfinite.data();
    run(&DenseTask<T>, tasks);
    j.nonfinite = nullptr;
    if (std::find(nonfinite.begin(), nonfinite.end(), 1) == nonfinite.end()) return;  // finite: exact
  }
  const int64_t width = decode ? 1024 : 256;  // columns per task (accumulators stay in L1 / L2)
  for (int g = 0; g < p.spans.count(); ++g)
    for (int64_t c = p.spans.begin[g]; c < p.spans.end[g]; c += width) j.chunks.push_back({g, c, std::min(p.spans.end[g], c + width)});
  j.row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  if (decode && par) {  // split K so that every thread streams Q: at least 32 KB of Q per task, at most 16 parts
    const int64_t bytes = p.K * p.N / 2, per_split = 32 << 10;
    j.splits = std::max<int64_t>(1, std::min<int64_t>({16, p.blocks, bytes / (per_split * (int64_t)j.chunks.size())}));
  }
  if (j.splits > 1) j.partial.assign((size_t)(j.splits * p.M * p.N), 0.0f);
  run(&AccumulateTask<T>, (size_t)(j.splits * (int64_t)j.chunks.size() * j.row_blocks));
  if (j.splits > 1) run(&ReduceTask<T>, j.chunks.size());
}

template void CpuRun<float>(const Problem&, const std::vector<MemberRule>&, const float*, const uint8_t*, const float*, const float*,
                            float*, ParallelFn, void*);
template void CpuRun<uint16_t>(const Problem&, const std::vector<MemberRule>&, const uint16_t*, const uint8_t*, const uint16_t*,
                               const uint16_t*, uint16_t*, ParallelFn, void*);

}  // namespace nbits
}  // namespace acttail
