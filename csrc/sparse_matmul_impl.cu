// Host launchers of the CUDA kernels (see sparse_matmul_impl.cuh): split-K decode GEMV for M <= 8 rows,
// masked tiled GEMM otherwise, preceded by the top-k selection kernel in topk mode. Everything is
// enqueued on the caller's stream; no host synchronization, every launch checked.
#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "sparse_matmul.h"
#include "sparse_matmul_impl.cuh"
#include "masked_gemm_tc.cuh"

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
      static_cast<const T*>(a.x), static_cast<const T*>(a.w), static_cast<T*>(a.y), (int)a.M, (int)a.K, (int)a.N, a.threshold, sel,
      a.mode == Mode::kTopK, w_aligned, acc, arrived);
  return cudaGetLastError();
}

/// Decode GEMV (M <= 8): split-K over 8-warp blocks (256 channels each), 4 rows in flight per warp.
/// Grids of fewer than 3 blocks per multiprocessor pool each block's kept channels first (BAL): with few
/// blocks the slowest warp sets the time (LLaMA-7B 4096x4096 at 50-80 %: 9.0 vs 9.8 us, 5.8 vs 6.7 us on
/// H200), with many the extra block barrier costs more than it saves (11008x4096 at 50 %: 18.0 vs 14.7 us);
/// docs/kernels.md. `gemv_variant` (benchmarks only): 1 = zero per-call scratch with cudaMemsetAsync
/// instead of the per-stream scratch, 2 / 3 = force the plain / pooled kernel.
template <typename T, int MR>
cudaError_t LaunchDecode(const CudaArgs& a, const uint2* sel, void* per_call_scratch, cudaStream_t stream) {
  const size_t bytes = SplitScratchBytes(a.M, a.N);
  void* scratch = a.gemv_variant == 1 ? nullptr : StreamScratch(stream, bytes);
  if (scratch == nullptr) {
    scratch = per_call_scratch;
    cudaError_t err = cudaMemsetAsync(scratch, 0, bytes, stream);
    if (err != cudaSuccess) return err;
  }
  constexpr int kWarps = 8, kRows = 4;
  constexpr int TN = 32 * cuda::Traits<T>::kVec;
  const int64_t blocks = (a.N + TN - 1) / TN * std::max<int64_t>(1, (a.K + kWarps * 32 - 1) / (kWarps * 32));
  const bool pooled = a.gemv_variant == 3 || (a.gemv_variant != 2 && blocks < 3 * (int64_t)CurrentSms());
  return pooled ? LaunchSplitK<T, MR, kWarps, 1, kRows, true>(a, sel, scratch, stream)
                : LaunchSplitK<T, MR, kWarps, 1, kRows, false>(a, sel, scratch, stream);
}

template <typename T>
std::string Run(const CudaArgs& a) {
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  if (a.M == 0 || a.N == 0) return "";
  if (a.K > (int64_t)INT32_MAX || a.N > (int64_t)INT32_MAX || a.M > (int64_t)INT32_MAX / 2)
    return "problem too large for 32-bit indexing (M, K, N must each be < 2^31)";
  const uint2* sel = nullptr;
  char* scratch = static_cast<char*>(a.workspace);
  if (a.mode == Mode::kTopK) {
    if (a.M > 65535 * 1024LL) return "too many rows for the top-k kernel";
    uint2* out = reinterpret_cast<uint2*>(scratch);
    cudaError_t err = cuda::LaunchTopKSelect<T>(static_cast<const T*>(a.x), a.M, a.K, a.k, out, stream);
    if (err != cudaSuccess) return std::string("top-k selection kernel: ") + cudaGetErrorString(err);
    sel = out;
    scratch += (a.M * sizeof(uint2) + 255) / 256 * 256;
  }
  cudaError_t err;
  if (a.M <= 8) {
    if (a.M == 1) err = LaunchDecode<T, 1>(a, sel, scratch, stream);
    else if (a.M == 2) err = LaunchDecode<T, 2>(a, sel, scratch, stream);
    else if (a.M <= 4) err = LaunchDecode<T, 4>(a, sel, scratch, stream);
    else err = LaunchDecode<T, 8>(a, sel, scratch, stream);
    if (err != cudaSuccess) return std::string("sparse GEMV kernel: ") + cudaGetErrorString(err);
  } else {
    // prefill GEMM. float16 with aligned operands: tensor-core kernel, then the exact kernel guarded by
    // the tensor-core kernel's "W has Inf/NaN" flag (an empty launch when W is finite). Otherwise (float32,
    // unaligned pointers, K or N not a multiple of 8): the exact kernel alone.
    const dim3 grid((unsigned)((a.N + cuda::kBN - 1) / cuda::kBN), (unsigned)((a.M + cuda::kBM - 1) / cuda::kBM));
    if (grid.y > 65535) return "too many rows for the GEMM grid (M > 4194240)";
    unsigned* nonfinite = nullptr;
    if constexpr (std::is_same<T, __half>::value) {
      if (cuda::TcGemmEligible(a.x, a.w, a.y, a.K, a.N)) {
        nonfinite = reinterpret_cast<unsigned*>(scratch);  // cuda::kTcFlagBytes of the workspace
        err = cudaMemsetAsync(nonfinite, 0, sizeof(unsigned), stream);
        if (err != cudaSuccess) return std::string("masked GEMM flag: ") + cudaGetErrorString(err);
        err = cuda::LaunchMaskedGemmTc(static_cast<const __half*>(a.x), static_cast<const __half*>(a.w), static_cast<__half*>(a.y), a.M,
                                       a.K, a.N, a.threshold, sel, a.mode == Mode::kTopK, nonfinite, stream);
        if (err != cudaSuccess) return std::string("masked GEMM tensor-core kernel: ") + cudaGetErrorString(err);
      }
    }
    cuda::MaskedGemmKernel<T><<<grid, cuda::kGemmThreads, 0, stream>>>(static_cast<const T*>(a.x), static_cast<const T*>(a.w),
                                                                     static_cast<T*>(a.y), (int)a.M, (int)a.K, (int)a.N, a.threshold,
                                                                     sel, a.mode == Mode::kTopK, nonfinite);
    err = cudaGetLastError();
    if (err != cudaSuccess) return std::string("masked GEMM kernel: ") + cudaGetErrorString(err);
  }
  return "";
}

}  // namespace

size_t CudaWorkspaceBytes(int64_t M, int64_t /*K*/, int64_t N, Mode mode) {
  const size_t select = mode == Mode::kTopK ? (size_t)(M * sizeof(uint2) + 255) / 256 * 256 : 0;
  // decode: room for the split-K scratch in case the per-stream one cannot be used (during capture);
  // prefill: the tensor-core kernel's Inf/NaN-in-W flag (kTcFlagBytes)
  return select + (M >= 1 && M <= 8 ? SplitScratchBytes(M, N) : 0) + (M > 8 ? cuda::kTcFlagBytes : 0);
}

std::string SparseMatMulCuda(bool half, const CudaArgs& args) {
  return half ? Run<__half>(args) : Run<float>(args);
}

}  // namespace acttail
