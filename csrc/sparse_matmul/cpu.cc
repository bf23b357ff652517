// CPU kernel of com.acttail::SparseMatMul: per member (column segment) and row, the masked X as float32
// (common/mask_cpu.cc), then only the kept rows of W accumulated into float32 accumulators.
//  * decode (M <= 8 rows): split-K over the list of kept channels; each task streams whole kept rows
//    of W (contiguous, up to 2048 columns at a time) into its own partial sums, which are added up at
//    the end. Whole-row reads let the hardware prefetcher stream W at memory speed.
//  * many rows: per block of 8 rows x 256 columns (each W row chunk read once per row block), or a
//    packed dense GEMM of the masked X when many entries are kept (a task whose result is not finite is
//    recomputed the first way: only then can a masked Inf/NaN weight have touched it).
// Members with the same rule share one pass over all their columns.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/float16.h"
#include "common/panel_gemm_cpu.h"
#include "common/status.h"
#include "sparse_matmul/op.h"

namespace acttail {

Problem CheckShapes(const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape, const std::string& where) {
  if (w_shape.size() != 2)
    throw InvalidArgument(where + "W must be 2-D [K, N] (ONNX MatMul layout), got rank " + std::to_string(w_shape.size()));
  if (x_shape.empty()) throw InvalidArgument(where + "X must have rank >= 1 ([..., K]), got a scalar");
  Problem p;
  p.K = x_shape.back();
  p.N = w_shape[1];
  if (w_shape[0] != p.K)
    throw InvalidArgument(where + "last dimension of X (" + std::to_string(p.K) + ") must equal the first dimension of W (" +
                          std::to_string(w_shape[0]) + "); W is [in_features, out_features]");
  p.M = 1;
  for (size_t i = 0; i + 1 < x_shape.size(); ++i) p.M *= x_shape[i];
  p.y_shape.assign(x_shape.begin(), x_shape.end() - 1);
  p.y_shape.push_back(p.N);
  return p;
}

namespace {

constexpr int64_t kChunk = 256;  // output columns per task (accumulator stays in L1)

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) { return HalfToFloat(v); }
inline void FromFloat(float v, float* out) { *out = v; }
inline void FromFloat(float v, uint16_t* out) { *out = FloatToHalf(v); }

// SIMD dispatch: each hot loop is compiled for AVX2+FMA and for baseline x86-64 (ACTTAIL_SIMD_VARIANTS,
// common/cpu_isa.h; the prefill GEMM, common/panel_gemm_cpu.cc, also for AVX-512) and picked at run time by CpuIsa().
bool HasAvx2Fma() { return CpuIsa() >= Isa::kAvx2; }

// acc[0:n] += a * w[0:n]
__attribute__((always_inline)) inline void AxpyImpl(float* __restrict acc, float a, const float* __restrict w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += a * w[j];
}
__attribute__((always_inline)) inline void AxpyHalfImpl(float* __restrict acc, float a, const uint16_t* __restrict w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += a * HalfToFloat(w[j]);
}
ACTTAIL_SIMD_VARIANTS(Axpy, (float* acc, float a, const float* w, int64_t n), (acc, a, w, n))
ACTTAIL_SIMD_VARIANTS(AxpyHalf, (float* acc, float a, const uint16_t* w, int64_t n), (acc, a, w, n))
inline void AxpyT(float* acc, float a, const float* w, int64_t n) { Axpy(acc, a, w, n); }

constexpr int kRowsPerPass = 8;  // kept rows of W added per pass over the accumulators (one output row)

// acc[0:n] += sum_{r < R} a[r] * w_r[0:n] with R <= kRowsPerPass. AVX2: 64-column strips held in 8
// registers while the R rows are added, so each accumulator is loaded and stored once per R rows; the
// same columns of the next pass's rows (`next`, kRowsPerPass pointers, null past the end) are prefetched.
__attribute__((target("avx2,fma"))) void RowsAxpyAvx2(float* __restrict acc, const float* __restrict a,
                                                      const float* const* __restrict w, const float* const* __restrict next,
                                                      int R, int64_t n) {
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) {
    for (int r = 0; r < kRowsPerPass; ++r)
      if (next[r]) for (int l = 0; l < 4; ++l) __builtin_prefetch(next[r] + c + 16 * l, 0, 3);
    __m256 t0 = _mm256_loadu_ps(acc + c), t1 = _mm256_loadu_ps(acc + c + 8), t2 = _mm256_loadu_ps(acc + c + 16),
           t3 = _mm256_loadu_ps(acc + c + 24), t4 = _mm256_loadu_ps(acc + c + 32), t5 = _mm256_loadu_ps(acc + c + 40),
           t6 = _mm256_loadu_ps(acc + c + 48), t7 = _mm256_loadu_ps(acc + c + 56);
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r);
      const float* wr = w[r] + c;
      t0 = _mm256_fmadd_ps(ar, _mm256_loadu_ps(wr), t0);
      t1 = _mm256_fmadd_ps(ar, _mm256_loadu_ps(wr + 8), t1);
      t2 = _mm256_fmadd_ps(ar, _mm256_loadu_ps(wr + 16), t2);
      t3 = _mm256_fmadd_ps(ar, _mm256_loadu_ps(wr + 24), t3);
      t4 = _mm256_fmadd_ps(ar, _mm256_loadu_ps(wr + 32), t4);
      t5 = _mm256_fmadd_ps(ar, _mm256_loadu_ps(wr + 40), t5);
      t6 = _mm256_fmadd_ps(ar, _mm256_loadu_ps(wr + 48), t6);
      t7 = _mm256_fmadd_ps(ar, _mm256_loadu_ps(wr + 56), t7);
    }
    _mm256_storeu_ps(acc + c, t0); _mm256_storeu_ps(acc + c + 8, t1); _mm256_storeu_ps(acc + c + 16, t2);
    _mm256_storeu_ps(acc + c + 24, t3); _mm256_storeu_ps(acc + c + 32, t4); _mm256_storeu_ps(acc + c + 40, t5);
    _mm256_storeu_ps(acc + c + 48, t6); _mm256_storeu_ps(acc + c + 56, t7);
  }
  for (; c + 8 <= n; c += 8) {
    __m256 t = _mm256_loadu_ps(acc + c);
    for (int r = 0; r < R; ++r) t = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r), _mm256_loadu_ps(w[r] + c), t);
    _mm256_storeu_ps(acc + c, t);
  }
  for (; c < n; ++c) {
    float v = acc[c];
    for (int r = 0; r < R; ++r) v = std::fma(a[r], w[r][c], v);
    acc[c] = v;
  }
}
void RowsAxpyBase(float* __restrict acc, const float* __restrict a, const float* const* __restrict w, int R, int64_t n) {
  for (int r = 0; r < R; ++r) Axpy(acc, a[r], w[r], n);
}
inline void RowsAxpy(float* acc, const float* a, const float* const* w, const float* const* next, int R, int64_t n) {
  HasAvx2Fma() ? RowsAxpyAvx2(acc, a, w, next, R, n) : RowsAxpyBase(acc, a, w, R, n);
}
inline void AxpyT(float* acc, float a, const uint16_t* w, int64_t n) { AxpyHalf(acc, a, w, n); }

constexpr int64_t kRowBlock = 8;  // rows sharing each W row chunk read (prefill)

// ---- decode path (M <= kRowBlock): split-K over the kept channels ---------------------------------
constexpr int64_t kDecodeCols = 2048;          // columns per task: one contiguous W segment per kept row
constexpr int64_t kDecodeTaskBytes = 64 << 10;  // W bytes per task, at least (enough tasks for the threads)
constexpr int64_t kDecodeMaxSplits = 32;

template <typename T>
struct DecodeJob {
  const T* w;
  T* y;
  int64_t M, K, N, ld;     // N: columns of this slice; ld: row stride of W and Y
  const float* xm;         // [M, K] masked X (float32, +0 where masked, see IsKept)
  const int32_t* kept;     // channels kept by at least one row, ascending
  int64_t n_kept, splits, col_chunks;
  float* partial;          // [splits, M, N] partial sums (each task owns one slice)
};

/// Task (split, column chunk): partial[split, :, c0:c1] = sum over its kept channels c of x[:, c] * W[c, c0:c1].
template <typename T>
void DecodeTask(void* data, size_t task) {
  auto& j = *static_cast<DecodeJob<T>*>(data);
  const int64_t split = (int64_t)task / j.col_chunks, c0 = ((int64_t)task % j.col_chunks) * kDecodeCols;
  const int64_t width = std::min(kDecodeCols, j.N - c0);
  const int64_t i0 = j.n_kept * split / j.splits, i1 = j.n_kept * (split + 1) / j.splits;
  float* acc = j.partial + split * j.M * j.N;
  for (int64_t r = 0; r < j.M; ++r) std::fill(acc + r * j.N + c0, acc + r * j.N + c0 + width, 0.0f);
  if constexpr (std::is_same_v<T, float>) {
    if (j.M == 1) {  // one row keeps every listed channel: add kRowsPerPass rows per pass, no zero coefficients
      float a[kRowsPerPass];
      const float* rows[kRowsPerPass];
      const float* next[kRowsPerPass];
      for (int64_t i = i0; i < i1; i += kRowsPerPass) {
        const int R = (int)std::min<int64_t>(kRowsPerPass, i1 - i);
        for (int r = 0; r < R; ++r) {
          a[r] = j.xm[j.kept[i + r]];
          rows[r] = j.w + j.kept[i + r] * j.ld + c0;
        }
        for (int r = 0; r < kRowsPerPass; ++r)
          next[r] = i + kRowsPerPass + r < i1 ? j.w + j.kept[i + kRowsPerPass + r] * j.ld + c0 : nullptr;
        RowsAxpy(acc + c0, a, rows, next, R, width);
      }
      return;
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t c = j.kept[i];
    if (i + 2 < i1) __builtin_prefetch(j.w + j.kept[i + 2] * j.ld + c0, 0, 0);  // next row starts: the stride defeats the prefetcher
    const T* wrow = j.w + c * j.ld + c0;
    for (int64_t r = 0; r < j.M; ++r) {
      const float a = j.xm[r * j.K + c];
      if (IsKept(a)) AxpyT(acc + r * j.N + c0, a, wrow, width);
    }
  }
}

/// Task (column chunk): y[:, c0:c1] = sum over splits of partial[split, :, c0:c1].
template <typename T>
void DecodeReduceTask(void* data, size_t task) {
  auto& j = *static_cast<DecodeJob<T>*>(data);
  const int64_t c0 = (int64_t)task * kDecodeCols, width = std::min(kDecodeCols, j.N - c0);
  for (int64_t r = 0; r < j.M; ++r) {
    T* yr = j.y + r * j.ld + c0;
    const float* p0 = j.partial + r * j.N + c0;
    for (int64_t c = 0; c < width; ++c) {
      float v = p0[c];
      for (int64_t s = 1; s < j.splits; ++s) v += p0[s * j.M * j.N + c];
      FromFloat(v, yr + c);
    }
  }
}

template <typename T>
struct Job {
  const T* x;
  const T* w;       // first column of the slice
  T* y;             // first column of the slice
  int64_t M, K, N, ld;  // N: columns of the slice; ld: row stride of W and Y
  const MemberRule* rule;
  float* xm;       // [M, K] kept values of X as float, +0 where masked (IsKept)
  int64_t chunks;  // column chunks per row block
  int64_t* kept;   // [M] number of kept entries per row
  uint8_t* nonfinite = nullptr;  // [dense tasks] 1 where DenseTask produced an Inf/NaN output
};

template <typename T>
void MaskTask(void* data, size_t m) {
  auto& j = *static_cast<Job<T>*>(data);
  j.kept[m] = MaskRowCpu(j.x + m * j.K, j.K, *j.rule, j.xm + m * j.K);
}

/// One task: rows [r0, r0 + kRowBlock) x columns [c0, c0 + kChunk). Each W row chunk is read once
/// from memory and reused from L1 by every row of the block that keeps that channel.
template <typename T>
void AccumulateTask(void* data, size_t task) {
  auto& j = *static_cast<Job<T>*>(data);
  const int64_t M = j.M, K = j.K, N = j.N, ld = j.ld;
  const int64_t r0 = ((int64_t)task / j.chunks) * kRowBlock, c0 = ((int64_t)task % j.chunks) * kChunk;
  const int64_t rows = std::min(kRowBlock, M - r0), width = std::min(kChunk, N - c0);
  float acc[kRowBlock][kChunk];
  const float* xm = j.xm + r0 * K;
  for (int64_t r = 0; r < rows; ++r) std::fill(acc[r], acc[r] + width, 0.0f);
  for (int64_t c = 0; c < K; ++c) {
    const T* wrow = j.w + c * ld + c0;
    for (int64_t r = 0; r < rows; ++r) {
      const float a = xm[r * K + c];
      if (IsKept(a)) AxpyT(acc[r], a, wrow, width);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* yr = j.y + (r0 + r) * ld + c0;
    for (int64_t c = 0; c < width; ++c) FromFloat(acc[r][c], yr + c);
  }
}

// ---- prefill path: packed, register-blocked dense GEMM of mask(X), checked afterwards ------------
// With a finite W, multiplying a masked (zero) x by its row of W adds exactly 0, so the masked product
// equals a dense GEMM of mask(X) with W. With an Inf/NaN weight it does not (0 * Inf = NaN, where the
// contract skips the row), but such a weight then makes its whole column of the dense result non-finite:
// a finite result is exact. So each task flags a non-finite output, and a flagged product is recomputed
// by the exact row-skipping tasks (also when the Inf/NaN is legitimate: a kept Inf in X, an overflow).
// This replaces a scan of all of W before every call.
constexpr int64_t kDenseRows = 256;  // rows per task (one packed W panel serves all of them)
constexpr int64_t kDenseCols = 128;  // columns per task
constexpr int64_t kDenseDepth = 256;  // K slice packed at a time (8 strips x 256 x 16 floats = 128 KB)
constexpr int64_t kStrip = kPanelStrip;  // columns per micro tile

template <typename T>
void DenseTask(void* data, size_t task) {
  auto& j = *static_cast<Job<T>*>(data);
  const int64_t M = j.M, K = j.K, N = j.N, ld = j.ld;
  const int64_t chunks = (N + kDenseCols - 1) / kDenseCols;
  const int64_t r0 = ((int64_t)task / chunks) * kDenseRows, c0 = ((int64_t)task % chunks) * kDenseCols;
  const int64_t rows = std::min(kDenseRows, M - r0), width = std::min(kDenseCols, N - c0);
  const int64_t strips = (width + kStrip - 1) / kStrip;
  thread_local std::vector<float> acc, panel, zeros;
  acc.assign((size_t)(kDenseRows * kDenseCols), 0.0f);
  panel.resize((size_t)(kDenseCols * kDenseDepth));
  if ((int64_t)zeros.size() < K) zeros.assign((size_t)K, 0.0f);
  for (int64_t kb = 0; kb < K; kb += kDenseDepth) {
    const int64_t depth = std::min(kDenseDepth, K - kb);
    for (int64_t st = 0; st < strips; ++st) {  // pack W[kb:kb+depth, c0:c0+width] as [strip][k][16], zero padded
      float* dst = panel.data() + st * depth * kStrip;
      const int64_t cs = c0 + st * kStrip, n = std::min(kStrip, c0 + width - cs);
      for (int64_t k = 0; k < depth; ++k) {
        const T* src = j.w + (kb + k) * ld + cs;
        for (int64_t c = 0; c < n; ++c) dst[k * kStrip + c] = ToFloat(src[c]);
        for (int64_t c = n; c < kStrip; ++c) dst[k * kStrip + c] = 0.0f;
      }
    }
    const float* a[kDenseRows];
    for (int64_t r = 0; r < rows; ++r) a[r] = j.xm + (r0 + r) * K + kb;
    PanelGemm(a, rows, panel.data(), strips, depth, zeros.data(), acc.data(), kDenseCols);
  }
  j.nonfinite[task] = StoreFinite(acc.data(), kDenseCols, rows, width, j.y + r0 * ld + c0, ld) ? 0 : 1;
}

template <typename T>
void RunTasks(bool par, ParallelFn parallel, void* ctx, void (*task_fn)(void*, size_t), size_t tasks, void* job) {
  if (par && tasks > 1) {
    parallel(ctx, task_fn, tasks, job);
  } else {
    for (size_t t = 0; t < tasks; ++t) task_fn(job, t);
  }
}

/// Decode (M <= kRowBlock): split-K over the channels kept by any row, whole-row W reads.
template <typename T>
void Decode(Job<T>& job, bool par, ParallelFn parallel, void* ctx) {
  std::vector<int32_t> kept_channels;
  kept_channels.reserve((size_t)job.K);
  for (int64_t c = 0; c < job.K; ++c) {
    bool any = false;
    for (int64_t m = 0; m < job.M; ++m) any |= IsKept(job.xm[(size_t)(m * job.K + c)]);
    if (any) kept_channels.push_back((int32_t)c);
  }
  const int64_t n_kept = (int64_t)kept_channels.size();
  const int64_t col_chunks = (job.N + kDecodeCols - 1) / kDecodeCols;
  const int64_t bytes = n_kept * job.N * (int64_t)sizeof(T);
  const int64_t splits =
      par ? std::max<int64_t>(1, std::min<int64_t>({kDecodeMaxSplits, n_kept, bytes / (kDecodeTaskBytes * col_chunks)})) : 1;
  std::vector<float> partial((size_t)(splits * job.M * job.N));
  DecodeJob<T> dj{job.w, job.y, job.M, job.K, job.N, job.ld, job.xm, kept_channels.data(), n_kept, splits, col_chunks, partial.data()};
  RunTasks<T>(par, parallel, ctx, &DecodeTask<T>, (size_t)(splits * col_chunks), &dj);
  RunTasks<T>(par && splits * job.M * job.N >= (1 << 16), parallel, ctx, &DecodeReduceTask<T>, (size_t)col_chunks, &dj);
}

/// Many rows: a dense, register-blocked product of the masked X (valid only for a finite W, see DenseTask)
/// unless so few entries are kept that skipping the masked rows of W is faster. Crossover measured on
/// 512 x 1536 -> 576 (Zen 5): ~96 % masked with the AVX-512 tile, 80-90 % with the AVX2 one.
template <typename T>
void Prefill(Job<T>& job, bool par, ParallelFn parallel, void* ctx) {
  int64_t total = 0;
  for (int64_t m = 0; m < job.M; ++m) total += job.kept[(size_t)m];
  const int64_t dense_ratio = CpuIsa() == Isa::kAvx512 ? 25 : 7;  // dense when more than 1/ratio of the entries are kept
  if (job.M >= 16 && total * dense_ratio > job.M * job.K) {
    const size_t tasks = (size_t)(((job.M + kDenseRows - 1) / kDenseRows) * ((job.N + kDenseCols - 1) / kDenseCols));
    std::vector<uint8_t> nonfinite(tasks, 0);
    job.nonfinite = nonfinite.data();
    RunTasks<T>(par, parallel, ctx, &DenseTask<T>, tasks, &job);
    job.nonfinite = nullptr;
    if (std::find(nonfinite.begin(), nonfinite.end(), 1) == nonfinite.end()) return;  // finite: exact
  }
  RunTasks<T>(par, parallel, ctx, &AccumulateTask<T>, (size_t)(((job.M + kRowBlock - 1) / kRowBlock) * job.chunks), &job);
}

}  // namespace

template <typename T>
void SparseMatMulCpu(const T* x, const T* w, T* y, const Problem& p, const std::vector<MemberRule>& rules,
                     const MemberSpans& spans, ParallelFn parallel, void* parallel_ctx) {
  if (p.M == 0 || p.N == 0) return;
  std::unique_ptr<float[]> xm(new float[(size_t)(p.M * p.K)]);  // every entry is written by MaskTask
  std::vector<int64_t> kept((size_t)p.M, 0);
  // Parallelism only pays when there is real work; small problems run inline.
  const bool par = parallel != nullptr && p.M * p.K * p.N >= (1 << 16);
  bool uniform = true;  // one mask for every member: one pass over all N columns
  for (const MemberRule& r : rules) uniform &= r.SameMask(rules[0]);
  const int passes = uniform ? 1 : spans.count();
  for (int g = 0; g < passes; ++g) {
    const int64_t c0 = uniform ? 0 : spans.begin[g], n = uniform ? p.N : spans.end[g] - spans.begin[g];
    Job<T> job{x, w + c0, y + c0, p.M, p.K, n, p.N, &rules[g], xm.get(), (n + kChunk - 1) / kChunk, kept.data()};
    RunTasks<T>(par && p.M > 1, parallel, parallel_ctx, &MaskTask<T>, (size_t)p.M, &job);
    if (p.M <= kRowBlock) {
      Decode(job, par, parallel, parallel_ctx);
    } else {
      Prefill(job, par, parallel, parallel_ctx);
    }
  }
}

template void SparseMatMulCpu<float>(const float*, const float*, float*, const Problem&, const std::vector<MemberRule>&,
                                     const MemberSpans&, ParallelFn, void*);
template void SparseMatMulCpu<uint16_t>(const uint16_t*, const uint16_t*, uint16_t*, const Problem&, const std::vector<MemberRule>&,
                                        const MemberSpans&, ParallelFn, void*);

}  // namespace acttail
