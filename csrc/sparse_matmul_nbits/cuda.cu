// Host launchers of the SparseMatMulNBits CUDA kernels (kernels/*.cuh). Everything is enqueued on the
// caller's stream, no host synchronization, every launch checked.
//  * topk: the common top-k selection (common/cuda/topk_select.cuh) per (row, selection group) -> (cut, tie).
//  * decode, one row on sm_90+: NBitsClusterGemvKernel (split-K over a thread-block cluster, no scratch);
//  * decode (M <= 8, and the rest): NBitsGemvKernel in split (stream-K) mode over a per-stream float32 scratch
//    that every launch leaves zero; kernel parameters per shape (ChooseDecode); one row with an expected kept
//    fraction >= kOneRowMinDensity (top-k's k, or the density attribute): the one-row loop (float16: its
//    software-pipelined form, StreamRowsPipe).
//  * prefill (M > 8): PrefillPrepKernel (mask X into the workspace, dequantize W transposed into the workspace,
//    flag Inf/NaN in W; optionally chunk by chunk), cuBLAS GEMM per member column slice with W as op T (both
//    operands K-major; libcublas opened at run time), then the exact kernel (FULL mode), which returns at once
//    unless the flag is set. Without cuBLAS: the exact kernel.
#include <dlfcn.h>
#include <library_types.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "common/cuda/flag_check.cuh"
#include "common/cuda/stream_capture.h"
#include "common/env.h"
#include "common/cuda/topk_select.cuh"
#include "sparse_matmul_nbits/kernels/gemv.cuh"
#include "sparse_matmul_nbits/kernels/gemv_cluster.cuh"
#include "sparse_matmul_nbits/kernels/prefill.cuh"
#include "sparse_matmul_nbits/op.h"

namespace acttail {
namespace nbits {

namespace {

using ::acttail::cuda::DeviceMask;
using ::acttail::cuda::SelectParams;

constexpr int kWarps = 8;
/// Rows of Q in flight per warp: 8 (4 with 4 or 8 rows of X, whose accumulators need the registers).
constexpr int RowsInFlight(int mr) { return mr >= 4 ? 4 : 8; }
constexpr size_t kAlign = 256;
size_t Up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int CurrentSms() {
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  if (cache[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 1;
    cache[dev] = sms;
  }
  return cache[dev];
}

// ---- per-stream scratch (zeroed once, left zero by every kernel) ---------------------------------
/// Zeroed scratch of at least `bytes` owned by (device, stream); every launch leaves it zero again, so only
/// its allocation is zeroed (stream-ordered). Null if it would have to grow while the stream is being
/// captured into a CUDA graph (the caller then zeroes per-call workspace). Grown-out buffers are kept:
/// a graph captured earlier may still replay into them.
void* StreamScratch(cudaStream_t stream, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, std::pair<void*, size_t>> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  auto& entry = cache[{dev, stream}];
  if (entry.second >= bytes) return entry.first;
  if (::acttail::cuda::StreamCapturing(stream)) return nullptr;
  const size_t want = std::max({bytes, 2 * entry.second, (size_t)1 << 20});
  void* p = nullptr;
  if (cudaMallocAsync(&p, want, stream) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  if (cudaMemsetAsync(p, 0, want, stream) != cudaSuccess) {
    cudaGetLastError();
    cudaFreeAsync(p, stream);
    return nullptr;
  }
  entry = {p, want};
  return p;
}

/// Scratch layout: [flag, done] (256 B), arrival counters [tiles], float32 accumulator [M, N].
size_t ScratchBytes(int64_t M, int64_t N, int64_t tiles) { return kAlign + Up((size_t)tiles * 4) + (size_t)(M * N * 4); }

// ---- cuBLAS, opened at run time (ONNX Runtime's CUDA EP has loaded it already) --------------------
using cublasHandle_t = void*;
constexpr int kCublasOpN = 0, kCublasOpT = 1, kCublasCompute32F = 68, kCublasGemmDefault = -1;
constexpr int kCublasSoMajor = CUDART_VERSION / 1000;

struct CublasApi {
  using CreateFn = int (*)(cublasHandle_t*);
  using SetStreamFn = int (*)(cublasHandle_t, cudaStream_t);
  using GemmExFn = int (*)(cublasHandle_t, int, int, int, int, int, const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                           int, const void*, void*, cudaDataType, int, int, int);
  // cublasGemmStridedBatchedEx: as GemmEx with a long long stride after each of A, B, C and the batch count before the
  // compute type
  using GemmBatchedFn = int (*)(cublasHandle_t, int, int, int, int, int, const void*, const void*, cudaDataType, int, long long, const void*,
                                cudaDataType, int, long long, const void*, void*, cudaDataType, int, long long, int, int, int);
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  GemmBatchedFn gemm_batched = nullptr;  // optional: without it the members' GEMMs run one by one
  bool ok = false;
};

const CublasApi& Cublas() {
  static const CublasApi api = [] {
    CublasApi a;
    void* lib = dlopen(("libcublas.so." + std::to_string(kCublasSoMajor)).c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return a;
    a.create = reinterpret_cast<CublasApi::CreateFn>(dlsym(lib, "cublasCreate_v2"));
    a.set_stream = reinterpret_cast<CublasApi::SetStreamFn>(dlsym(lib, "cublasSetStream_v2"));
    a.gemm_ex = reinterpret_cast<CublasApi::GemmExFn>(dlsym(lib, "cublasGemmEx"));
    a.gemm_batched = reinterpret_cast<CublasApi::GemmBatchedFn>(dlsym(lib, "cublasGemmStridedBatchedEx"));
    a.ok = a.create != nullptr && a.set_stream != nullptr && a.gemm_ex != nullptr;
    return a;
  }();
  return api;
}

std::mutex& CublasMutex() {
  static std::mutex mu;
  return mu;
}

/// Handle of (device, stream), created at first use; null without cuBLAS (not loadable, or the stream is being
/// captured before a handle exists).
cublasHandle_t CublasHandle(cudaStream_t stream) {
  const CublasApi& api = Cublas();
  if (!api.ok) return nullptr;
  static std::map<std::pair<int, cudaStream_t>, cublasHandle_t> handles;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(CublasMutex());
  auto it = handles.find({dev, stream});
  if (it != handles.end()) return it->second;
  if (::acttail::cuda::StreamCapturing(stream)) return nullptr;
  cublasHandle_t h = nullptr;
  if (api.create(&h) != 0) return nullptr;
  if (api.set_stream(h, stream) != 0) return nullptr;
  handles.emplace(std::make_pair(dev, stream), h);
  return h;
}

/// C[M, n] (ld ldc, type ct) = xm [M, K] (ld ldx) @ W[K, n] + beta * C, W given transposed (wt [n, K], ld ldw: both
/// operands K-major); A / B of type ab, float32 accumulation.
std::string Gemm(cublasHandle_t h, cudaDataType ab, const void* xm, int64_t ldx, const void* wt, int64_t ldw, void* c, cudaDataType ct,
                 int64_t ldc, int64_t M, int64_t K, int64_t n, float beta) {
  const float alpha = 1.0f;
  std::lock_guard<std::mutex> lock(CublasMutex());
  const int st = Cublas().gemm_ex(h, kCublasOpT, kCublasOpN, (int)n, (int)M, (int)K, &alpha, wt, ab, (int)ldw, xm, ab, (int)ldx, &beta, c, ct,
                                  (int)ldc, kCublasCompute32F, kCublasGemmDefault);
  return st == 0 ? "" : "cublasGemmEx failed with status " + std::to_string(st);
}

/// Gemm for `batch` members at once: member g's masked X at xm + g * sx, its columns of W at wt + g * sw (transposed,
/// ld ldw), its output at c + g * n (ld ldc), all n columns wide; beta 0.
std::string GemmBatched(cublasHandle_t h, cudaDataType ab, const void* xm, int64_t ldx, int64_t sx, const void* wt, int64_t ldw, int64_t sw,
                        void* c, cudaDataType ct, int64_t ldc, int64_t M, int64_t K, int64_t n, int batch) {
  const float alpha = 1.0f, beta = 0.0f;
  std::lock_guard<std::mutex> lock(CublasMutex());
  const int st = Cublas().gemm_batched(h, kCublasOpT, kCublasOpN, (int)n, (int)M, (int)K, &alpha, wt, ab, (int)ldw, (long long)sw, xm, ab,
                                       (int)ldx, (long long)sx, &beta, c, ct, (int)ldc, (long long)n, batch, kCublasCompute32F,
                                       kCublasGemmDefault);
  return st == 0 ? "" : "cublasGemmStridedBatchedEx failed with status " + std::to_string(st);
}

// ---- kernel configuration -------------------------------------------------------------------------
struct KernelShape {
  int mr, cpl;
  bool mma = false;  // one float16 row: the tensor-core row loop (16 columns per virtual lane)
};

/// Rows of X per kernel instance and columns per lane: MR * CPL * 2 float accumulators per thread stay <= 64.
KernelShape DecodeShape(int64_t M, bool half, int cols_per_lane) {
  const int mr = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
  if (mr == 1) return {1, half && cols_per_lane == 32 ? 32 : 16};
  if (mr == 2 || (mr == 4 && half)) return {mr, 8};  // DispatchDecode instantiates exactly these
  return {mr, 4};
}

/// Decode parameters per shape: (K, N) -> columns per lane, blocks per SM, L2 prefetch, staged rows for one float16
/// row (H200 sweep, docs/results/kernels/nbits_sweep_h200.json: register loads with 16 columns per lane win on every
/// listed shape; the shared-memory staging is 1-13 % slower at 0 % and within 2 % at 90 %); other shapes and row
/// counts: the same, 3 blocks per SM capped by occupancy.
DecodeConfig ChooseDecode(const Problem& p, bool half) {
  struct Entry {
    int64_t K, N;
    DecodeConfig c;
  };
  static const Entry kTable[] = {
      {4096, 4096, {16, 3, 0, 0}}, {4096, 11008, {16, 3, 0, 0}}, {11008, 4096, {16, 3, 0, 0}}, {4096, 14336, {16, 3, 0, 0}},
      {14336, 4096, {16, 3, 0, 0}},
  };
  DecodeConfig c{16, 3, 0, 0};
  if (half && p.M == 1)
    for (const Entry& e : kTable)
      if (e.K == p.K && e.N == p.N) c = e.c;
  return c;
}

/// Member tiles for `cpl` columns per lane; fills args (when given) and returns the tile count.
int Tiles(const MemberSpans& spans, int cpl, cuda::GemvArgs* args) {
  int t = 0;
  for (int g = 0; g < spans.count(); ++g) {
    const int64_t lo = spans.begin[(size_t)g], hi = spans.end[(size_t)g];
    const int64_t lg0 = lo / cpl, lg1 = (hi + cpl - 1) / cpl;
    if (args != nullptr) {
      args->begin[g] = (int)lo;
      args->end[g] = (int)hi;
      args->lg0[g] = (int)lg0;
      args->tile0[g] = t;
    }
    t += (int)((lg1 - lg0 + 31) / 32);
  }
  if (args != nullptr) {
    args->tile0[spans.count()] = t;
    args->G = spans.count();
    args->tiles = t;
  }
  return t;
}

template <typename K>
int Occupancy(K kernel, int smem) {
  int n = 0;
  if (smem > 48 * 1024 && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
    cudaGetLastError();
    return 0;  // the launch would fail: LaunchGemv reports it
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kWarps * 32, smem) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  return std::max(1, n);
}

template <typename T, int MR, int CPL, bool FULL, bool STAGE = false, bool MMA = false, bool ONE = false, bool PIPE = false, bool SELF = false>
cudaError_t LaunchGemv(const cuda::GemvArgs& args, int blocks_per_sm, int64_t max_blocks, cudaStream_t stream) {
  constexpr int kMinBlocks = CPL == 32 ? 1 : 2;
  constexpr int kSmem = STAGE ? cuda::StageBytes<CPL, kWarps>() : 0;
  // STAGE: fallback with fewer registers
  auto kernel = cuda::NBitsGemvKernel<T, MR, CPL, kWarps, STAGE ? 4 : RowsInFlight(MR), FULL, kMinBlocks, STAGE, MMA, ONE, PIPE, SELF>;
  static const int occupancy = Occupancy(kernel, kSmem);  // also raises the kernel's dynamic shared memory limit
  if (occupancy == 0) return cudaErrorInvalidConfiguration;
  int64_t grid = std::max<int64_t>(1, std::min<int64_t>((int64_t)CurrentSms() * std::min(blocks_per_sm, occupancy), max_blocks));
  if (!FULL) {
    // A multiple of the tile count keeps every block's range inside one tile (a block spanning two tiles runs two
    // latency chains back to back, which sets the time at high sparsity); used when within 10 % of the target.
    const int64_t aligned = grid / args.tiles * args.tiles;
    if (aligned >= args.tiles && aligned * 10 >= grid * 9) grid = aligned;
  }
  // split mode as a programmatic dependent (args.early: what it prefetches before the wait); FULL mode plain
  return cuda::LaunchDependent(!FULL && args.pdl, kernel, dim3((unsigned)grid), dim3(kWarps * 32), kSmem, stream, args);
}

/// What the current device offers, read once per device: compute capability major and thread-block cluster launch
/// (both 0 when the device or its attributes cannot be read).
struct DeviceCaps {
  int major = 0;
  bool cluster = false;
};
DeviceCaps CurrentCaps() {
  static std::mutex mu;
  static std::map<int, DeviceCaps> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  int major = 0, cluster = 0;
  const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, dev) == cudaSuccess;
  if (!ok) cudaGetLastError();
  DeviceCaps caps;
  if (ok) caps = {major, cluster != 0};
  cache[dev] = caps;
  return caps;
}

/// Tensor cores (mma.sync m16n8k16, compute capability 8.0+) on the current device.
bool MmaLaunchable() { return CurrentCaps().major >= 8; }

/// The decode instance for M rows (float32 and float16 share all but the 32-column and the MMA ones).
template <typename T>
cudaError_t DispatchDecode(const KernelShape& s, const cuda::GemvArgs& args, int bps, int64_t max_blocks, cudaStream_t stream) {
  constexpr bool kHalf = std::is_same<T, __half>::value;
  if (args.self_select) {  // SelfSelect() admits exactly these: one float16 row, 16 columns per lane, no staging / MMA
    if constexpr (kHalf) {
      if (s.mr == 1 && s.cpl == 16 && !s.mma && !args.stage) {
        if (args.one && args.pipe) return LaunchGemv<T, 1, 16, false, false, false, true, true, true>(args, bps, max_blocks, stream);
        if (args.one) return LaunchGemv<T, 1, 16, false, false, false, true, false, true>(args, bps, max_blocks, stream);
        return LaunchGemv<T, 1, 16, false, false, false, false, false, true>(args, bps, max_blocks, stream);
      }
    }
    return cudaErrorInvalidConfiguration;
  }
  if (s.mr == 1) {
    if constexpr (kHalf) {
      if (s.mma) return LaunchGemv<T, 1, 16, false, false, true>(args, bps, max_blocks, stream);
      if (args.one && args.pipe && s.cpl == 32) return LaunchGemv<T, 1, 32, false, false, false, true, true>(args, bps, max_blocks, stream);
      if (args.one && s.cpl == 32) return LaunchGemv<T, 1, 32, false, false, false, true>(args, bps, max_blocks, stream);
      if (s.cpl == 32) {
        return args.stage ? LaunchGemv<T, 1, 32, false, true>(args, bps, max_blocks, stream)
                          : LaunchGemv<T, 1, 32, false>(args, bps, max_blocks, stream);
      }
    }
    if (args.one && args.pipe) return LaunchGemv<T, 1, 16, false, false, false, true, true>(args, bps, max_blocks, stream);
    if (args.one) return LaunchGemv<T, 1, 16, false, false, false, true>(args, bps, max_blocks, stream);
    return args.stage ? LaunchGemv<T, 1, 16, false, true>(args, bps, max_blocks, stream)
                      : LaunchGemv<T, 1, 16, false>(args, bps, max_blocks, stream);
  }
  if (s.mr == 2) return LaunchGemv<T, 2, 8, false>(args, bps, max_blocks, stream);
  if (s.mr == 4) return LaunchGemv<T, 4, kHalf ? 8 : 4, false>(args, bps, max_blocks, stream);
  return LaunchGemv<T, 8, 4, false>(args, bps, max_blocks, stream);
}

/// Thread-block clusters on the current device (compute capability 9.0+).
bool ClusterLaunchable() {
  const DeviceCaps caps = CurrentCaps();
  return caps.major >= 9 && caps.cluster;
}

constexpr int kMaxSplits = 16;  // non-portable cluster size (H100 / H200); 8 is portable

/// Blocks per tile of the cluster GEMV: about blocks_per_sm blocks per SM in all, at most one group per warp less
/// than the groups, within the cluster limit.
int ClusterSplits(int64_t K, int tiles, int blocks_per_sm, int forced) {
  const int64_t groups = (K + cuda::kGroupRows - 1) / cuda::kGroupRows;
  int64_t s = forced > 0 ? forced : ((int64_t)CurrentSms() * blocks_per_sm + tiles / 2) / std::max(1, tiles);
  s = std::min<int64_t>(s, (groups + kWarps - 1) / kWarps);  // every warp gets a group
  return (int)std::max<int64_t>(1, std::min<int64_t>(s, kMaxSplits));
}

template <typename T, int CPL>
cudaError_t LaunchCluster(const cuda::GemvArgs& args, int splits, cudaStream_t stream) {
  auto kernel = cuda::NBitsClusterGemvKernel<T, CPL, kWarps>;
  static const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (attr != cudaSuccess && splits > 8) return attr;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)splits, (unsigned)args.tiles, 1);
  cfg.blockDim = dim3(kWarps * 32, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = (unsigned)splits;
  at[0].val.clusterDim.y = 1;
  at[0].val.clusterDim.z = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args);
  return err != cudaSuccess ? err : cudaGetLastError();
}

/// The cluster GEMV for one row of X (columns per lane 4, 8 or 16).
template <typename T>
std::string RunClusterDecode(const Problem& p, const DecodeConfig& cfg, cuda::GemvArgs& g, cudaStream_t stream) {
  const int cpl = cfg.cols_per_lane == 4 || cfg.cols_per_lane == 16 ? cfg.cols_per_lane : 8;
  const int tiles = Tiles(p.spans, cpl, &g);
  if (tiles > 65535) return "cluster GEMV: too many column tiles";
  const int splits = ClusterSplits(p.K, tiles, std::max(1, cfg.blocks_per_sm), cfg.splits);
  const cudaError_t err = cpl == 4    ? LaunchCluster<T, 4>(g, splits, stream)
                          : cpl == 16 ? LaunchCluster<T, 16>(g, splits, stream)
                                      : LaunchCluster<T, 8>(g, splits, stream);
  return err == cudaSuccess ? "" : std::string("cluster GEMV kernel: ") + cudaGetErrorString(err);
}

/// Members sharing one selection (topk: same k and the same scale row) select once per row.
int SelectGroups(const Problem& p, const CudaArgs& c) {
  if (p.spans.count() == 1 || p.scale_rows > 1) return p.spans.count();
  for (int64_t k : c.ks)
    if (k != c.ks[0]) return p.spans.count();
  return 1;
}
/// Copies of mask(X) the prefill needs: one per member unless every member has the same rule.
int MaskGroups(const Problem& p, const CudaArgs& c) {
  if (c.mode == Mode::kTopK) return SelectGroups(p, c);
  return p.threshold_count > 1 || p.scale_rows > 1 ? p.spans.count() : 1;
}

DeviceMask MakeMask(const Problem& p, const CudaArgs& c, const uint2* sel, bool half) {
  DeviceMask dm;
  dm.topk = c.mode == Mode::kTopK;
  dm.half_keys = half && c.scale == nullptr;  // as LaunchTopKSelect chooses its keys
  dm.ramp = c.ramp;
  dm.thr = c.thresholds;
  dm.thr_stride = p.threshold_count > 1 ? 1 : 0;
  dm.scale = c.scale;
  dm.scale_stride = p.scale_rows > 1 ? p.K : 0;
  dm.sel = sel;
  dm.sel_members = SelectGroups(p, c);
  return dm;
}

/// With activation "swiglu" the stream-K decode GEMV (threshold mode, M <= 8) computes silu(gate) * up as it reads x;
/// the other paths (top-k selection, prefill) read x more than once and get it written into the workspace first.
bool InlineActivation(const Problem& p, const CudaArgs& c) { return p.M <= 8 && c.mode == Mode::kThreshold; }
size_t ActivationBytes(const Problem& p, const CudaArgs& c, bool half) {
  return c.swiglu && !InlineActivation(p, c) ? Up((size_t)(p.M * p.K) * (half ? 2 : 4)) : 0;
}

size_t SelectBytes(const Problem& p, const CudaArgs& c) {
  return c.mode == Mode::kTopK ? Up((size_t)(p.M * SelectGroups(p, c)) * sizeof(uint2)) : 0;
}
int64_t MaxTiles(const Problem& p) { return Tiles(p.spans, 4, nullptr); }  // 4 columns per lane: the most tiles
/// The prefill's chunks of W: `cols` columns x `rows` rows dequantized at a time (the whole W when it fits the plan's
/// budget); with rows < K the GEMMs of a column chunk add up in a float32 buffer [M, cols].
struct PrefillChunks {
  int64_t cols, rows;
};
PrefillChunks ChoosePrefillChunks(const Problem& p, const CudaPlan& plan, size_t e) {
  const int64_t budget = plan.prefill_chunk_bytes;
  if (budget <= 0 || p.K * p.N * (int64_t)e <= budget) return {p.N, p.K};
  int64_t cols = plan.prefill_chunk_cols > 0 ? plan.prefill_chunk_cols : 4096;
  cols = std::min<int64_t>(p.N, (cols + 15) / 16 * 16);
  // rows: a multiple of 32 (8-row dequantization items never straddle a quant block, B >= 16), at least 32
  const int64_t rows = std::min<int64_t>(p.K, std::max<int64_t>(32, budget / (cols * (int64_t)e) / 32 * 32));
  return {cols, rows};
}
size_t PrefillBytes(const Problem& p, const CudaArgs& c, const CudaPlan& plan, bool half) {
  const size_t e = half ? 2 : 4;
  const PrefillChunks ch = ChoosePrefillChunks(p, plan, e);
  const size_t acc = half && ch.rows < p.K ? Up((size_t)(p.M * ch.cols) * 4) : 0;
  return Up((size_t)(MaskGroups(p, c) * p.M * p.K) * e) + Up((size_t)(ch.rows * ch.cols) * e) + acc;
}

/// Zeroed scratch: the per-stream one, else the per-call workspace zeroed now (during CUDA graph capture, or
/// when the plan says so).
char* Scratch(cudaStream_t stream, size_t bytes, char* per_call, bool stream_scratch, cudaError_t* err) {
  void* s = stream_scratch ? StreamScratch(stream, bytes) : nullptr;
  if (s != nullptr) return static_cast<char*>(s);
  *err = cudaMemsetAsync(per_call, 0, bytes, stream);
  return per_call;
}

/// Expected fraction of kept input channels over the columns: top-k's k per member, else the density attribute
/// (-1 when not given).
float ExpectedDensity(const Problem& p, const CudaArgs& c) {
  if (c.mode != Mode::kTopK) return p.density;
  if (p.K == 0 || p.N == 0) return -1.0f;
  double kept = 0.0;
  for (int g = 0; g < p.spans.count(); ++g)
    kept += (double)c.ks[(size_t)g] * (double)(p.spans.end[(size_t)g] - p.spans.begin[(size_t)g]);
  return (float)(kept / ((double)p.K * (double)p.N));
}

/// The stream-K decode GEMV (M <= 8).
/// The decode parameters of a call: the per-shape table, the plan's overrides, then the density dispatch.
DecodeConfig ResolvedDecode(const Problem& p, const CudaArgs& c, const CudaPlan& plan, bool half) {
  DecodeConfig cfg = ChooseDecode(p, half);
  if (plan.decode.cols_per_lane != 0) cfg.cols_per_lane = plan.decode.cols_per_lane;
  if (plan.decode.blocks_per_sm != 0) cfg.blocks_per_sm = plan.decode.blocks_per_sm;
  if (plan.decode.prefetch >= 0) cfg.prefetch = plan.decode.prefetch;
  if (plan.decode.stage >= 0) cfg.stage = plan.decode.stage;
  if (plan.decode.kernel >= 0) cfg.kernel = plan.decode.kernel;
  if (plan.decode.splits > 0) cfg.splits = plan.decode.splits;
  if (plan.decode.early >= 0) cfg.early = plan.decode.early;
  if (plan.decode.pdl >= 0) cfg.pdl = plan.decode.pdl;
  // most rows kept: the one-row loop, software-pipelined in float16 (kernel 4; its float32 instance spills: kernel 3)
  if (cfg.kernel < 0 && ExpectedDensity(p, c) >= kOneRowMinDensity) cfg.kernel = half ? 4 : 3;
  return cfg;
}

/// Top-k decode with the selection inside the GEMV (plan.self_select): one float16 row, no score scale, K within
/// BlockSelectHalf's registers, and a decode config (cfg: ResolvedDecode) with a SELF instance (stream-K or one-row
/// loops, 16 columns per lane, register loads); otherwise the selection kernel runs first.
bool SelfSelect(const Problem& p, const CudaArgs& c, const CudaPlan& plan, const DecodeConfig& cfg, bool half) {
  if (!plan.self_select || !half || c.mode != Mode::kTopK || p.M != 1 || c.scale != nullptr) return false;
  if (p.K > (int64_t)kWarps * 32 * cuda::kBlockSelectPerThread) return false;
  return cfg.kernel != 1 && cfg.kernel != 2 && cfg.cols_per_lane != 32 && cfg.stage <= 0;
}

template <typename T>
std::string RunDecode(const Problem& p, const CudaArgs& c, const CudaPlan& plan, const DecodeConfig& cfg, cuda::GemvArgs& g, char* ws) {
  cudaStream_t stream = static_cast<cudaStream_t>(c.stream);
  const bool half = std::is_same<T, __half>::value;
  // one row, B >= 32 (a group of 32 rows inside one quant block), the vector layout, clusters on the device
  // (not with an inline activation: the cluster kernel reads x as the op's input)
  if (cfg.kernel == 1 && p.M == 1 && p.B >= cuda::kGroupRows && g.fast && !g.swiglu && ClusterLaunchable()) return RunClusterDecode<T>(p, cfg, g, stream);
  // the tensor-core row loop: one float16 row, the vector layout (8-byte row pieces, 16-byte scale loads), sm_80+
  const bool mma = cfg.kernel == 2 && half && p.M == 1 && g.fast && MmaLaunchable();
  // the one-row loop (StreamRowsOne): one row, the vector layout, 32-bit row offsets in Q
  // (kernel 4: the same loop software-pipelined, StreamRowsPipe)
  g.one = (cfg.kernel == 3 || cfg.kernel == 4) && p.M == 1 && g.fast && (int64_t)p.K * g.rowbytes <= (int64_t)UINT32_MAX;
  g.pipe = g.one && cfg.kernel == 4;
  g.prefetch = cfg.prefetch > 0;
  g.early = std::max(0, std::min(2, cfg.early));
  g.pdl = cfg.pdl > 0;  // LaunchDependent checks the device and the compiled kernel
  g.stage = p.M == 1 && cfg.stage > 0 && g.fast && !mma && !g.one;  // the staged kernel needs 16-byte row pieces
  KernelShape s = DecodeShape(p.M, half, mma ? 16 : cfg.cols_per_lane);
  s.mma = mma;
  const int tiles = Tiles(p.spans, s.cpl, &g);
  g.units = (long long)tiles * p.K;
  cudaError_t err = cudaSuccess;
  char* scratch = Scratch(stream, ScratchBytes(p.M, p.N, tiles), ws, plan.stream_scratch, &err);
  if (err != cudaSuccess) return std::string("scratch memset: ") + cudaGetErrorString(err);
  g.counters = reinterpret_cast<unsigned*>(scratch + kAlign);
  g.acc = reinterpret_cast<float*>(scratch + kAlign + Up((size_t)tiles * 4));
  // at least 32 rows per block, so that a block's fixed costs stay small against its rows
  err = DispatchDecode<T>(s, g, cfg.blocks_per_sm, std::max<int64_t>(1, g.units / 32), stream);
  return err == cudaSuccess ? "" : std::string("decode GEMV kernel: ") + cudaGetErrorString(err);
}

/// Prefill (M > 8): mask + dequantize into the workspace, cuBLAS per member, the exact kernel armed by Inf/NaN
/// in the dequantized W; without cuBLAS the exact kernel alone.
template <typename T>
std::string RunPrefill(const Problem& p, const CudaArgs& c, const CudaPlan& plan, cuda::GemvArgs& g, char* ws) {
  cudaStream_t stream = static_cast<cudaStream_t>(c.stream);
  const bool half = std::is_same<T, __half>::value;
  const int tiles = Tiles(p.spans, 4, &g);  // the exact kernel: 8 rows of X, 4 columns per lane
  g.row_groups = (int)((p.M + 7) / 8);
  const int64_t items = (int64_t)tiles * g.row_groups;
  cudaError_t err;
  void* handle = plan.use_cublas ? CublasHandle(stream) : nullptr;
  if (handle == nullptr) {
    err = LaunchGemv<T, 8, 4, true>(g, 4, items, stream);  // the exact kernel does the work: 4 blocks per SM
    return err == cudaSuccess ? "" : std::string("prefill kernel: ") + cudaGetErrorString(err);
  }
  const size_t e = half ? 2 : 4;
  const int groups = MaskGroups(p, c);
  const PrefillChunks ch = ChoosePrefillChunks(p, plan, e);
  char* xm = ws;
  char* w = ws + Up((size_t)(groups * p.M * p.K) * e);
  // several row chunks add up in float32: in acc [M, ch.cols] for float16, in Y itself for float
  const bool to_acc = half && ch.rows < p.K;
  float* acc = reinterpret_cast<float*>(w + Up((size_t)(ch.rows * ch.cols) * e));
  err = cudaSuccess;
  char* scratch = Scratch(stream, kAlign, ws + PrefillBytes(p, c, plan, half), plan.stream_scratch, &err);
  if (err != cudaSuccess) return std::string("scratch memset: ") + cudaGetErrorString(err);
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  cuda::PrepArgs pa{};
  pa.x = c.x;
  pa.M = (int)p.M;
  pa.K = (int)p.K;
  pa.N = (int)p.N;
  pa.rowbytes = g.rowbytes;
  pa.blog2 = g.blog2;
  pa.dm = g.dm;
  pa.groups = groups;
  pa.xm = xm;
  pa.q = c.q;
  pa.scales = c.scales;
  pa.offsets = c.offsets;
  pa.w = w;
  pa.ldw = (int)ch.rows;  // W transposed: [cols, rows] per chunk
  pa.flag = reinterpret_cast<unsigned*>(scratch);
  pa.fast_w = p.N % 8 == 0 && ch.rows % 8 == 0 && aligned(c.q) && aligned(c.scales) && aligned(c.offsets) && aligned(w);
  pa.fast_x = p.K % 8 == 0 && aligned(c.x) && aligned(xm);
  pa.swiglu = c.swiglu ? 1 : 0;  // x still [gate | up] (Run's act_in_mask): the mask items compute the input themselves
  const int64_t mask_items = groups * p.M * p.K / (pa.fast_x ? 8 : 1);
  const int64_t mask_blocks = std::max<int64_t>(1, std::min<int64_t>((mask_items + 255) / 256, (int64_t)CurrentSms() * 8));
  const cudaDataType ab = half ? CUDA_R_16F : CUDA_R_32F;
  // plan.fuse_prefill: one strided-batched GEMM for a mask group per member, equally wide and adjacent, W in one chunk
  const bool batched = plan.fuse_prefill && groups > 1 && groups == p.spans.count() && ch.rows >= p.K && ch.cols >= p.N &&
                       Cublas().gemm_batched != nullptr && p.spans.begin[0] == 0 &&
                       EqualAdjacentMembers(p.spans.begin.data(), p.spans.end.data(), groups);
  // Column chunks, row chunks inside (one chunk = all of W unless the plan sets a budget): the chunk buffer is rewritten
  // in place. Meant to keep the float16 W in L2 between the dequantization and the GEMM; measured slower than one
  // chunk on the H200 (docs/kernels.md), so the op's plan does not chunk.
  bool first = true;
  for (int64_t n0 = 0; n0 < p.N; n0 += ch.cols) {
    const int64_t n1 = std::min<int64_t>(p.N, n0 + ch.cols);
    for (int64_t k0 = 0; k0 < p.K; k0 += ch.rows) {
      const int64_t k1 = std::min<int64_t>(p.K, k0 + ch.rows);
      pa.k0 = (int)k0;
      pa.k1 = (int)k1;
      pa.n0 = (int)n0;
      pa.n1 = (int)n1;
      const int64_t dq_items = cuda::DequantItems((int)k0, (int)k1, (int)n0, (int)n1, pa.fast_w != 0);  // tiles, or elements
      pa.dq_blocks = (int)std::min<int64_t>(pa.fast_w ? dq_items : (dq_items + 255) / 256, (int64_t)CurrentSms() * 16);
      const int64_t blocks = pa.dq_blocks + (first ? mask_blocks : 0);  // mask(X) with the first chunk
      cuda::PrefillPrepKernel<T><<<(unsigned)blocks, cuda::kPrepThreads, 0, stream>>>(pa);
      err = cudaGetLastError();
      if (err != cudaSuccess) return std::string("prefill mask / dequantize kernel: ") + cudaGetErrorString(err);
      first = false;
      if (batched) {  // every member's columns in one chunk, equally wide: one strided-batched GEMM
        const int64_t n = p.spans.end[0] - p.spans.begin[0];
        const std::string gemm = GemmBatched(handle, ab, xm, p.K, p.M * p.K, w, ch.rows, n * ch.rows, c.y, ab, p.N, p.M, p.K, n, groups);
        if (!gemm.empty()) return "prefill GEMM: " + gemm;
        continue;
      }
      for (int gi = 0; gi < (groups == 1 ? 1 : p.spans.count()); ++gi) {
        const int64_t c0 = std::max<int64_t>(n0, groups == 1 ? 0 : p.spans.begin[(size_t)gi]);
        const int64_t c1 = std::min<int64_t>(n1, groups == 1 ? p.N : p.spans.end[(size_t)gi]);
        if (c0 >= c1) continue;
        const char* a = xm + (size_t)(gi * p.M * p.K + k0) * e;
        const char* b = w + (size_t)((c0 - n0) * ch.rows) * e;
        void* out = to_acc ? static_cast<void*>(acc + (c0 - n0)) : static_cast<void*>(static_cast<char*>(c.y) + (size_t)c0 * e);
        const std::string gemm = Gemm(handle, ab, a, p.K, b, ch.rows, out, to_acc ? CUDA_R_32F : ab, to_acc ? ch.cols : p.N, p.M, k1 - k0,
                                      c1 - c0, k0 == 0 ? 0.0f : 1.0f);
        if (!gemm.empty()) return "prefill GEMM: " + gemm;
      }
    }
    if (to_acc) {  // the column chunk's float32 sums into Y
      const int64_t total = p.M * (n1 - n0);
      const unsigned blocks = (unsigned)std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, (int64_t)CurrentSms() * 8));
      cuda::StoreChunkKernel<T><<<blocks, 256, 0, stream>>>(acc, (int)ch.cols, static_cast<T*>(c.y) + n0, (int)p.N, (int)p.M,
                                                             (int)(n1 - n0));
      err = cudaGetLastError();
      if (err != cudaSuccess) return std::string("prefill store kernel: ") + cudaGetErrorString(err);
    }
  }
  if (plan.w_finite) return "";  // no Inf/NaN in the dequantized W: the flag stays 0, the exact kernel would return at once
  g.run_if = reinterpret_cast<unsigned*>(scratch);
  g.done = reinterpret_cast<unsigned*>(scratch) + 1;
  err = LaunchGemv<T, 8, 4, true>(g, 1, items, stream);  // usually returns at once: one block per SM is the cheapest launch
  return err == cudaSuccess ? "" : std::string("prefill exact kernel: ") + cudaGetErrorString(err);
}

template <typename T>
std::string Run(const Problem& p, const CudaArgs& args, const CudaPlan& plan) {
  cudaStream_t stream = static_cast<cudaStream_t>(args.stream);
  if (p.M == 0 || p.N == 0) return "";
  if (p.M > (int64_t)INT32_MAX / 2 || p.M * p.K > ((int64_t)1 << 46)) return "problem too large for the kernels' indexing";
  cudaError_t err;
  if (p.K == 0) {
    err = cudaMemsetAsync(args.y, 0, (size_t)(p.M * p.N) * sizeof(T), stream);
    return err == cudaSuccess ? "" : std::string("zero output: ") + cudaGetErrorString(err);
  }
  const bool half = std::is_same<T, __half>::value;
  char* ws = static_cast<char*>(args.workspace);
  CudaArgs c = args;
  // the prefill's mask pass reads [gate | up] itself: threshold mode (top-k's selection reads x first), cuBLAS, a W
  // checked finite (so that the exact kernel, which reads [gate | up] through SwiGluAt as the decode loop does, is not
  // launched: that prefill path of it is not tested with the activation)
  const bool act_in_mask = c.swiglu && p.M > 8 && c.mode == Mode::kThreshold && plan.w_finite && plan.use_cublas && plan.fuse_prefill &&
                           CublasHandle(stream) != nullptr;
  // top-k decode with the selection in the GEMV blocks, which also compute a SwiGLU input inline
  const DecodeConfig cfg = p.M <= 8 ? ResolvedDecode(p, c, plan, half) : DecodeConfig{};  // decode only
  const bool self_select = SelfSelect(p, c, plan, cfg, half);
  if (c.swiglu && !InlineActivation(p, c) && !act_in_mask && !self_select) {  // x := silu(gate) * up, [M, K] in the workspace
    T* act = reinterpret_cast<T*>(ws);
    err = ::acttail::cuda::LaunchSwiGlu<T>(static_cast<const T*>(c.x), act, p.M, p.K, stream);
    if (err != cudaSuccess) return std::string("activation kernel: ") + cudaGetErrorString(err);
    c.x = act;
    c.swiglu = false;
    ws += ActivationBytes(p, args, half);
  }
  const uint2* sel = nullptr;
  if (c.mode == Mode::kTopK && !self_select) {
    SelectParams s;
    s.K = (int)p.K;
    s.members = SelectGroups(p, c);
    for (int g = 0; g < s.members; ++g) s.k[g] = (int)c.ks[(size_t)g];
    s.scale = c.scale;
    s.scale_stride = p.scale_rows > 1 ? p.K : 0;
    uint2* out = reinterpret_cast<uint2*>(ws);
    err = ::acttail::cuda::LaunchTopKSelect<T>(static_cast<const T*>(c.x), p.M, s, out, stream);
    if (err != cudaSuccess) return std::string("top-k selection kernel: ") + cudaGetErrorString(err);
    sel = out;
    ws += SelectBytes(p, c);
  }
  cuda::GemvArgs g{};
  g.x = c.x;
  g.q = c.q;
  g.scales = c.scales;
  g.offsets = c.offsets;
  g.y = c.y;
  g.M = (int)p.M;
  g.K = (int)p.K;
  g.N = (int)p.N;
  g.rowbytes = (int)((p.N + 1) / 2);
  g.blog2 = __builtin_ctzll((unsigned long long)p.B);
  g.dm = MakeMask(p, c, sel, half);
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  g.fast = p.N % 32 == 0 && aligned(c.q) && aligned(c.scales) && aligned(c.offsets);
  g.swiglu = c.swiglu ? 1 : 0;
  g.self_select = self_select ? 1 : 0;
  if (self_select)
    for (int i = 0; i < g.dm.sel_members; ++i) g.sel_k[i] = (int)c.ks[(size_t)i];
  return p.M <= 8 ? RunDecode<T>(p, c, plan, cfg, g, ws) : RunPrefill<T>(p, c, plan, g, ws);
}

/// *flag = 1 when fl_T(s * q + o) is Inf or NaN for some q in [0, 15] of some of the n (scale, offset) pairs: s
/// non-finite, or one of the extremes q = 0, 15 (fmaf(s, q, o) is monotone in q) rounds to Inf / NaN in T.
template <typename T>
__global__ void __launch_bounds__(256) FlagNonFiniteDequantizedKernel(const T* __restrict__ scales, const T* __restrict__ offsets,
                                                                      int64_t n, unsigned* __restrict__ flag) {
  bool bad = false;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float s = cuda::Traits<T>::ToFloat(scales[i]), o = cuda::Traits<T>::ToFloat(offsets[i]);
    const float lo = cuda::Traits<T>::ToFloat(cuda::Traits<T>::FromFloat(o));
    const float hi = cuda::Traits<T>::ToFloat(cuda::Traits<T>::FromFloat(fmaf(s, 15.0f, o)));
    bad |= !isfinite(s) || !isfinite(lo) || !isfinite(hi);
  }
  if (bad) atomicOr(flag, 1u);
}

}  // namespace

size_t CudaWorkspaceBytes(const Problem& p, const CudaArgs& args, const CudaPlan& plan, bool half) {
  if (p.M == 0 || p.N == 0 || p.K == 0) return 0;
  // decode: room for the scratch in case the per-stream one cannot be used (during capture);
  // prefill: mask(X) per rule group, W dequantized, and the flag words
  const size_t run = p.M <= 8 ? ScratchBytes(p.M, p.N, MaxTiles(p)) : PrefillBytes(p, args, plan, half) + kAlign;
  return ActivationBytes(p, args, half) + SelectBytes(p, args) + run;
}

CudaPlan DefaultPlan(const Problem& p, bool half) {
  CudaPlan plan;
  plan.decode = ChooseDecode(p, half);
  plan.use_cublas = !EnvIs("ACTTAIL_CUBLAS", "0");  // the exact kernel for prefill (read per call, for tests)
  // the fused prefill, the default since measured on the H200 (docs/kernels.md); ACTTAIL_PREFILL_FUSE=0 turns it off
  // (read per call, for A/B runs and tests)
  plan.fuse_prefill = !EnvIs("ACTTAIL_PREFILL_FUSE", "0");
  // the decode GEMV as a programmatic dependent launch, and what it prefetches before its wait (read per call, for
  // A/B runs and tests: ACTTAIL_PDL=0, ACTTAIL_EARLY_PREFETCH=0 / 1 / 2)
  plan.decode.pdl = cuda::DependentLaunchWanted() ? 1 : 0;
  plan.decode.early = kEarlyPrefetch;
  // top-k decode: the selection inside the GEMV blocks, off: measured 1.17-1.44x slower per call than the selection
  // kernel first (docs/kernels.md; read per call, for A/B runs and tests: ACTTAIL_FUSED_SELECT=1)
  plan.self_select = EnvIs("ACTTAIL_FUSED_SELECT", "1");
  for (const char* v : {"0", "1", "2"})
    if (EnvIs("ACTTAIL_EARLY_PREFETCH", v)) plan.decode.early = v[0] - '0';
  return plan;
}

std::string NonFiniteDequantized(bool half, const void* scales, const void* offsets, int64_t count, bool* nonfinite) {
  *nonfinite = true;
  if (count <= 0) {
    *nonfinite = false;
    return "";
  }
  return cuda::RunFlagCheck(
      scales,
      [&](unsigned* flag, cudaStream_t stream) {
        const unsigned blocks = (unsigned)std::max<int64_t>(1, std::min<int64_t>((count + 255) / 256, (int64_t)CurrentSms() * 8));
        if (half)
          FlagNonFiniteDequantizedKernel<__half><<<blocks, 256, 0, stream>>>(static_cast<const __half*>(scales),
                                                                             static_cast<const __half*>(offsets), count, flag);
        else
          FlagNonFiniteDequantizedKernel<float><<<blocks, 256, 0, stream>>>(static_cast<const float*>(scales),
                                                                            static_cast<const float*>(offsets), count, flag);
        return cudaGetLastError();
      },
      nonfinite);
}

std::string CudaRun(bool half, const Problem& p, const CudaArgs& args, const CudaPlan& plan) {
  return half ? Run<__half>(p, args, plan) : Run<float>(p, args, plan);
}

}  // namespace nbits
}  // namespace acttail
