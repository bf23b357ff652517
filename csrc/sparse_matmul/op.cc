// com.acttail::SparseMatMul: definition and ONNX Runtime binding (CPU and, in CUDA builds, CUDA kernels,
// float and float16 each). Domain com.acttail, opset 1.
//
// Inputs:  X T[..., K]; W T[K, N]; thresholds float32 [] / [1] / [G] (optional; threshold mode needs it);
//          scale float32 [K] or [G, K] (optional: scores |x| * scale).
// Attributes: mode "threshold" | "topk"; k (int) or ks (ints, one per member); segments (ints, optional:
//          cumulative output-column ends of the G members, last == N); ramp (float, default 0); activation
//          (string, optional: "swiglu" = X holds [gate | up] [..., 2K] and the input is silu(gate) * up,
//          common/activation.h).
// Output:  Y T[..., N]. Every attribute and input added after the first release is optional, so graphs
//          written for (X, W, threshold; mode, k) still load and compute the same.
#include <memory>
#include <type_traits>
#include <vector>

#include "common/attributes.h"
#include "common/constant_input.h"
#include "common/status.h"
#include "sparse_matmul/op.h"
#ifdef ACTTAIL_WITH_CUDA
#include "sparse_matmul/cuda.h"
#endif

namespace acttail {
namespace {

constexpr size_t kThresholdInput = 2, kScaleInput = 3;

template <typename T>
constexpr ONNXTensorElementDataType ElementType() {
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

/// Inputs common to CPU and CUDA kernels, validated.
struct Bound {
  Problem p;
  MemberSpans spans;
  Ort::ConstValue x, w, t, scale;
  int64_t threshold_count = 0, scale_rows = 0;
  Ort::UnownedValue y;
};

Bound Bind(Ort::KernelContext& ctx, const MaskAttributes& a) {
  Bound b;
  const std::string where = a.Where();
  b.x = ctx.GetInput(0);
  b.w = ctx.GetInput(1);
  const std::vector<int64_t> w_shape = b.w.GetTensorTypeAndShapeInfo().GetShape();
  std::vector<int64_t> x_shape = b.x.GetTensorTypeAndShapeInfo().GetShape();
  if (w_shape.size() == 2) x_shape = ActivatedShape(a, x_shape, w_shape[0]);  // W's own shape errors come from CheckShapes
  b.p = CheckShapes(x_shape, w_shape, where);
  b.spans = CheckMembers(a, b.p.K, b.p.N);
  const size_t inputs = ctx.GetInputCount();
  if (inputs > kThresholdInput) b.t = ctx.GetInput(kThresholdInput);
  if (inputs > kScaleInput) b.scale = ctx.GetInput(kScaleInput);
  if (a.mode == Mode::kThreshold) {
    if (b.t == nullptr) throw InvalidArgument(where + "threshold mode needs the 3rd input (float32 thresholds)");
    b.threshold_count = (int64_t)b.t.GetTensorTypeAndShapeInfo().GetElementCount();
    CheckThresholdCount(a, b.threshold_count);
  }
  if (b.scale != nullptr) b.scale_rows = CheckScaleShape(a, b.scale.GetTensorTypeAndShapeInfo().GetShape(), b.p.K);
  b.y = ctx.GetOutput(0, b.p.y_shape);
  return b;
}

// ---- CPU --------------------------------------------------------------------------------------
void OrtParallel(void* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
  static_cast<Ort::KernelContext*>(ctx)->ParallelFor(fn, total, 0, data);
}

template <typename T>
struct CpuKernel {
  MaskAttributes attrs;
  void Init(const OrtKernelInfo* /*info*/) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kSparseMatMul, [&] {
      Ort::KernelContext ctx(context);
      Bound b = Bind(ctx, attrs);
      std::vector<MemberRule> rules((size_t)b.spans.count());
      const float* t = b.t != nullptr ? b.t.GetTensorData<float>() : nullptr;
      const float* scale = b.scale != nullptr ? b.scale.GetTensorData<float>() : nullptr;
      for (size_t g = 0; g < rules.size(); ++g) {
        MemberRule& r = rules[g];
        r.mode = attrs.mode;
        r.ramp = attrs.ramp;
        if (attrs.mode == Mode::kThreshold) r.threshold = t[b.threshold_count == 1 ? 0 : g];
        else r.k = attrs.ks[g];
        if (scale != nullptr) r.scale = scale + (b.scale_rows == 1 ? 0 : (int64_t)g * b.p.K);
      }
      using S = typename std::conditional<std::is_same<T, float>::value, float, uint16_t>::type;
      std::vector<S> activated;  // with activation "swiglu": silu(gate) * up [M, K]
      const S* x = ActivatedRowsCpu<S>(attrs.activation, reinterpret_cast<const S*>(b.x.GetTensorRawData()), b.p.M, b.p.K, activated);
      SparseMatMulCpu<S>(x, reinterpret_cast<const S*>(b.w.GetTensorRawData()),
                         reinterpret_cast<S*>(b.y.GetTensorMutableRawData()), b.p, rules, b.spans, &OrtParallel, &ctx);
    });
  }
};

#ifdef ACTTAIL_WITH_CUDA
// ---- CUDA -------------------------------------------------------------------------------------
/// Device memory from ORT's allocator for the input's device, freed when it goes out of scope.
struct Scratch {
  OrtAllocator* alloc = nullptr;
  void* ptr = nullptr;
  Scratch(Ort::KernelContext& ctx, const Ort::ConstValue& like, size_t bytes) {
    if (bytes == 0) return;
    auto info = like.GetTensorMemoryInfo();
    alloc = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(info));
    if (alloc == nullptr) throw std::runtime_error("no device allocator for the workspace");
    ptr = alloc->Alloc(alloc, bytes);
    if (ptr == nullptr) throw std::runtime_error("could not allocate " + std::to_string(bytes) + " bytes of workspace");
  }
  ~Scratch() {
    if (ptr != nullptr) alloc->Free(alloc, ptr);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

template <typename T>
struct CudaKernel {
  MaskAttributes attrs;
  bool w_finite = false;  // W is a constant input without Inf/NaN, checked once here (CudaPlan::w_finite)
  void Init(const OrtKernelInfo* info) {
    const DeviceConstant w = ConstantDeviceInput(info, 1);
    if (w.data == nullptr) return;
    bool nonfinite = true;
    const std::string err = NonFiniteWeights(std::is_same<T, Ort::Float16_t>::value, w.data, w.count, &nonfinite);
    w_finite = err.empty() && !nonfinite;  // a failed check keeps the guard (it is an optimization, not a requirement)
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kSparseMatMul, [&] {
      Ort::KernelContext ctx(context);
      Bound b = Bind(ctx, attrs);
      CudaArgs args;
      args.x = b.x.GetTensorRawData();
      args.w = b.w.GetTensorRawData();
      args.y = b.y.GetTensorMutableRawData();
      args.thresholds = b.t != nullptr ? b.t.GetTensorData<float>() : nullptr;
      args.threshold_count = b.threshold_count;
      args.scale = b.scale != nullptr ? b.scale.GetTensorData<float>() : nullptr;
      args.scale_rows = b.scale_rows;
      args.stream = ctx.GetGPUComputeStream();
      args.M = b.p.M;
      args.K = b.p.K;
      args.N = b.p.N;
      args.mode = attrs.mode;
      args.ramp = attrs.ramp;
      args.swiglu = attrs.activation == Activation::kSwiGlu;
      args.G = b.spans.count();
      for (int g = 0; g < args.G; ++g) {
        args.begin[g] = b.spans.begin[g];
        args.end[g] = b.spans.end[g];
        args.k[g] = attrs.mode == Mode::kTopK ? attrs.ks[g] : 0;
      }
      const bool half = std::is_same<T, Ort::Float16_t>::value;
      CudaPlan plan = DefaultPlan(half, args);
      plan.w_finite = w_finite;
      Scratch scratch(ctx, b.x, CudaWorkspaceBytes(args, plan));
      args.workspace = scratch.ptr;
      const std::string err = SparseMatMulCuda(half, args, plan);
      if (!err.empty()) throw std::runtime_error(attrs.Where() + "CUDA error: " + err);
    });
  }
};
#endif

// ---- op schema --------------------------------------------------------------------------------
template <typename T, template <typename> class Kernel, bool kCuda>
struct SparseMatMulOp : Ort::CustomOpBase<SparseMatMulOp<T, Kernel, kCuda>, Kernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return Guard(kSparseMatMul, [&] {
      auto k = std::make_unique<Kernel<T>>();
      k->attrs = ParseMaskAttributes(info, kSparseMatMul, kThresholdInput);
      k->Init(info);
      *kernel = k.release();
    });
  }
  const char* GetName() const { return kSparseMatMul; }
  const char* GetExecutionProviderType() const { return kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i >= kThresholdInput ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ElementType<T>(); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= kThresholdInput ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ElementType<T>(); }
};

}  // namespace

void AppendSparseMatMulOps(std::vector<const OrtCustomOp*>& ops) {
  // one instance of each kernel, never destroyed: sessions may outlive static destruction
  static const auto* cpu_f32 = new SparseMatMulOp<float, CpuKernel, false>();
  static const auto* cpu_f16 = new SparseMatMulOp<Ort::Float16_t, CpuKernel, false>();
  ops.push_back(cpu_f32);
  ops.push_back(cpu_f16);
#ifdef ACTTAIL_WITH_CUDA
  static const auto* cuda_f32 = new SparseMatMulOp<float, CudaKernel, true>();
  static const auto* cuda_f16 = new SparseMatMulOp<Ort::Float16_t, CudaKernel, true>();
  ops.push_back(cuda_f32);
  ops.push_back(cuda_f16);
#endif
}

}  // namespace acttail
