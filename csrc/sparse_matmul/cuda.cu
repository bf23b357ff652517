// Host launchers of SparseMatMul's CUDA kernels (kernels/*.cuh, common/cuda/*.cuh): split-K decode GEMV for M <= 8
// rows (one launch for every member, parameters from the per-shape table gemv_table.h); for more rows (prefill)
// per member the mask applied into the workspace and a cuBLAS GEMM into its column slice (cuBLAS loaded at run
// time; by default every member's mask in one pass and one batched GEMM, ACTTAIL_PREFILL_FUSE=0: per member), else the masked tiled GEMM kernels; in topk mode preceded by the top-k selection kernel (one block per
// row and member). Everything is enqueued on the caller's stream; no host synchronization, every launch checked.
#include <cublas_api.h>  // types and prototypes only: libcublas is opened at run time (dlopen), not linked
#include <dlfcn.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "common/cuda/activation.cuh"
#include "common/cuda/stream_capture.h"
#include "common/env.h"
#include "common/cuda/flag_check.cuh"
#include "common/cuda/mask_rows.cuh"
#include "common/cuda/topk_select.cuh"
#include "sparse_matmul/cuda.h"
#include "sparse_matmul/gemv_table.h"
#include "sparse_matmul/kernels/masked_gemm.cuh"
#include "sparse_matmul/kernels/masked_gemm_tc.cuh"
#include "sparse_matmul/launch.h"

namespace acttail {
namespace detail {


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

}  // namespace detail

namespace {

using detail::CounterBytes;
using detail::CurrentSms;
using detail::Layout;
using detail::SplitScratchBytes;

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

// cublasGemmStridedBatchedEx with a cublasComputeType_t, likewise
using CublasGemmBatchedFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                               const void*, cudaDataType, int, long long, const void*, cudaDataType, int, long long,
                                               const void*, void*, cudaDataType, int, long long, int, cublasComputeType_t,
                                               cublasGemmAlgo_t);
static_assert(sizeof(static_cast<CublasGemmBatchedFn>(&cublasGemmStridedBatchedEx)) > 0,
              "the cuBLAS header declares cublasGemmStridedBatchedEx so");

struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  CublasGemmExFn gemm_ex = nullptr;
  CublasGemmBatchedFn gemm_batched = nullptr;  // optional: without it the members' GEMMs run one by one
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
    a.gemm_batched = reinterpret_cast<CublasGemmBatchedFn>(dlsym(lib, "cublasGemmStridedBatchedEx"));
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
  if (::acttail::cuda::StreamCapturing(stream)) return nullptr;
  cublasHandle_t h = nullptr;
  if (api.create(&h) != CUBLAS_STATUS_SUCCESS) return nullptr;
  if (api.set_stream(h, stream) != CUBLAS_STATUS_SUCCESS) return nullptr;  // (the handle leaks: a rare failure, not worth a destroy symbol)
  handles.emplace(std::make_pair(dev, stream), h);
  return h;
}

/// Enqueue Y[:, 0:n] = Xm[M, K] W[:, 0:n] (row-major, W and Y with row stride ld) on the handle's stream,
/// float32 accumulation. Returns "" or the error.
std::string CublasGemm(cublasHandle_t h, bool half, const void* xm, const void* w, void* y, int64_t M, int64_t K, int64_t n, int64_t ld) {
  // column-major view: Y^T [n, M] = W^T [n, K] (W row-major, ld) * Xm^T [K, M] (Xm row-major, ld K)
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType t = half ? CUDA_R_16F : CUDA_R_32F;
  std::lock_guard<std::mutex> lock(CublasMutex());
  // CUBLAS_COMPUTE_32F: float32 accumulation, no TF32 (float32 results must match the reference to 1e-5)
  const cublasStatus_t st = Cublas().gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_N, (int)n, (int)M, (int)K, &alpha, w, t, (int)ld, xm, t, (int)K,
                                             &beta, y, t, (int)ld, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  return st == CUBLAS_STATUS_SUCCESS ? "" : "cublasGemmEx failed with status " + std::to_string((int)st);
}

/// Enqueue Y[:, g n : (g + 1) n] = Xm_g[M, K] W[:, g n : (g + 1) n] for g < batch in one call (the members' masked copies of
/// X at a stride of M * K, their equal column slices of W and Y side by side, row stride ld). Returns "" or the error.
std::string CublasGemmBatched(cublasHandle_t h, bool half, const void* xm, const void* w, void* y, int64_t M, int64_t K, int64_t n,
                              int64_t ld, int batch) {
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType t = half ? CUDA_R_16F : CUDA_R_32F;
  std::lock_guard<std::mutex> lock(CublasMutex());
  const cublasStatus_t st = Cublas().gemm_batched(h, CUBLAS_OP_N, CUBLAS_OP_N, (int)n, (int)M, (int)K, &alpha, w, t, (int)ld, (long long)n, xm, t,
                                                  (int)K, (long long)(M * K), &beta, y, t, (int)ld, (long long)n, batch, CUBLAS_COMPUTE_32F,
                                                  CUBLAS_GEMM_DEFAULT);
  return st == CUBLAS_STATUS_SUCCESS ? "" : "cublasGemmStridedBatchedEx failed with status " + std::to_string((int)st);
}

// ---- members: how the G members map onto launches -----------------------------------------------
bool UniformRule(const CudaArgs& a) {
  if (a.scale_rows > 1) return false;
  if (a.mode == Mode::kThreshold) return a.threshold_count <= 1;
  for (int g = 1; g < a.G; ++g)
    if (a.k[g] != a.k[0]) return false;
  return true;
}

Layout MakeLayout(const CudaArgs& a) {
  Layout l;
  if (UniformRule(a)) {
    l.end[0] = a.N;
    return l;
  }
  l.G = a.G;
  for (int g = 0; g < a.G; ++g) {
    l.begin[g] = a.begin[g];
    l.end[g] = a.end[g];
  }
  return l;
}

/// With activation "swiglu": the one-row-of-X threshold decode GEMV computes silu(gate) * up as it reads x; every
/// other path reads x more than once (top-k selection, prefill) and gets it written into the workspace first.
bool InlineActivation(const CudaArgs& a) { return a.M <= 8 && a.mode == Mode::kThreshold; }

size_t ActivationBytes(const CudaArgs& a) {
  return a.swiglu && !InlineActivation(a) ? (size_t)(a.M * a.K * 4 + 255) / 256 * 256 : 0;  // T is at most 4 bytes
}

size_t SelectBytes(const CudaArgs& a, const Layout& l) {
  return a.mode == Mode::kTopK ? (size_t)(a.M * l.G * (int64_t)sizeof(uint2) + 255) / 256 * 256 : 0;
}

cuda::DeviceMask MakeMask(bool half, const CudaArgs& a, const Layout& l, const uint2* sel) {
  cuda::DeviceMask dm;
  dm.topk = a.mode == Mode::kTopK;
  dm.half_keys = half && a.scale == nullptr;
  dm.ramp = a.ramp;
  dm.thr = a.thresholds;
  dm.thr_stride = a.threshold_count > 1 ? 1 : 0;
  dm.scale = a.scale;
  dm.scale_stride = a.scale_rows > 1 ? a.K : 0;
  dm.sel = sel;
  dm.sel_members = l.G;
  return dm;
}

template <typename T>
cudaError_t Decode(const CudaArgs& a, const CudaPlan& plan, const Layout& l, const cuda::DeviceMask& dm, void* scratch, cudaStream_t stream) {
  if (a.M == 1) return detail::LaunchDecode<T, 1>(a, plan, l, dm, scratch, stream);
  if (a.M == 2) return detail::LaunchDecode<T, 2>(a, plan, l, dm, scratch, stream);
  if (a.M <= 4) return detail::LaunchDecode<T, 4>(a, plan, l, dm, scratch, stream);
  return detail::LaunchDecode<T, 8>(a, plan, l, dm, scratch, stream);
}

// ---- prefill ------------------------------------------------------------------------------------
/// Masked copies of X the prefill keeps at once: one per member for the one-pass mask (plan.fuse_prefill, at most
/// cuda::kMaxMaskGroups members), else one, reused in stream order.
int MaskCopies(const CudaPlan& plan, const Layout& l) {
  return plan.fuse_prefill && plan.use_cublas && l.G <= cuda::kMaxMaskGroups ? l.G : 1;
}

/// Bytes of the prefill workspace: the masked copies of X ([M, K] each, at most float32) and the "Y is not finite" flag.
size_t PrefillBytes(int64_t M, int64_t K, int copies) { return (size_t)((copies * M * K * 4 + 255) / 256 * 256) + cuda::kTcFlagBytes; }

/// The one-pass prefill mask (cuda::LaunchMaskGroups, and with equal member widths one batched GEMM) applies.
bool FusedPrefill(bool half, const CudaArgs& a, const CudaPlan& plan, const Layout& l, const void* workspace) {
  const void* x = a.x;
  return plan.fuse_prefill && (half ? cuda::MaskGroupsEligible<__half>(x, workspace, a.K, l.G) : cuda::MaskGroupsEligible<float>(x, workspace, a.K, l.G));
}

/// With activation "swiglu" in threshold mode, the one-pass mask computes silu(gate) * up itself (no activation kernel,
/// no [M, K] copy of it) where nothing else reads x: the cuBLAS prefill of a W checked finite (no exact kernel after it).
bool SwiGluInMask(bool half, const CudaArgs& a, const CudaPlan& plan, const Layout& l, const void* workspace) {
  return a.swiglu && a.M > 8 && a.K > 0 && a.mode == Mode::kThreshold && plan.w_finite && plan.use_cublas &&
         FusedPrefill(half, a, plan, l, workspace);
}

std::string Err(const char* what, cudaError_t err) { return err == cudaSuccess ? "" : std::string(what) + ": " + cudaGetErrorString(err); }

/// Prefill GEMM. First choice (`handle`: cuBLAS of this stream, or null): X masked into the workspace and a cuBLAS GEMM
/// (tensor cores) into each member's column slice — per member a mask pass and a GEMM, or with plan.fuse_prefill
/// (FusedPrefill) every member's mask in one pass and one strided-batched GEMM for equally wide members, where
/// a.swiglu (SwiGluInMask) makes that pass compute silu(gate) * up; then, unless W was checked finite, the exact
/// kernel guarded by a scan of Y for Inf/NaN (common/cuda/mask_rows.cuh). Otherwise, float16 with aligned operands:
/// the tensor-core kernel, then the exact kernel guarded by its "W has Inf/NaN" flag. Otherwise (float32, unaligned
/// pointers, K or N not a multiple of 8): the exact kernel alone.
template <typename T>
std::string Prefill(const CudaArgs& a, const CudaPlan& plan, const Layout& l, const cuda::DeviceMask& dm, char* scratch,
                    cublasHandle_t handle, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  T* y = static_cast<T*>(a.y);
  if ((a.M + cuda::kBM - 1) / cuda::kBM > 65535) return "too many rows for the GEMM grid (M > 4194240)";
  unsigned* nonfinite = nullptr;
  std::string err;
  if (a.swiglu && handle == nullptr) return "internal error: the SwiGLU input left to a prefill without cuBLAS";
  if (handle != nullptr) {
    constexpr bool half = std::is_same<T, __half>::value;
    T* xm = reinterpret_cast<T*>(scratch);
    unsigned* flag = reinterpret_cast<unsigned*>(scratch + PrefillBytes(a.M, a.K, MaskCopies(plan, l)) - cuda::kTcFlagBytes);
    if (a.swiglu || FusedPrefill(half, a, plan, l, xm)) {
      // one pass over X for every member's mask (x = silu(gate) * up computed in it with a.swiglu: SwiGluInMask), then
      // one batched GEMM when the members are equally wide, else a GEMM per member
      err = Err("prefill mask kernel", cuda::LaunchMaskGroups<T>(x, xm, a.M, a.K, dm, l.G, a.swiglu, flag, stream));
      const bool equal = l.G > 1 && Cublas().gemm_batched != nullptr && EqualAdjacentMembers(l.begin, l.end, l.G);
      if (err.empty() && equal)
        err = CublasGemmBatched(handle, half, xm, w + l.begin[0], y + l.begin[0], a.M, a.K, l.end[0] - l.begin[0], a.N, l.G);
      for (int g = 0; g < l.G && err.empty() && !equal; ++g)
        err = CublasGemm(handle, half, xm + g * a.M * a.K, w + l.begin[g], y + l.begin[g], a.M, a.K, l.end[g] - l.begin[g], a.N);
    } else {
      for (int g = 0; g < l.G && err.empty(); ++g) {
        err = Err("prefill mask kernel", cuda::LaunchMaskRows<T>(x, xm, a.M, a.K, dm, g, flag, stream));
        if (err.empty()) err = CublasGemm(handle, half, xm, w + l.begin[g], y + l.begin[g], a.M, a.K, l.end[g] - l.begin[g], a.N);
      }
    }
    if (!err.empty()) return err;
    if (plan.w_finite) return "";  // masked x times a finite W: cuBLAS' Y is the exact one (up to summation order)
    err = Err("prefill Inf/NaN scan", cuda::LaunchFlagNonFinite<T>(y, a.M * a.N, flag, stream));
    if (!err.empty()) return err;
    nonfinite = flag;
  }
  if constexpr (std::is_same<T, __half>::value) {
    bool eligible = handle == nullptr;
    for (int g = 0; g < l.G; ++g) eligible = eligible && cuda::TcGemmEligible(x, w + l.begin[g], y + l.begin[g], a.K, l.end[g] - l.begin[g], a.N);
    if (eligible) {
      nonfinite = reinterpret_cast<unsigned*>(scratch);  // cuda::kTcFlagBytes of the workspace
      err = Err("masked GEMM flag", cudaMemsetAsync(nonfinite, 0, sizeof(unsigned), stream));
      for (int g = 0; g < l.G && err.empty(); ++g)
        err = Err("masked GEMM tensor-core kernel", cuda::LaunchMaskedGemmTc(x, w + l.begin[g], y + l.begin[g], a.M, a.K, l.end[g] - l.begin[g],
                                                                             a.N, dm, g, nonfinite, stream));
      if (!err.empty()) return err;
    }
  }
  for (int g = 0; g < l.G; ++g) {  // exact kernel: always (no cuBLAS, not eligible) or armed by the flag
    const int64_t n = l.end[g] - l.begin[g];
    const dim3 grid((unsigned)((n + cuda::kBN - 1) / cuda::kBN), (unsigned)((a.M + cuda::kBM - 1) / cuda::kBM));
    cuda::MaskedGemmKernel<T><<<grid, cuda::kGemmThreads, 0, stream>>>(x, w + l.begin[g], y + l.begin[g], (int)a.M, (int)a.K, (int)n, (int)a.N,
                                                                      dm, g, nonfinite);
    err = Err("masked GEMM kernel", cudaGetLastError());
    if (!err.empty()) return err;
  }
  return "";
}

template <typename T>
std::string Run(const CudaArgs& args, const CudaPlan& plan) {
  cudaStream_t stream = static_cast<cudaStream_t>(args.stream);
  if (args.M == 0 || args.N == 0) return "";
  if (args.K > (int64_t)INT32_MAX / 2 || args.N > (int64_t)INT32_MAX || args.M > (int64_t)INT32_MAX / 2)
    return "problem too large for 32-bit indexing (M, N must each be < 2^31, K < 2^30)";
  if (args.G < 1 || args.G > kMaxMembers) return "member count out of range";
  const Layout l = MakeLayout(args);
  char* scratch = static_cast<char*>(args.workspace);
  CudaArgs a = args;
  constexpr bool half = std::is_same<T, __half>::value;
  // the prefill's cuBLAS handle (null: the op's own kernels), and whether its mask pass reads [gate | up] itself, where it
  // is the only reader of x (it then starts the workspace)
  const cublasHandle_t handle = a.M > 8 && plan.use_cublas && a.K > 0 ? CublasHandle(stream) : nullptr;
  const bool act_in_mask = handle != nullptr && SwiGluInMask(half, a, plan, l, scratch);
  if (a.swiglu && !InlineActivation(a) && !act_in_mask) {
    // x := silu(gate) * up, [M, K] in the workspace
    T* act = reinterpret_cast<T*>(scratch);
    const std::string err = Err("activation kernel", cuda::LaunchSwiGlu<T>(static_cast<const T*>(a.x), act, a.M, a.K, stream));
    if (!err.empty()) return err;
    a.x = act;
    a.swiglu = false;
    scratch += ActivationBytes(args);
  }
  const uint2* sel = nullptr;
  if (a.mode == Mode::kTopK) {
    cuda::SelectParams p;
    p.K = (int)a.K;
    p.members = l.G;
    for (int g = 0; g < l.G; ++g) p.k[g] = (int)a.k[g];
    p.scale = a.scale;
    p.scale_stride = a.scale_rows > 1 ? a.K : 0;
    uint2* out = reinterpret_cast<uint2*>(scratch);
    const std::string err = Err("top-k selection kernel", cuda::LaunchTopKSelect<T>(static_cast<const T*>(a.x), a.M, p, out, stream));
    if (!err.empty()) return err;
    sel = out;
    scratch += SelectBytes(a, l);
  }
  const cuda::DeviceMask dm = MakeMask(half, a, l, sel);
  if (a.M <= 8) {
    const cudaError_t err = Decode<T>(a, plan, l, dm, scratch, stream);
    if (err == cudaErrorInvalidValue) return "sparse GEMV: this GemvConfig is not compiled for this type and row count";
    return Err("sparse GEMV kernel", err);
  }
  return Prefill<T>(a, plan, l, dm, scratch, handle, stream);
}

}  // namespace

size_t CudaWorkspaceBytes(const CudaArgs& a, const CudaPlan& plan) {
  const Layout l = MakeLayout(a);
  // decode: room for the split-K scratch in case the per-stream one cannot be used (during capture);
  // prefill: the masked copies of X for cuBLAS and a flag (the tensor-core path uses the first kTcFlagBytes as its flag)
  return ActivationBytes(a) + SelectBytes(a, l) + (a.M >= 1 && a.M <= 8 ? SplitScratchBytes(a.M, a.N, l.G) : 0) + (a.M > 8 ? PrefillBytes(a.M, a.K, MaskCopies(plan, l)) : 0);
}

CudaPlan DefaultPlan(bool half, const CudaArgs& a) {
  CudaPlan plan;
  plan.use_cublas = !EnvIs("ACTTAIL_CUBLAS", "0");  // the op's own GEMM kernels (read per call, for tests)
  // the fused prefill, the default since measured on the H200 (docs/kernels.md); ACTTAIL_PREFILL_FUSE=0 turns it off
  // (read per call, for A/B runs and tests)
  plan.fuse_prefill = !EnvIs("ACTTAIL_PREFILL_FUSE", "0");
  plan.pdl = cuda::DependentLaunchWanted();  // read per call, for A/B runs and tests
  if (half && a.M == 1) plan.gemv = LookupGemvConfig(CurrentSms(), a.K, a.N);
  return plan;
}

std::string NonFiniteWeights(bool half, const void* w, int64_t count, bool* nonfinite) {
  *nonfinite = true;
  if (count <= 0) {
    *nonfinite = false;
    return "";
  }
  return cuda::RunFlagCheck(
      w,
      [&](unsigned* flag, cudaStream_t stream) {
        return half ? cuda::LaunchFlagNonFinite<__half>(static_cast<const __half*>(w), count, flag, stream)
                    : cuda::LaunchFlagNonFinite<float>(static_cast<const float*>(w), count, flag, stream);
      },
      nonfinite);
}

std::string SparseMatMulCuda(bool half, const CudaArgs& args, const CudaPlan& plan) {
  return half ? Run<__half>(args, plan) : Run<float>(args, plan);
}

}  // namespace acttail
