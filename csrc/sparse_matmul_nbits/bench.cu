// Standalone CUDA entry points of SparseMatMulNBits for benchmarks/kernel_bench_nbits.py (ctypes), built into
// libacttail_bench.so next to csrc/bench/harness.cu (`ACTTAIL_BENCH=1 bash scripts/build_ops.sh`), from the same
// cuda.cu as the op, outside ONNX Runtime, so that calls can be captured in CUDA graphs and run under
// compute-sanitizer. The variant switches (forced decode parameters, per-call scratch, no cuBLAS) live here.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "sparse_matmul_nbits/kernels/gemv_nblocks.cuh"
#include "sparse_matmul_nbits/op.h"

namespace {

int Report(const std::string& err, char* buf, int len) {
  if (err.empty()) return 0;
  if (buf != nullptr && len > 0) {
    std::strncpy(buf, err.c_str(), (size_t)len - 1);
    buf[len - 1] = '\0';
  }
  return 1;
}

/// One call as the op would make it (ctypes mirror: benchmarks/kernel_bench_nbits.py NBitsCall).
struct NBitsCall {
  int half;
  const void* x;
  const unsigned char* q;
  const void* scales;
  const void* offsets;
  const float* thresholds;
  long long threshold_count;
  const float* scale;
  long long scale_rows;
  void* y;
  void* workspace;
  void* stream;
  long long M, K, N, B;
  int topk;
  float ramp;
  int G;
  const long long* ends;  // G cumulative column ends (null: one member)
  const long long* ks;    // G values (topk)
  float density;          // threshold mode: the attribute density (< 0: not given)
  int swiglu;             // 1: x is [M, 2K] = [gate | up], the input silu(gate) * up (the op's activation "swiglu")
};

/// The variant of one call: 0 = the op's plan; otherwise the given fields override it.
struct NBitsVariant {
  int cols_per_lane;   // 0: the op's choice
  int blocks_per_sm;   // 0: the op's choice
  int use_cublas;      // -1: the op's choice (cuBLAS unless ACTTAIL_CUBLAS=0), 0 / 1: force
  int stream_scratch;  // -1: the op's choice (per-stream scratch), 0: per-call scratch zeroed with a memset
  int prefetch;        // -1: the op's choice; 0: none; 1: the L2 prefetch of each warp's rows; 2 / 3: early prefetch 1 / 2
  int stage;           // -1: the op's choice, 0 / 1: force the shared-memory staging of rows (one row of X)
  int kernel;          // -1: the op's choice, 0: stream-K GEMV, 1: cluster GEMV (one row of X, sm_90+), 2: stream-K with tensor cores, 3: stream-K with the one-row loop, 4: the one-row loop software-pipelined
  int splits;          // <= 0: the op's choice; cluster GEMV: blocks per tile
  int chunk_kb;        // prefill: -1 / 0: the op's choice, -2: all of W at once, > 0: chunks of W of at most this many KiB
  int chunk_cols;      // prefill: <= 0: the op's choice, > 0: columns per chunk
  int fused_select;    // top-k decode: -1: the op's choice (ACTTAIL_FUSED_SELECT=1: in the GEMV blocks), 0: the selection kernel first, 1: in the GEMV blocks
};

/// The op's plan with a variant's fields applied (null: the op's own plan).
acttail::nbits::CudaPlan VariantPlan(const acttail::nbits::Problem& p, bool half, const NBitsVariant* variant) {
  acttail::nbits::CudaPlan plan = acttail::nbits::DefaultPlan(p, half);
  if (variant == nullptr) return plan;
  if (variant->cols_per_lane != 0) plan.decode.cols_per_lane = variant->cols_per_lane;
  if (variant->blocks_per_sm != 0) plan.decode.blocks_per_sm = variant->blocks_per_sm;
  if (variant->use_cublas >= 0) plan.use_cublas = variant->use_cublas != 0;
  if (variant->stream_scratch >= 0) plan.stream_scratch = variant->stream_scratch != 0;
  // prefetch 0 / 1: no early prefetch, the per-warp one off / on; 2 / 3: no per-warp prefetch, the early one (before the
  // wait on the previous kernel) of the scales / of the scales and rows
  if (variant->prefetch >= 0) {
    plan.decode.prefetch = variant->prefetch == 1 ? 1 : 0;
    plan.decode.early = variant->prefetch >= 2 ? variant->prefetch - 1 : 0;
  }
  if (variant->stage >= 0) plan.decode.stage = variant->stage;
  if (variant->kernel >= 0) plan.decode.kernel = variant->kernel;
  if (variant->splits > 0) plan.decode.splits = variant->splits;
  if (variant->chunk_kb == -2) plan.prefill_chunk_bytes = -1;
  if (variant->chunk_kb > 0) plan.prefill_chunk_bytes = (int64_t)variant->chunk_kb * 1024;
  if (variant->chunk_cols > 0) plan.prefill_chunk_cols = variant->chunk_cols;
  if (variant->fused_select >= 0) plan.self_select = variant->fused_select != 0;
  return plan;
}

void ToProblem(const NBitsCall& c, acttail::nbits::Problem& p, acttail::nbits::CudaArgs& a) {
  p.M = c.M;
  p.K = c.K;
  p.N = c.N;
  p.B = c.B;
  p.blocks = (c.K + c.B - 1) / c.B;
  p.threshold_count = c.topk ? 0 : c.threshold_count;
  p.scale_rows = c.scale != nullptr ? c.scale_rows : 0;
  p.density = c.density;
  const int G = c.G < 1 ? 1 : c.G;
  long long prev = 0;
  for (int g = 0; g < G; ++g) {
    p.spans.begin.push_back(prev);
    p.spans.end.push_back(c.ends != nullptr ? c.ends[g] : c.N);
    prev = p.spans.end.back();
    a.ks.push_back(c.ks != nullptr ? c.ks[g] : 0);
  }
  a.x = c.x;
  a.q = c.q;
  a.scales = c.scales;
  a.offsets = c.offsets;
  a.thresholds = c.topk ? nullptr : c.thresholds;
  a.scale = c.scale;
  a.y = c.y;
  a.workspace = c.workspace;
  a.stream = c.stream;
  a.mode = c.topk ? acttail::Mode::kTopK : acttail::Mode::kThreshold;
  a.ramp = c.ramp;
  a.swiglu = c.swiglu != 0;
}

}  // namespace

/// Device workspace the op would allocate for this call under the variant (bytes; null: the op's own plan).
extern "C" __attribute__((visibility("default"))) long long acttail_nbits_bench_workspace_bytes(const NBitsCall* call,
                                                                                               const NBitsVariant* variant) {
  acttail::nbits::Problem p;
  acttail::nbits::CudaArgs a;
  ToProblem(*call, p, a);
  return (long long)acttail::nbits::CudaWorkspaceBytes(p, a, VariantPlan(p, call->half != 0, variant), call->half != 0);
}

/// The op's CUDA path with an optional variant (null: the op's own plan).
extern "C" __attribute__((visibility("default"))) int acttail_nbits_bench_run(const NBitsCall* call, const NBitsVariant* variant, char* err,
                                                                             int err_len) {
  acttail::nbits::Problem p;
  acttail::nbits::CudaArgs a;
  ToProblem(*call, p, a);
  return Report(acttail::nbits::CudaRun(call->half != 0, p, a, VariantPlan(p, call->half != 0, variant)), err, err_len);
}

/// The blocks-along-N prototype decode GEMV (kernels/gemv_nblocks.cuh): one float16 row x [K], threshold t, Q uint8
/// [K, N/2], pairs half2 [K, ceil(N/B)], y float16 [N]. scratch: float32 [N], counters: uint32 [ceil(N / (32 * 16))],
/// both zero before the first call and left zero by every call. cols_per_lane 16 or 32; unroll 4 or 8 (pooled rows
/// whose loads a warp issues before using them); splits <= 0: about two blocks per SM. Returns 0, or 1 with the
/// message in err.
extern "C" __attribute__((visibility("default"))) int acttail_nblocks_bench_run(const void* x, float threshold, const void* q,
                                                                               const void* pairs, long long K, long long N,
                                                                               long long B, int cols_per_lane, int unroll, int splits,
                                                                               void* scratch, void* counters, void* y,
                                                                               void* stream, char* err, int err_len) {
  namespace nb = acttail::nbits::nblocks;
  const int cpl = cols_per_lane;
  if ((cpl != 16 && cpl != 32) || (unroll != 4 && unroll != 8) || N <= 0 || K <= 0 || B <= 0 || N % cpl != 0 || B % cpl != 0 ||
      K > (1LL << 30) || N > (1LL << 30))
    return Report("nblocks: needs cols_per_lane 16 or 32 dividing N and B (B > 0), unroll 4 or 8, K and N in 1..2^30", err, err_len);
  // the vector loads: a lane's CPL / 2 code bytes (rows of N / 2 bytes keep the alignment of Q), a 4-byte pair
  if (reinterpret_cast<uintptr_t>(q) % (cpl / 2) != 0 || reinterpret_cast<uintptr_t>(pairs) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(x) % 2 != 0 || reinterpret_cast<uintptr_t>(y) % 2 != 0)
    return Report("nblocks: Q must be aligned to cols_per_lane / 2 bytes, the pairs to 4, x and y to 2", err, err_len);
  int device = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess || sms <= 0)
    return Report(std::string("nblocks: CUDA error: ") + (e != cudaSuccess ? cudaGetErrorString(e) : "no multiprocessors"), err, err_len);
  const long long tiles = (N + 32LL * cpl - 1) / (32LL * cpl);
  long long s = splits > 0 ? splits : (2LL * sms + tiles - 1) / tiles;
  long long rows = (K + s - 1) / s;
  if (rows > nb::kMaxRows) rows = nb::kMaxRows;
  s = (K + rows - 1) / rows;
  const dim3 grid((unsigned)tiles, (unsigned)s);
  auto* st = static_cast<cudaStream_t>(stream);
  const auto* xp = static_cast<const __half*>(x);
  const auto* qp = static_cast<const uint8_t*>(q);
  const auto* pp = static_cast<const __half2*>(pairs);
  auto* sp = static_cast<float*>(scratch);
  auto* cp = static_cast<unsigned*>(counters);
  auto* yp = static_cast<__half*>(y);
  auto kernel = cpl == 32 ? (unroll == 8 ? nb::NBlocksGemvKernel<32, 8> : nb::NBlocksGemvKernel<32, 4>)
                          : (unroll == 8 ? nb::NBlocksGemvKernel<16, 8> : nb::NBlocksGemvKernel<16, 4>);
  kernel<<<grid, nb::kThreads, 0, st>>>(xp, threshold, qp, pp, (int)K, (int)N, (int)B, (int)rows, sp, cp, yp);
  e = cudaGetLastError();
  return Report(e == cudaSuccess ? std::string() : std::string("nblocks: CUDA error: ") + cudaGetErrorString(e), err, err_len);
}
