// ONNX Runtime custom op library of acttail-export: com.acttail::SparseMatMul on the CPU execution
// provider (float, float16) and, in CUDA builds, on the CUDA execution provider (float, float16).
// The only exported symbol is RegisterCustomOps (see exports.map).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <functional>
#include <memory>
#include <type_traits>
#include <mutex>
#include <string>
#include <vector>

#include "sparse_matmul.h"

namespace acttail::nbits { void AddOps(Ort::CustomOpDomain& domain); }  // sparse_matmul_nbits/op.cc
namespace acttail {
namespace {

constexpr const char* kDomain = "com.acttail";
constexpr const char* kOpName = "SparseMatMul";

template <typename T>
constexpr ONNXTensorElementDataType ElementType() {
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

OrtStatusPtr MakeStatus(OrtErrorCode code, const std::string& msg) { return Ort::GetApi().CreateStatus(code, msg.c_str()); }

/// Attribute parsing result, shared by all kernels.
struct Attributes {
  Mode mode = Mode::kThreshold;
  int64_t k = 0;
  std::string node;
};

std::string NodeName(const OrtKernelInfo* info) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &size);
  if (st != nullptr) { api.ReleaseStatus(st); return "?"; }
  std::string name(size, '\0');
  st = api.KernelInfo_GetNodeName(info, name.data(), &size);
  if (st != nullptr) { api.ReleaseStatus(st); return "?"; }
  if (!name.empty() && name.back() == '\0') name.pop_back();
  return name;
}

Attributes ParseAttributes(const OrtKernelInfo* info) {
  const OrtApi& api = Ort::GetApi();
  Attributes a;
  a.node = NodeName(info);
  const std::string where = "SparseMatMul node '" + a.node + "': ";
  size_t len = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, "mode", nullptr, &len);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    throw InvalidArgument(where + "attribute 'mode' is required (\"threshold\" or \"topk\")");
  }
  std::string mode(len, '\0');
  Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, "mode", mode.data(), &len));
  if (!mode.empty() && mode.back() == '\0') mode.pop_back();
  int64_t k = -1;
  st = api.KernelInfoGetAttribute_int64(info, "k", &k);
  const bool has_k = st == nullptr;
  if (st != nullptr) api.ReleaseStatus(st);
  size_t inputs = 0;
  Ort::ThrowOnError(api.KernelInfo_GetInputCount(info, &inputs));
  if (mode == "threshold") {
    a.mode = Mode::kThreshold;
    if (inputs < 3)
      throw InvalidArgument(where + "threshold mode needs a 3rd input (float32 scalar threshold); add it or use mode=\"topk\"");
  } else if (mode == "topk") {
    a.mode = Mode::kTopK;
    if (!has_k) throw InvalidArgument(where + "topk mode needs the int attribute 'k' (channels kept per row)");
    if (k < 0) throw InvalidArgument(where + "attribute k must be >= 0, got " + std::to_string(k));
    a.k = k;
  } else {
    throw InvalidArgument(where + "attribute mode must be \"threshold\" or \"topk\", got \"" + mode + "\"");
  }
  return a;
}

/// Inputs common to CPU and CUDA kernels, validated.
struct Bound {
  Problem p;
  Ort::ConstValue x, w, t;
  Ort::UnownedValue y;
};

Bound Bind(Ort::KernelContext& ctx, const Attributes& a) {
  Bound b;
  b.x = ctx.GetInput(0);
  b.w = ctx.GetInput(1);
  b.p = CheckShapes(b.x.GetTensorTypeAndShapeInfo().GetShape(), b.w.GetTensorTypeAndShapeInfo().GetShape(), a.node);
  const std::string where = "SparseMatMul node '" + a.node + "': ";
  if (a.mode == Mode::kThreshold) {
    b.t = ctx.GetInput(2);
    if (ctx.GetInputCount() < 3 || b.t == nullptr)
      throw InvalidArgument(where + "threshold mode needs the 3rd input (float32 scalar threshold)");
    if (b.t.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
      throw InvalidArgument(where + "threshold must hold exactly one float32 value, got " +
                            std::to_string(b.t.GetTensorTypeAndShapeInfo().GetElementCount()));
  } else if (a.k > b.p.K) {
    throw InvalidArgument(where + "attribute k=" + std::to_string(a.k) + " exceeds K=" + std::to_string(b.p.K) +
                          " (the last dimension of X); use k <= K");
  }
  b.y = ctx.GetOutput(0, b.p.y_shape);
  return b;
}

template <typename Fn>
OrtStatusPtr Guard(Fn&& fn) {
  try {
    fn();
    return nullptr;
  } catch (const InvalidArgument& e) {
    return MakeStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return MakeStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return MakeStatus(ORT_FAIL, std::string("SparseMatMul: ") + e.what());
  }
}

// ---- CPU --------------------------------------------------------------------------------------
void OrtParallel(void* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
  static_cast<Ort::KernelContext*>(ctx)->ParallelFor(fn, total, 0, data);
}

template <typename T>
struct CpuKernel {
  Attributes attrs;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard([&] {
      Ort::KernelContext ctx(context);
      Bound b = Bind(ctx, attrs);
      const float t = attrs.mode == Mode::kThreshold ? *b.t.GetTensorData<float>() : 0.0f;
      using S = typename std::conditional<std::is_same<T, float>::value, float, uint16_t>::type;
      SparseMatMulCpu<S>(reinterpret_cast<const S*>(b.x.GetTensorRawData()), reinterpret_cast<const S*>(b.w.GetTensorRawData()),
                         reinterpret_cast<S*>(b.y.GetTensorMutableRawData()), b.p, attrs.mode, t, attrs.k, &OrtParallel, &ctx);
    });
  }
};

#ifdef ACTTAIL_WITH_CUDA
// ---- CUDA -------------------------------------------------------------------------------------
template <typename T>
struct CudaKernel {
  Attributes attrs;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard([&] {
      Ort::KernelContext ctx(context);
      Bound b = Bind(ctx, attrs);
      CudaArgs args;
      args.x = b.x.GetTensorRawData();
      args.w = b.w.GetTensorRawData();
      args.y = b.y.GetTensorMutableRawData();
      args.threshold = attrs.mode == Mode::kThreshold ? b.t.GetTensorData<float>() : nullptr;
      args.stream = ctx.GetGPUComputeStream();
      args.M = b.p.M; args.K = b.p.K; args.N = b.p.N;
      args.mode = attrs.mode;
      args.k = attrs.k;
      const size_t bytes = CudaWorkspaceBytes(args.M, args.K, args.N, args.mode);
      OrtAllocator* alloc = nullptr;
      std::unique_ptr<void, std::function<void(void*)>> scratch(nullptr, [](void*) {});
      if (bytes > 0) {
        auto info = b.x.GetTensorMemoryInfo();
        alloc = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(info));
        if (alloc == nullptr) throw std::runtime_error("no device allocator for the workspace");
        void* ptr = alloc->Alloc(alloc, bytes);
        scratch = std::unique_ptr<void, std::function<void(void*)>>(ptr, [alloc](void* q) { alloc->Free(alloc, q); });
        args.workspace = ptr;
      }
      const std::string err = SparseMatMulCuda(std::is_same<T, Ort::Float16_t>::value, args);
      if (!err.empty()) throw std::runtime_error("SparseMatMul node '" + attrs.node + "': CUDA error: " + err);
    });
  }
};
#endif

// ---- op schema --------------------------------------------------------------------------------
template <typename T, template <typename> class Kernel, bool kCuda>
struct SparseMatMulOp : Ort::CustomOpBase<SparseMatMulOp<T, Kernel, kCuda>, Kernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] {
      auto k = std::make_unique<Kernel<T>>();
      k->attrs = ParseAttributes(info);
      *kernel = k.release();
    });
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ElementType<T>(); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ElementType<T>(); }
};

template <typename T>
using CpuOp = SparseMatMulOp<T, CpuKernel, false>;
#ifdef ACTTAIL_WITH_CUDA
template <typename T>
using CudaOp = SparseMatMulOp<T, CudaKernel, true>;
#endif

struct Registry {
  CpuOp<float> cpu_f32;
  CpuOp<Ort::Float16_t> cpu_f16;
#ifdef ACTTAIL_WITH_CUDA
  CudaOp<float> cuda_f32;
  CudaOp<Ort::Float16_t> cuda_f16;
#endif
  std::mutex mu;
  std::vector<Ort::CustomOpDomain> domains;  // must outlive every session that uses them
};

Registry& GetRegistry() {
  static Registry* r = new Registry();  // never destroyed: sessions may outlive static destruction
  return *r;
}

}  // namespace
}  // namespace acttail

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                              const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // cannot even report: this ORT predates API 21
  Ort::InitApi(api);
  return acttail::Guard([&] {
    auto& r = acttail::GetRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    Ort::CustomOpDomain domain{acttail::kDomain};
    domain.Add(&r.cpu_f32);
    domain.Add(&r.cpu_f16);
    acttail::nbits::AddOps(domain);
#ifdef ACTTAIL_WITH_CUDA
    domain.Add(&r.cuda_f32);
    domain.Add(&r.cuda_f16);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    r.domains.push_back(std::move(domain));
  });
}
