// Standalone CUDA entry points for benchmarks/kernel_bench.py, scripts/check_cuda_kernels.py and
// benchmarks/prefill_check.py (ctypes), built from the same sources as the op library's CUDA side but
// outside ONNX Runtime, so that launches can be captured in CUDA graphs and run under compute-sanitizer.
// Build: `ACTTAIL_BENCH=1 bash scripts/build_ops.sh` (CMake target acttail_bench: $ACTTAIL_BUILD_DIR/libacttail_bench.so).
// The variant switches (forced GEMV parameters, per-call scratch, no cuBLAS) live here, not in the op.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "common/cuda/dependent_launch.cuh"
#include "common/cuda/topk_select.cuh"
#include "sparse_matmul/cuda.h"

namespace {
int Report(const std::string& err, char* buf, int len) {
  if (err.empty()) return 0;
  if (buf != nullptr && len > 0) {
    std::strncpy(buf, err.c_str(), (size_t)len - 1);
    buf[len - 1] = '\0';
  }
  return 1;
}

/// Harness call: members, thresholds, scale and ramp as the op would pass them (G <= kMaxMembers).
struct BenchCall {
  int half;
  const void* x;
  const void* w;
  void* y;
  const float* thresholds;
  long long threshold_count;
  const float* scale;
  long long scale_rows;
  void* workspace;
  void* stream;
  long long M, K, N;
  int topk;
  float ramp;
  int G;
  const long long* ends;  // G cumulative column ends (null: one member)
  const long long* ks;    // G values (topk)
};

acttail::CudaArgs ToArgs(const BenchCall& c) {
  acttail::CudaArgs a;
  a.x = c.x;
  a.w = c.w;
  a.y = c.y;
  a.thresholds = c.thresholds;
  a.threshold_count = c.threshold_count;
  a.scale = c.scale;
  a.scale_rows = c.scale_rows;
  a.workspace = c.workspace;
  a.stream = c.stream;
  a.M = c.M;
  a.K = c.K;
  a.N = c.N;
  a.mode = c.topk ? acttail::Mode::kTopK : acttail::Mode::kThreshold;
  a.ramp = c.ramp;
  a.G = c.G < 1 ? 1 : c.G;
  long long prev = 0;
  for (int g = 0; g < a.G && g < acttail::kMaxMembers; ++g) {
    a.begin[g] = prev;
    a.end[g] = c.ends != nullptr ? c.ends[g] : c.N;
    a.k[g] = c.ks != nullptr ? c.ks[g] : 0;
    prev = a.end[g];
  }
  return a;
}
}  // namespace

/// Device workspace the op would allocate for this call (bytes).
extern "C" __attribute__((visibility("default"))) long long acttail_bench_workspace_bytes(const BenchCall* call) {
  const acttail::CudaArgs a = ToArgs(*call);
  acttail::CudaPlan plan = acttail::DefaultPlan(call->half != 0, a);
  plan.fuse_prefill = true;  // the larger workspace, whatever ACTTAIL_PREFILL_FUSE says when the call runs
  return (long long)acttail::CudaWorkspaceBytes(a, plan);
}

/// The op's CUDA path. `variant`: 0 = the op's own plan (per-shape table, cuBLAS); 1 = per-call scratch zeroed
/// with cudaMemsetAsync; 2 / 3 = force the plain / pooled decode grid; 4 = prefill without cuBLAS (the op's own
/// GEMM kernels); 5 = the GEMV parameters given in `gemv` (warps, seg, unroll, chunks, pooled).
extern "C" __attribute__((visibility("default"))) int acttail_bench_sparse_matmul(const BenchCall* call, int variant, const int* gemv,
                                                                                 char* err, int err_len) {
  const acttail::CudaArgs a = ToArgs(*call);
  acttail::CudaPlan plan = acttail::DefaultPlan(call->half != 0, a);
  if (variant == 1) plan.stream_scratch = false;
  if (variant == 2 || variant == 3) plan.gemv.pooled = variant == 3 ? 1 : 0;
  if (variant == 4) plan.use_cublas = false;
  if (variant == 5 && gemv != nullptr) plan.gemv = acttail::GemvConfig{gemv[0], gemv[1], gemv[2], gemv[3], gemv[4]};
  return Report(acttail::SparseMatMulCuda(call->half != 0, a, plan), err, err_len);
}

/// Only the top-k selection kernel (to time the selection cost separately), one member, no scale.
extern "C" __attribute__((visibility("default"))) int acttail_bench_topk_select(int half, const void* x, void* sel, void* stream,
                                                                               long long M, long long K, long long k, char* err,
                                                                               int err_len) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  acttail::cuda::SelectParams p;
  p.K = (int)K;
  p.k[0] = (int)k;
  cudaError_t e = half ? acttail::cuda::LaunchTopKSelect(static_cast<const __half*>(x), M, p, static_cast<uint2*>(sel), s)
                       : acttail::cuda::LaunchTopKSelect(static_cast<const float*>(x), M, p, static_cast<uint2*>(sel), s);
  return Report(e == cudaSuccess ? "" : cudaGetErrorString(e), err, err_len);
}

namespace {
/// One block of 256 threads per row of x: the decode GEMV's in-block selection (BlockSelectHalf, as its SELF kernels
/// call it) of each row into sel[row]; with swiglu x is [M, 2K] = [gate | up].
__global__ void __launch_bounds__(256) BlockSelectKernel(const __half* __restrict__ x, int K, int k, int swiglu, int64_t row_stride,
                                                         uint2* __restrict__ sel) {
  __shared__ acttail::cuda::BlockSelectShared sh;
  const uint2 r = acttail::cuda::BlockSelectHalf<256, acttail::cuda::kBlockSelectPerThread>(x + blockIdx.x * row_stride, K, k, swiglu != 0, sh);
  if (threadIdx.x == 0) sel[blockIdx.x] = r;
}
}  // namespace

/// The in-block selection alone (float16 rows of K channels, row_stride elements apart), to check it against the selection
/// kernel (acttail_bench_topk_select) exactly.
extern "C" __attribute__((visibility("default"))) int acttail_bench_block_select(const void* x, void* sel, void* stream, long long M,
                                                                                long long K, long long k, int swiglu,
                                                                                long long row_stride, char* err, int err_len) {
  if (K < 1 || K > 256LL * acttail::cuda::kBlockSelectPerThread) return Report("K outside the in-block selection's range", err, err_len);
  if (M < 1 || M > 65535) return Report("M must be in [1, 65535]", err, err_len);
  BlockSelectKernel<<<(unsigned)M, 256, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const __half*>(x), (int)K, (int)k, swiglu,
                                                                                  (int64_t)row_stride, static_cast<uint2*>(sel));
  const cudaError_t e = cudaGetLastError();
  return Report(e == cudaSuccess ? "" : cudaGetErrorString(e), err, err_len);
}

/// The activation kernel of the op's top-k paths: out [M, K] = silu(gate) * up of float16 x [M, 2K].
extern "C" __attribute__((visibility("default"))) int acttail_bench_swiglu(const void* x, void* out, void* stream, long long M, long long K,
                                                                          char* err, int err_len) {
  const cudaError_t e = acttail::cuda::LaunchSwiGlu<__half>(static_cast<const __half*>(x), static_cast<__half*>(out), M, K,
                                                            static_cast<cudaStream_t>(stream));
  return Report(e == cudaSuccess ? "" : cudaGetErrorString(e), err, err_len);
}

namespace {
/// Streams `n` 16-byte words (evict-first loads, 8 in flight per thread) and folds them into one word
/// per block, so nothing is optimized away: the floor for reading that many bytes once. kWait 0: a plain launch;
/// launched as a programmatic dependent, kWait 1 waits (griddepcontrol.wait) before the reads, as a GEMV must wait
/// before it reads X, and kWait 2 after them, before the sink's write, as a kernel that fetched constant weights ahead
/// of its input could; either lets the next floor start at once (launch_dependents).
template <int kWait>
__global__ void __launch_bounds__(512) ReadFloorKernel(const uint4* __restrict__ p, long long n, unsigned* __restrict__ sink) {
  if (kWait == 1) acttail::cuda::GridDependencyWait();
  if (kWait != 0) acttail::cuda::GridLaunchDependents();
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 7 * stride < n; i += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (kWait == 2) acttail::cuda::GridDependencyWait();
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if ((threadIdx.x & 31) == 0) atomicXor(sink + blockIdx.x % 64, acc);
}

/// The decode GEMV's access pattern without its arithmetic: the (tile, row) units of `tiles` column tiles over K rows cut
/// into gridDim.x contiguous ranges as the stream-K grid does, warp w of a block streaming the w-th eighth of its range,
/// 8 rows in flight per lane, one 256-byte piece per unit (8 bytes per lane). Piece (t, k) lies at t * tile_stride +
/// k * row_stride: row_stride = the bytes of a row of Q (the op's layout, a tile's rows one Q row apart) or 256 (a
/// tile's rows contiguous). A row k is read when its hash is below `keep` / 256 (the same rows in every tile).
__global__ void __launch_bounds__(256) TiledFloorKernel(const uint8_t* __restrict__ p, int K, int units, long long row_stride,
                                                        long long tile_stride, int keep, unsigned* __restrict__ sink) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int u0 = (int)((long long)blockIdx.x * units / gridDim.x), u1 = (int)((long long)(blockIdx.x + 1) * units / gridDim.x);
  const int w0 = u0 + warp * (u1 - u0) / 8, w1 = u0 + (warp + 1) * (u1 - u0) / 8;
  unsigned acc = 0;
  for (int u = w0; u < w1; u += 8) {
    uint2 v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[i] = make_uint2(0u, 0u);
      const int uu = u + i, t = uu / K, k = uu - t * K;
      if (uu < w1 && (int)(((unsigned)k * 2654435761u) >> 24) < keep)
        v[i] = __ldcs(reinterpret_cast<const uint2*>(p + t * tile_stride + k * row_stride + lane * 8));
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) acc ^= v[i].x ^ v[i].y;
  }
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if (lane == 0) atomicXor(sink + blockIdx.x % 64, acc);
}
}  // namespace

/// Read `bytes` (multiple of 16) from `p` once, the bandwidth floor the GEMV kernels are compared with: launched plainly
/// (mode 0) or as a programmatic dependent that waits before (1) or after (2) its reads
/// (benchmarks/device/decode_floor_graph.py); where the device or the build has no dependent launch, plainly.
extern "C" __attribute__((visibility("default"))) int acttail_bench_read_floor_launch(const void* p, long long bytes, void* sink, int blocks,
                                                                                     int mode, void* stream, char* err, int err_len) {
  if (mode < 0 || mode > 2) return Report("mode must be 0 (plain), 1 (dependent, wait first) or 2 (dependent, read first)", err, err_len);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const uint4* q = static_cast<const uint4*>(p);
  unsigned* k = static_cast<unsigned*>(sink);
  cudaError_t e;
  if (mode == 0) {
    ReadFloorKernel<0><<<blocks, 512, 0, s>>>(q, bytes / 16, k);
    e = cudaGetLastError();
  } else if (mode == 1) {
    e = acttail::cuda::LaunchDependent(true, ReadFloorKernel<1>, dim3(blocks), dim3(512), 0, s, q, bytes / 16, k);
  } else {
    e = acttail::cuda::LaunchDependent(true, ReadFloorKernel<2>, dim3(blocks), dim3(512), 0, s, q, bytes / 16, k);
  }
  return Report(e == cudaSuccess ? "" : cudaGetErrorString(e), err, err_len);
}

/// The plain read (acttail_bench_read_floor_launch, mode 0).
extern "C" __attribute__((visibility("default"))) int acttail_bench_read_floor(const void* p, long long bytes, void* sink, int blocks,
                                                                              void* stream, char* err, int err_len) {
  return acttail_bench_read_floor_launch(p, bytes, sink, blocks, 0, stream, err, err_len);
}

/// The decode GEMV's reads alone (TiledFloorKernel) for the layout experiment of docs/kernels.md.
extern "C" __attribute__((visibility("default"))) int acttail_bench_tiled_floor(const void* p, int K, int tiles, long long row_stride,
                                                                               long long tile_stride, int keep, void* sink, int blocks,
                                                                               void* stream, char* err, int err_len) {
  TiledFloorKernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const uint8_t*>(p), K, K * tiles, row_stride,
                                                                          tile_stride, keep, static_cast<unsigned*>(sink));
  const cudaError_t e = cudaGetLastError();
  return Report(e == cudaSuccess ? "" : cudaGetErrorString(e), err, err_len);
}
