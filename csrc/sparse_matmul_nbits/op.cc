// com.acttail::SparseMatMulNBits: definition and ONNX Runtime binding (CPU and, in CUDA builds, CUDA kernels,
// float and float16 each). Domain com.acttail, opset 1.
//
// Inputs:  X T[..., K]; Q uint8 [K, ceil(N/2)]; scales T [ceil(K/B), N]; offsets T [ceil(K/B), N];
//          thresholds float32 [] / [1] / [G] (optional; threshold mode needs it);
//          scale float32 [K] or [G, K] (optional: scores |x| * scale).
// Attributes: K, N (ints), block_size (B: a power of two >= 16), bits (4, the only value); mode "threshold" |
//          "topk"; k (int) or ks (ints, one per member); segments (ints, optional: cumulative output-column ends of
//          the G members, last == N); ramp (float, default 0); density (float in [0, 1], optional: the expected
//          fraction of input channels kept, which picks the CUDA decode loop; results do not depend on it).
// Output:  Y T[..., N].
#include <cstdio>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/attributes.h"
#include "common/constant_input.h"
#include "common/status.h"
#include "sparse_matmul_nbits/op.h"

namespace acttail {
namespace nbits {
namespace {

template <typename T>
constexpr ONNXTensorElementDataType ElementType() {
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

std::string Dims(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

/// Attributes of one node, parsed and checked when the session is created.
struct NBitsAttributes {
  MaskAttributes mask;
  Shape shape;
  MemberSpans spans;
  float density = -1.0f;  // the expected kept fraction (attribute density), < 0: not given
};

std::string ShortFloat(float v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", (double)v);
  return buf;
}

int64_t RequiredInt(const OrtKernelInfo* info, const char* name, const std::string& where, const char* what) {
  int64_t v = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
  if (st != nullptr) {
    Ort::GetApi().ReleaseStatus(st);
    throw InvalidArgument(where + "the int attribute '" + name + "' (" + what + ") is required");
  }
  return v;
}

NBitsAttributes ParseAttributes(const OrtKernelInfo* info) {
  NBitsAttributes a;
  a.mask = ParseMaskAttributes(info, kOpName, kThresholdInput);
  const std::string where = a.mask.Where();
  a.shape.K = RequiredInt(info, "K", where, "input features");
  a.shape.N = RequiredInt(info, "N", where, "output features");
  if (a.shape.K < 0 || a.shape.N < 0 || a.shape.K > INT32_MAX || a.shape.N > INT32_MAX)
    throw InvalidArgument(where + "attributes K=" + std::to_string(a.shape.K) + ", N=" + std::to_string(a.shape.N) +
                          " must be in 0..2^31-1");
  a.shape.B = RequiredInt(info, "block_size", where, "rows of K per scale, a power of two >= 16");
  if (a.shape.B < 16 || a.shape.B > (1 << 20) || (a.shape.B & (a.shape.B - 1)) != 0)
    throw InvalidArgument(where + "attribute block_size must be a power of two >= 16, got " + std::to_string(a.shape.B));
  int64_t bits = 4;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, "bits", &bits);
  if (st != nullptr) Ort::GetApi().ReleaseStatus(st);
  if (bits != 4) throw InvalidArgument(where + "attribute bits must be 4 (only 4-bit weights are supported), got " + std::to_string(bits));
  a.spans = CheckMembers(a.mask, a.shape.K, a.shape.N);  // segments against N, every k against K
  if (ReadFloat(info, "density", a.density) && !(a.density >= 0.0f && a.density <= 1.0f))
    throw InvalidArgument(where + "attribute density (the expected fraction of input channels kept) must be in [0, 1], got " +
                          ShortFloat(a.density));
  return a;
}

std::vector<int64_t> ShapeOf(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

/// The inputs of one run, validated.
struct Bound {
  Problem p;
  Ort::ConstValue x, q, scales, offsets, t, scale;
  Ort::UnownedValue y;
};

Bound Bind(Ort::KernelContext& ctx, const NBitsAttributes& a) {
  Bound b;
  const std::string where = a.mask.Where();
  b.x = ctx.GetInput(0);
  b.q = ctx.GetInput(1);
  b.scales = ctx.GetInput(2);
  b.offsets = ctx.GetInput(3);
  const size_t inputs = ctx.GetInputCount();
  if (inputs > kThresholdInput) b.t = ctx.GetInput(kThresholdInput);
  if (inputs > kScaleInput) b.scale = ctx.GetInput(kScaleInput);
  Problem& p = b.p;
  p.K = a.shape.K;
  p.N = a.shape.N;
  p.B = a.shape.B;
  p.blocks = a.shape.Blocks();
  p.spans = a.spans;
  p.density = a.density;
  const std::vector<int64_t> x = ActivatedShape(a.mask, ShapeOf(b.x), p.K);  // swiglu: [..., 2K] -> [..., K]
  if (x.empty()) throw InvalidArgument(where + "X must have rank >= 1 ([..., K]), got a scalar");
  if (x.back() != p.K)
    throw InvalidArgument(where + "last dimension of X (" + std::to_string(x.back()) + ") must equal the attribute K=" +
                          std::to_string(p.K));
  p.M = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) p.M *= x[i];
  p.y_shape.assign(x.begin(), x.end() - 1);
  p.y_shape.push_back(p.N);
  const std::vector<int64_t> want_q{p.K, (p.N + 1) / 2}, want_s{p.blocks, p.N};
  if (ShapeOf(b.q) != want_q)
    throw InvalidArgument(where + "Q must be uint8 " + Dims(want_q) + " ([K, ceil(N/2)], two 4-bit values per byte), got " +
                          Dims(ShapeOf(b.q)));
  if (ShapeOf(b.scales) != want_s)
    throw InvalidArgument(where + "scales must be " + Dims(want_s) + " ([ceil(K/block_size), N]), got " + Dims(ShapeOf(b.scales)));
  if (ShapeOf(b.offsets) != want_s)
    throw InvalidArgument(where + "offsets must be " + Dims(want_s) + " ([ceil(K/block_size), N]), got " + Dims(ShapeOf(b.offsets)));
  if (a.mask.mode == Mode::kThreshold) {
    if (b.t == nullptr) throw InvalidArgument(where + "threshold mode needs the 5th input (float32 thresholds)");
    p.threshold_count = (int64_t)b.t.GetTensorTypeAndShapeInfo().GetElementCount();
    CheckThresholdCount(a.mask, p.threshold_count);
  }
  if (b.scale != nullptr) p.scale_rows = CheckScaleShape(a.mask, ShapeOf(b.scale), p.K);
  b.y = ctx.GetOutput(0, p.y_shape);
  return b;
}

/// The host-side rule of every member (threshold values are read from host memory: CPU only).
std::vector<MemberRule> Rules(const NBitsAttributes& a, const Bound& b) {
  std::vector<MemberRule> rules((size_t)b.p.spans.count());
  const float* t = b.t != nullptr ? b.t.GetTensorData<float>() : nullptr;
  const float* scale = b.scale != nullptr ? b.scale.GetTensorData<float>() : nullptr;
  for (size_t g = 0; g < rules.size(); ++g) {
    MemberRule& r = rules[g];
    r.mode = a.mask.mode;
    r.ramp = a.mask.ramp;
    if (a.mask.mode == Mode::kThreshold) r.threshold = t[b.p.threshold_count == 1 ? 0 : g];
    else r.k = a.mask.ks[g];
    if (scale != nullptr) r.scale = scale + (b.p.scale_rows == 1 ? 0 : (int64_t)g * b.p.K);
  }
  return rules;
}

void OrtParallel(void* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
  static_cast<Ort::KernelContext*>(ctx)->ParallelFor(fn, total, 0, data);
}

template <typename T>
struct CpuKernel {
  NBitsAttributes attrs;
  void Init(const OrtKernelInfo* /*info*/) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kOpName, [&] {
      Ort::KernelContext ctx(context);
      Bound b = Bind(ctx, attrs);
      using S = typename std::conditional<std::is_same<T, float>::value, float, uint16_t>::type;
      std::vector<S> activated;  // with activation "swiglu": silu(gate) * up [M, K]
      const S* x = ActivatedRowsCpu<S>(attrs.mask.activation, static_cast<const S*>(b.x.GetTensorRawData()), b.p.M, b.p.K, activated);
      CpuRun<S>(b.p, Rules(attrs, b), x, b.q.GetTensorData<uint8_t>(),
                static_cast<const S*>(b.scales.GetTensorRawData()), static_cast<const S*>(b.offsets.GetTensorRawData()),
                static_cast<S*>(b.y.GetTensorMutableRawData()), &OrtParallel, &ctx);
    });
  }
};

#ifdef ACTTAIL_WITH_CUDA
/// Device memory from ORT's allocator for the input's device, freed when it goes out of scope.
struct Workspace {
  OrtAllocator* alloc = nullptr;
  void* ptr = nullptr;
  Workspace(Ort::KernelContext& ctx, const Ort::ConstValue& like, size_t bytes) {
    if (bytes == 0) return;
    alloc = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(like.GetTensorMemoryInfo()));
    if (alloc == nullptr) throw std::runtime_error("no device allocator for the workspace");
    ptr = alloc->Alloc(alloc, bytes);
    if (ptr == nullptr) throw std::runtime_error("could not allocate " + std::to_string(bytes) + " bytes of workspace");
  }
  ~Workspace() {
    if (ptr != nullptr) alloc->Free(alloc, ptr);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
};

template <typename T>
struct CudaKernel {
  NBitsAttributes attrs;
  bool w_finite = false;  // scales and offsets are constant inputs whose dequantized W has no Inf/NaN (CudaPlan::w_finite)
  void Init(const OrtKernelInfo* info) {
    const DeviceConstant scales = ConstantDeviceInput(info, 2), offsets = ConstantDeviceInput(info, 3);
    if (scales.data == nullptr || offsets.data == nullptr || scales.count != offsets.count) return;
    bool nonfinite = true;
    const std::string err =
        NonFiniteDequantized(std::is_same<T, Ort::Float16_t>::value, scales.data, offsets.data, scales.count, &nonfinite);
    w_finite = err.empty() && !nonfinite;  // a failed check keeps the guard (it is an optimization, not a requirement)
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kOpName, [&] {
      Ort::KernelContext ctx(context);
      Bound b = Bind(ctx, attrs);
      const bool half = std::is_same<T, Ort::Float16_t>::value;
      CudaArgs args;
      args.x = b.x.GetTensorRawData();
      args.q = b.q.GetTensorData<uint8_t>();
      args.scales = b.scales.GetTensorRawData();
      args.offsets = b.offsets.GetTensorRawData();
      args.thresholds = b.t != nullptr && attrs.mask.mode == Mode::kThreshold ? b.t.GetTensorData<float>() : nullptr;
      args.scale = b.scale != nullptr ? b.scale.GetTensorData<float>() : nullptr;
      args.y = b.y.GetTensorMutableRawData();
      args.stream = ctx.GetGPUComputeStream();
      args.mode = attrs.mask.mode;
      args.ramp = attrs.mask.ramp;
      args.swiglu = attrs.mask.activation == Activation::kSwiGlu;
      args.ks = attrs.mask.ks;
      CudaPlan plan = DefaultPlan(b.p, half);
      plan.w_finite = w_finite;
      Workspace ws(ctx, b.x, CudaWorkspaceBytes(b.p, args, plan, half));
      args.workspace = ws.ptr;
      const std::string err = CudaRun(half, b.p, args, plan);
      if (!err.empty()) throw std::runtime_error(attrs.mask.Where() + "CUDA error: " + err);
    });
  }
};
#endif

template <typename T, template <typename> class Kernel, bool kCuda>
struct NBitsOp : Ort::CustomOpBase<NBitsOp<T, Kernel, kCuda>, Kernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return Guard(kOpName, [&] {
      auto k = std::make_unique<Kernel<T>>();
      k->attrs = ParseAttributes(info);
      k->Init(info);
      *kernel = k.release();
    });
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : i >= kThresholdInput ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ElementType<T>();
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= kThresholdInput ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ElementType<T>(); }
};

}  // namespace
}  // namespace nbits

void AppendSparseMatMulNBitsOps(std::vector<const OrtCustomOp*>& ops) {
  // one instance of each kernel, never destroyed: sessions may outlive static destruction
  static const auto* cpu_f32 = new nbits::NBitsOp<float, nbits::CpuKernel, false>();
  static const auto* cpu_f16 = new nbits::NBitsOp<Ort::Float16_t, nbits::CpuKernel, false>();
  ops.push_back(cpu_f32);
  ops.push_back(cpu_f16);
#ifdef ACTTAIL_WITH_CUDA
  static const auto* cuda_f32 = new nbits::NBitsOp<float, nbits::CudaKernel, true>();
  static const auto* cuda_f16 = new nbits::NBitsOp<Ort::Float16_t, nbits::CudaKernel, true>();
  ops.push_back(cuda_f32);
  ops.push_back(cuda_f16);
#endif
}

}  // namespace acttail
