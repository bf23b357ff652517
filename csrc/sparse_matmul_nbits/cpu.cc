// CPU kernel of com.acttail::SparseMatMulNBits (reference quality, multithreaded on ONNX Runtime's pool).
//  1. Per rule group (one when every member has the same rule, else one per member) and row: the masked row
//     (common/mask.h MaskRowCpu: kept values x * f, -0.0f for a kept 0, +0.0f for dropped channels).
//  2. Tasks (split of the quant blocks, member column chunk, block of 8 rows): for each quant block, every
//     kept row of Q is unpacked once into floats and added into each row's block sum
//     accq[m] += v * q (and sv[m] += v); at the end of the block acc[m] += s * accq[m] + o * sv[m],
//     only for rows that kept a channel of that block. Decode (M <= 8) splits K into up to 16 parts
//     (partial sums added at the end) so that all threads stream Q.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/float16.h"
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
  int64_t splits = 1, row_blocks = 1;
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
template <typename T>
void AccumulateTask(void* data, size_t task) {
  auto& j = *static_cast<Job<T>*>(data);
  if (CpuIsa() >= Isa::kAvx2) {
    AccumulateAvx2(j, task);
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
