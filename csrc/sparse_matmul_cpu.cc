// CPU kernel of com.acttail::SparseMatMul: per row, select the kept channels, then accumulate only
// the kept rows of W into a float32 accumulator (column-chunked, parallel over rows x chunks).
#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "sparse_matmul.h"

namespace acttail {

Problem CheckShapes(const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape, const std::string& node) {
  const std::string where = "SparseMatMul node '" + node + "': ";
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
inline uint32_t Key(float v) { return MagnitudeKey(v); }
inline uint32_t Key(uint16_t v) { return MagnitudeKey16(v); }

// acc[0:n] += a * w[0:n]; cloned for AVX2+FMA where the CPU has it.
__attribute__((target_clones("arch=haswell", "default"))) void Axpy(float* __restrict acc, float a, const float* __restrict w,
                                                                        int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += a * w[j];
}
__attribute__((target_clones("arch=haswell", "default"))) void AxpyHalf(float* __restrict acc, float a,
                                                                            const uint16_t* __restrict w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += a * HalfToFloat(w[j]);
}
inline void AxpyT(float* acc, float a, const float* w, int64_t n) { Axpy(acc, a, w, n); }
inline void AxpyT(float* acc, float a, const uint16_t* w, int64_t n) { AxpyHalf(acc, a, w, n); }

template <typename T>
struct Job {
  const T* x;
  const T* w;
  T* y;
  const Problem* p;
  Mode mode;
  float threshold;
  int64_t k;
  std::vector<int32_t>* idx;     // [M, K] kept channel indices (first count[m] valid)
  std::vector<float>* val;       // [M, K] kept values as float
  std::vector<int64_t>* count;   // [M]
  int64_t chunks;                // column chunks per row
};

template <typename T>
void SelectRow(void* data, size_t m) {
  auto& j = *static_cast<Job<T>*>(data);
  const int64_t K = j.p->K;
  const T* xr = j.x + m * K;
  int32_t* idx = j.idx->data() + m * K;
  float* val = j.val->data() + m * K;
  int64_t n = 0;
  if (j.mode == Mode::kThreshold) {
    for (int64_t c = 0; c < K; ++c) {
      float v = ToFloat(xr[c]);
      if (std::fabs(v) > j.threshold && v != 0.0f) { idx[n] = (int32_t)c; val[n] = v; ++n; }  // zeros never multiplied
    }
  } else if (j.k > 0) {
    std::vector<uint32_t> keys(K);
    for (int64_t c = 0; c < K; ++c) keys[c] = Key(xr[c]);
    std::vector<uint32_t> sorted(keys);
    std::nth_element(sorted.begin(), sorted.begin() + (j.k - 1), sorted.end(), std::greater<uint32_t>());
    const uint32_t kth = sorted[j.k - 1];
    int64_t greater = 0;
    for (int64_t c = 0; c < K; ++c) greater += keys[c] > kth;
    int64_t ties = kth == 0 ? 0 : j.k - greater;  // key 0 = zero or NaN: never kept
    for (int64_t c = 0; c < K; ++c) {
      bool keep = keys[c] > kth || (keys[c] == kth && ties > 0 && (--ties, true));
      if (keep) { idx[n] = (int32_t)c; val[n] = ToFloat(xr[c]); ++n; }
    }
  }
  (*j.count)[m] = n;
}

template <typename T>
void AccumulateTask(void* data, size_t task) {
  auto& j = *static_cast<Job<T>*>(data);
  const int64_t K = j.p->K, N = j.p->N;
  const int64_t m = (int64_t)task / j.chunks, c0 = ((int64_t)task % j.chunks) * kChunk;
  const int64_t width = std::min(kChunk, N - c0);
  float acc[kChunk];
  std::fill(acc, acc + width, 0.0f);
  const int32_t* idx = j.idx->data() + m * K;
  const float* val = j.val->data() + m * K;
  const int64_t n = (*j.count)[m];
  for (int64_t i = 0; i < n; ++i) AxpyT(acc, val[i], j.w + (int64_t)idx[i] * N + c0, width);
  T* yr = j.y + m * N + c0;
  for (int64_t c = 0; c < width; ++c) FromFloat(acc[c], yr + c);
}

}  // namespace

template <typename T>
void SparseMatMulCpu(const T* x, const T* w, T* y, const Problem& p, Mode mode, float threshold, int64_t k,
                     ParallelFn parallel, void* parallel_ctx) {
  if (p.M == 0 || p.N == 0) return;
  std::vector<int32_t> idx((size_t)(p.M * p.K));
  std::vector<float> val((size_t)(p.M * p.K));
  std::vector<int64_t> count((size_t)p.M, 0);
  Job<T> job{x, w, y, &p, mode, threshold, k, &idx, &val, &count, (p.N + kChunk - 1) / kChunk};
  const size_t tasks = (size_t)(p.M * job.chunks);
  // Parallelism only pays when there is real work; small problems run inline.
  const bool par = parallel != nullptr && p.M * p.K * p.N >= (1 << 16);
  if (par && p.M > 1) {
    parallel(parallel_ctx, &SelectRow<T>, (size_t)p.M, &job);
  } else {
    for (int64_t m = 0; m < p.M; ++m) SelectRow<T>(&job, (size_t)m);
  }
  if (par && tasks > 1) {
    parallel(parallel_ctx, &AccumulateTask<T>, tasks, &job);
  } else {
    for (size_t t = 0; t < tasks; ++t) AccumulateTask<T>(&job, t);
  }
}

template void SparseMatMulCpu<float>(const float*, const float*, float*, const Problem&, Mode, float, int64_t, ParallelFn, void*);
template void SparseMatMulCpu<uint16_t>(const uint16_t*, const uint16_t*, uint16_t*, const Problem&, Mode, float, int64_t,
                                        ParallelFn, void*);

}  // namespace acttail
