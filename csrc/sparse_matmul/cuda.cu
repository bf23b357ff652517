// Host launchers of SparseMatMul's CUDA kernels (kernels/*.cuh, common/cuda/*.cuh): split-K decode GEMV for M <= 8 rows;
// for more rows (prefill) the mask applied into the workspace and a cuBLAS GEMM (loaded at run time),
// else the masked tiled GEMM kernels; in topk mode preceded by the top-k selection kernel. Everything
// is enqueued on the caller's stream; no host synchronization, every launch checked.
#include <cublas_api.h>  // types and prototypes only: libcublas is opened at run time (dlopen), not linked
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "common/cuda/mask_rows.cuh"
#include "common/cuda/topk_select.cuh"
#include "sparse_matmul/cuda.h"
#include "sparse_matmul/kernels/masked_gemm.cuh"
#include "sparse_matmul/kernels/masked_gemm_tc.cuh"
#include "sparse_matmul/kernels/splitk_gemv.cuh"

namespace acttail {

namespace {

/// Multiprocessor count of the current device (cached per device).
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

// ---- split-K decode GEMV and its self-cleaning scratch -------------------------------------------

constexpr int64_t kMinTileCols = 128;  // smallest TN of any SplitKGemvKernel instance (float32, SEG 1)

/// Bytes of the split-K scratch for M rows and N columns: tile arrival counters, then the float32
/// accumulator [M, N].
int64_t CounterBytes(int64_t N) { return ((N + kMinTileCols - 1) / kMinTileCols * 4 + 255) / 256 * 256; }
size_t SplitScratchBytes(int64_t M, int64_t N) { return (size_t)(CounterBytes(N) + M * N * 4); }

/// Zeroed scratch of at least `bytes` owned by (device, stream); every split-K launch leaves it zero
/// again, so only its allocation is zeroed (cudaMemsetAsync, stream-ordered, no host sync). Returns
/// null if it would have to grow while the stream is being captured into a CUDA graph (the caller
/// then zeroes per-call scratch instead). Grown buffers are not freed: a graph captured earlier may
/// still replay into one, and each stays zero between launches.
void* StreamScratch(cudaStream_t stream, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, std::pair<void*, size_t>> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  auto& entry = cache[{dev, stream}];
  if (entry.second >= bytes) return entry.first;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess || status != cudaStreamCaptureStatusNone) return nullptr;
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

template <typename T, int MR, int WARPS, int SEG, int U, bool BAL>
cudaError_t LaunchSplitK(const CudaArgs& a, const uint2* sel, void* scratch, cudaStream_t stream) {
  constexpr int TN = 32 * SEG * cuda::Traits<T>::kVec;
  const bool w_aligned = reinterpret_cast<uintptr_t>(a.w) % 16 == 0 && (a.N * sizeof(T)) % 16 == 0;
  const int64_t splits = std::max<int64_t>(1, (a.K + WARPS * 32 - 1) / (WARPS * 32));  // K == 0: one split writes zeros
  const dim3 grid((unsigned)((a.N + TN - 1) / TN), (unsigned)splits);
  if (splits > 65535) return cudaErrorInvalidConfiguration;
  unsigned* arrived = static_cast<unsigned*>(scratch);
  float* acc = reinterpret_cast<float*>(static_cast<char*>(scratch) + CounterBytes(a.N));
  cuda::SplitKGemvKernel<T, MR, WARPS, SEG, U, BAL><<<grid, WARPS * 32, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.w), static_cast<T*>(a.y), (int)a.M, (int)a.K, (int)a.N, a.thresholds, sel,
      a.mode == Mode::kTopK, w_aligned, acc, arrived);
  return cudaGetLastError();
}

/// Decode GEMV (M <= 8): split-K over 8-warp blocks (256 channels each), 4 rows in flight per warp.
/// Grids of fewer than 3 blocks per multiprocessor pool each block's kept channels first (BAL): with few
/// blocks the slowest warp sets the time (LLaMA-7B 4096x4096 at 50-80 %: 9.0 vs 9.8 us, 5.8 vs 6.7 us on
/// H200), with many the extra block barrier costs more than it saves (11008x4096 at 50 %: 18.0 vs 14.7 us);
/// docs/kernels.md. The plan may force the grid (pooled 0 / 1) or per-call scratch zeroed with cudaMemsetAsync.
template <typename T, int MR>
cudaError_t LaunchDecode(const CudaArgs& a, const CudaPlan& plan, const uint2* sel, void* per_call_scratch, cudaStream_t stream) {
  const size_t bytes = SplitScratchBytes(a.M, a.N);
  void* scratch = plan.stream_scratch ? StreamScratch(stream, bytes) : nullptr;
  if (scratch == nullptr) {
    scratch = per_call_scratch;
    cudaError_t err = cudaMemsetAsync(scratch, 0, bytes, stream);
    if (err != cudaSuccess) return err;
  }
  constexpr int kWarps = 8, kRows = 4;
  constexpr int TN = 32 * cuda::Traits<T>::kVec;
  const int64_t blocks = (a.N + TN - 1) / TN * std::max<int64_t>(1, (a.K + kWarps * 32 - 1) / (kWarps * 32));
  const bool pooled = plan.gemv.pooled == 1 || (plan.gemv.pooled != 0 && blocks < 3 * (int64_t)CurrentSms());
  return pooled ? LaunchSplitK<T, MR, kWarps, 1, kRows, true>(a, sel, scratch, stream)
                : LaunchSplitK<T, MR, kWarps, 1, kRows, false>(a, sel, scratch, stream);
}

// ---- prefill through cuBLAS ---------------------------------------------------------------------
// The library does not link cuBLAS: it opens libcublas.so.<major of the cuBLAS it was built with> at
// the first prefill call (ONNX Runtime's CUDA execution provider has loaded it already) and keeps one
// handle per (device, stream). When it cannot (no libcublas, ACTTAIL_CUBLAS=0, or a stream being
// captured into a CUDA graph before a handle exists), the prefill runs on the op's own GEMM kernels.

constexpr int kCublasSoMajor = CUDART_VERSION / 1000;  // cuBLAS of the CUDA release the library is built with

// cublasGemmEx with a cublasComputeType_t (the header also declares an inline overload taking a cudaDataType)
using CublasGemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                          const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                                          cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
static_assert(sizeof(static_cast<CublasGemmExFn>(&cublasGemmEx)) > 0, "the cuBLAS header declares cublasGemmEx so");

struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  CublasGemmExFn gemm_ex = nullptr;
  bool ok = false;
};

const CublasApi& Cublas() {
  static const CublasApi api = [] {
    CublasApi a;
    void* lib = dlopen(("libcublas.so." + std::to_string(kCublasSoMajor)).c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return a;
    a.create = reinterpret_cast<decltype(&cublasCreate_v2)>(dlsym(lib, "cublasCreate_v2"));
    a.set_stream = reinterpret_cast<decltype(&cublasSetStream_v2)>(dlsym(lib, "cublasSetStream_v2"));
    a.gemm_ex = reinterpret_cast<CublasGemmExFn>(dlsym(lib, "cublasGemmEx"));
    a.ok = a.create != nullptr && a.set_stream != nullptr && a.gemm_ex != nullptr;
    return a;
  }();
  return api;
}

std::mutex& CublasMutex() {  // guards the handle cache and serializes enqueues on a shared handle
  static std::mutex mu;
  return mu;
}

/// The cuBLAS handle of (current device, stream), created at its first use; null when cuBLAS cannot be
/// used (ACTTAIL_CUBLAS=0, libcublas not loadable, or the stream is being captured before a handle exists).
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
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess || status != cudaStreamCaptureStatusNone) {
    cudaGetLastError();
    return nullptr;
  }
  cublasHandle_t h = nullptr;
  if (api.create(&h) != CUBLAS_STATUS_SUCCESS) return nullptr;
  if (api.set_stream(h, stream) != CUBLAS_STATUS_SUCCESS) return nullptr;  // (the handle leaks: a rare failure, not worth a destroy symbol)
  handles.emplace(std::make_pair(dev, stream), h);
  return h;
}

/// Enqueue Y[M, N] = Xm[M, K] W[K, N] (row-major) on the handle's stream, float32 accumulation.
/// Returns "" or the error.
std::string CublasGemm(cublasHandle_t h, bool half, const void* xm, const void* w, void* y, int64_t M, int64_t K, int64_t N) {
  // column-major view: Y^T [N, M] = W^T [N, K] (W row-major, ld N) * Xm^T [K, M] (Xm row-major, ld K)
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType t = half ? CUDA_R_16F : CUDA_R_32F;
  std::lock_guard<std::mutex> lock(CublasMutex());
  // CUBLAS_COMPUTE_32F: float32 accumulation, no TF32 (float32 results must match the reference to 1e-5)
  const cublasStatus_t st = Cublas().gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_N, (int)N, (int)M, (int)K, &alpha, w, t, (int)N, xm, t, (int)K,
                                             &beta, y, t, (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  return st == CUBLAS_STATUS_SUCCESS ? "" : "cublasGemmEx failed with status " + std::to_string((int)st);
}

/// Bytes of the prefill workspace: the masked copy of X ([M, K], at most float32) and the
/// "Y is not finite" flag.
size_t PrefillBytes(int64_t M, int64_t K) { return (size_t)((M * K * 4 + 255) / 256 * 256) + cuda::kTcFlagBytes; }

template <typename T>
std::string Run(const CudaArgs& a, const CudaPlan& plan) {
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  if (a.M == 0 || a.N == 0) return "";
  if (a.G != 1 || a.ramp != 0.0f || a.scale != nullptr || a.threshold_count > 1)
    return "segments, ramp and scale are not supported by the CUDA kernels of this build";
  if (a.K > (int64_t)INT32_MAX || a.N > (int64_t)INT32_MAX || a.M > (int64_t)INT32_MAX / 2)
    return "problem too large for 32-bit indexing (M, K, N must each be < 2^31)";
  const uint2* sel = nullptr;
  char* scratch = static_cast<char*>(a.workspace);
  if (a.mode == Mode::kTopK) {
    if (a.M > 65535 * 1024LL) return "too many rows for the top-k kernel";
    uint2* out = reinterpret_cast<uint2*>(scratch);
    cudaError_t err = cuda::LaunchTopKSelect<T>(static_cast<const T*>(a.x), a.M, a.K, a.k[0], out, stream);
    if (err != cudaSuccess) return std::string("top-k selection kernel: ") + cudaGetErrorString(err);
    sel = out;
    scratch += (a.M * sizeof(uint2) + 255) / 256 * 256;
  }
  cudaError_t err;
  if (a.M <= 8) {
    if (a.M == 1) err = LaunchDecode<T, 1>(a, plan, sel, scratch, stream);
    else if (a.M == 2) err = LaunchDecode<T, 2>(a, plan, sel, scratch, stream);
    else if (a.M <= 4) err = LaunchDecode<T, 4>(a, plan, sel, scratch, stream);
    else err = LaunchDecode<T, 8>(a, plan, sel, scratch, stream);
    if (err != cudaSuccess) return std::string("sparse GEMV kernel: ") + cudaGetErrorString(err);
  } else {
    // prefill GEMM. First choice: X masked into the workspace, cuBLAS GEMM (tensor cores), then the exact
    // kernel guarded by a scan of Y for Inf/NaN: a masked or zero x times an Inf/NaN weight gives NaN in
    // cuBLAS but must be skipped (sparse_matmul.h), and any non-finite weight makes its whole column of Y
    // non-finite, so a finite Y proves the cuBLAS result exact. Otherwise, float16 with aligned operands:
    // the tensor-core kernel, then the exact kernel guarded by its "W has Inf/NaN" flag. Otherwise
    // (float32, unaligned pointers, K or N not a multiple of 8): the exact kernel alone.
    const dim3 grid((unsigned)((a.N + cuda::kBN - 1) / cuda::kBN), (unsigned)((a.M + cuda::kBM - 1) / cuda::kBM));
    if (grid.y > 65535) return "too many rows for the GEMM grid (M > 4194240)";
    unsigned* nonfinite = nullptr;
    cublasHandle_t handle = plan.use_cublas && a.K > 0 ? CublasHandle(stream) : nullptr;
    if (handle != nullptr) {
      T* xm = reinterpret_cast<T*>(scratch);
      unsigned* flag = reinterpret_cast<unsigned*>(scratch + PrefillBytes(a.M, a.K) - cuda::kTcFlagBytes);
      err = cuda::LaunchMaskRows<T>(static_cast<const T*>(a.x), xm, a.M, a.K, a.thresholds, sel, a.mode == Mode::kTopK, flag, stream);
      if (err != cudaSuccess) return std::string("prefill mask kernel: ") + cudaGetErrorString(err);
      const std::string gemm_err = CublasGemm(handle, std::is_same<T, __half>::value, xm, a.w, a.y, a.M, a.K, a.N);
      if (!gemm_err.empty()) return "prefill GEMM: " + gemm_err;
      err = cuda::LaunchFlagNonFinite<T>(static_cast<const T*>(a.y), a.M * a.N, flag, stream);
      if (err != cudaSuccess) return std::string("prefill Inf/NaN scan: ") + cudaGetErrorString(err);
      nonfinite = flag;
    }
    if constexpr (std::is_same<T, __half>::value) {
      if (handle == nullptr && cuda::TcGemmEligible(a.x, a.w, a.y, a.K, a.N)) {
        nonfinite = reinterpret_cast<unsigned*>(scratch);  // cuda::kTcFlagBytes of the workspace
        err = cudaMemsetAsync(nonfinite, 0, sizeof(unsigned), stream);
        if (err != cudaSuccess) return std::string("masked GEMM flag: ") + cudaGetErrorString(err);
        err = cuda::LaunchMaskedGemmTc(static_cast<const __half*>(a.x), static_cast<const __half*>(a.w), static_cast<__half*>(a.y), a.M,
                                       a.K, a.N, a.thresholds, sel, a.mode == Mode::kTopK, nonfinite, stream);
        if (err != cudaSuccess) return std::string("masked GEMM tensor-core kernel: ") + cudaGetErrorString(err);
      }
    }
    cuda::MaskedGemmKernel<T><<<grid, cuda::kGemmThreads, 0, stream>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.w),
                                                                     static_cast<T*>(a.y), (int)a.M, (int)a.K, (int)a.N, a.thresholds,
                                                                     sel, a.mode == Mode::kTopK, nonfinite);
    err = cudaGetLastError();
    if (err != cudaSuccess) return std::string("masked GEMM kernel: ") + cudaGetErrorString(err);
  }
  return "";
}

}  // namespace

size_t CudaWorkspaceBytes(const CudaArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N;
  const size_t select = a.mode == Mode::kTopK ? (size_t)(M * sizeof(uint2) + 255) / 256 * 256 : 0;
  // decode: room for the split-K scratch in case the per-stream one cannot be used (during capture);
  // prefill: the masked copy of X for cuBLAS and a flag (the tensor-core path uses the first kTcFlagBytes as its flag)
  return select + (M >= 1 && M <= 8 ? SplitScratchBytes(M, N) : 0) + (M > 8 ? PrefillBytes(M, K) : 0);
}

CudaPlan DefaultPlan(bool /*half*/, const CudaArgs& /*args*/) {
  CudaPlan plan;
  const char* env = std::getenv("ACTTAIL_CUBLAS");  // "0": the op's own GEMM kernels (read per call, for tests)
  plan.use_cublas = !(env != nullptr && env[0] == '0' && env[1] == '\0');
  return plan;
}

std::string SparseMatMulCuda(bool half, const CudaArgs& args, const CudaPlan& plan) {
  return half ? Run<__half>(args, plan) : Run<float>(args, plan);
}

}  // namespace acttail
