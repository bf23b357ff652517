// ONNX Runtime glue of com.acttail::SparseMatMulNBits: attribute parsing and validation (session creation),
// shape checks (every run), the CPU kernel (float, float16) and, in CUDA builds, the CUDA kernel (float,
// float16). Registered into the com.acttail domain by AddOps (called from RegisterCustomOps).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "sparse_matmul_nbits/op.h"

namespace acttail {
namespace nbits {

namespace {

std::string Dims(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

}  // namespace

Attributes ParseAttributes(const AttributeReader& r, const std::string& node, size_t input_count) {
  Attributes a;
  a.node = node;
  const std::string where = std::string(kOpName) + " node '" + node + "': ";
  auto fail = [&](const std::string& msg) { throw InvalidArgument(where + msg); };
  std::string mode;
  if (!r.String("mode", &mode)) fail("attribute 'mode' is required (\"threshold\" or \"topk\")");
  if (mode == "threshold") {
    a.mode = Mode::kThreshold;
  } else if (mode == "topk") {
    a.mode = Mode::kTopK;
  } else {
    fail("attribute mode must be \"threshold\" or \"topk\", got \"" + mode + "\"");
  }
  if (!r.Int("K", &a.K) || !r.Int("N", &a.N)) fail("the int attributes 'K' (input features) and 'N' (output features) are required");
  if (a.K < 0 || a.N < 0 || a.K > INT32_MAX || a.N > INT32_MAX)
    fail("attributes K=" + std::to_string(a.K) + ", N=" + std::to_string(a.N) + " must be in 0..2^31-1");
  if (!r.Int("block_size", &a.block)) fail("the int attribute 'block_size' is required (rows of K per scale, a power of two >= 16)");
  if (a.block < 16 || a.block > (1 << 20) || (a.block & (a.block - 1)) != 0)
    fail("attribute block_size must be a power of two >= 16, got " + std::to_string(a.block));
  int64_t bits = 4;
  if (r.Int("bits", &bits) && bits != 4) fail("attribute bits must be 4 (only 4-bit weights are supported), got " + std::to_string(bits));
  if (!r.Ints("segments", &a.ends)) a.ends = {a.N};
  if (a.ends.empty() || (int)a.ends.size() > kMaxMembers)
    fail("attribute segments must hold 1.." + std::to_string(kMaxMembers) + " cumulative column ends, got " + std::to_string(a.ends.size()));
  for (size_t g = 0; g < a.ends.size(); ++g) {
    const int64_t lo = g == 0 ? 0 : a.ends[g - 1];
    if (a.ends[g] <= lo && !(a.ends.size() == 1 && a.N == 0))
      fail("attribute segments must be strictly increasing positive column ends, got " + Dims(a.ends));
  }
  if (a.ends.back() != a.N) fail("the last entry of segments (" + std::to_string(a.ends.back()) + ") must equal N=" + std::to_string(a.N));
  const int G = a.Members();
  int64_t k = 0;
  const bool has_k = r.Int("k", &k);
  std::vector<int64_t> ks;
  const bool has_ks = r.Ints("ks", &ks);
  if (a.mode == Mode::kTopK) {
    if (has_k && has_ks) fail("give either 'k' (every member) or 'ks' (one per member), not both");
    if (!has_k && !has_ks) fail("topk mode needs the int attribute 'k' (channels kept per row) or the ints 'ks' (one per member)");
    if (has_ks && (int)ks.size() != G)
      fail("attribute ks has " + std::to_string(ks.size()) + " entries but segments define " + std::to_string(G) + " members");
    a.ks = has_ks ? ks : std::vector<int64_t>((size_t)G, k);
    for (int64_t v : a.ks)
      if (v < 0 || v > a.K) fail("channels kept per row must be in 0..K=" + std::to_string(a.K) + ", got " + std::to_string(v));
  } else if (input_count < 5) {
    fail("threshold mode needs the 5th input (float32 thresholds, [] / [1] / [G]); add it or use mode=\"topk\"");
  }
  if (r.Float("ramp", &a.ramp) && (!std::isfinite(a.ramp) || a.ramp < 0.0f))
    fail("attribute ramp must be a finite number >= 0 (0 = hard mask), got " + std::to_string(a.ramp));
  return a;
}

Problem CheckShapes(const Attributes& a, const std::vector<int64_t>& x, const std::vector<int64_t>& q,
                    const std::vector<int64_t>& scales, const std::vector<int64_t>& offsets, const std::vector<int64_t>* thresholds,
                    const std::vector<int64_t>* scale) {
  const std::string where = std::string(kOpName) + " node '" + a.node + "': ";
  auto fail = [&](const std::string& msg) { throw InvalidArgument(where + msg); };
  Problem p;
  p.K = a.K;
  p.N = a.N;
  p.B = a.block;
  p.blocks = (a.K + a.block - 1) / a.block;
  if (x.empty()) fail("X must have rank >= 1 ([..., K]), got a scalar");
  if (x.back() != a.K) fail("last dimension of X (" + std::to_string(x.back()) + ") must equal the attribute K=" + std::to_string(a.K));
  p.M = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) p.M *= x[i];
  p.y_shape.assign(x.begin(), x.end() - 1);
  p.y_shape.push_back(a.N);
  const std::vector<int64_t> want_q{a.K, (a.N + 1) / 2}, want_s{p.blocks, a.N};
  if (q != want_q) fail("Q must be uint8 " + Dims(want_q) + " ([K, ceil(N/2)], two 4-bit values per byte), got " + Dims(q));
  if (scales != want_s) fail("scales must be " + Dims(want_s) + " ([ceil(K/block_size), N]), got " + Dims(scales));
  if (offsets != want_s) fail("offsets must be " + Dims(want_s) + " ([ceil(K/block_size), N]), got " + Dims(offsets));
  const int64_t G = a.Members();
  if (a.mode == Mode::kThreshold) {
    if (thresholds == nullptr) fail("threshold mode needs the 5th input (float32 thresholds, [] / [1] / [G])");
    int64_t n = 1;
    for (int64_t d : *thresholds) n *= d;
    if (thresholds->size() > 1 || (n != 1 && n != G))
      fail("thresholds must be [], [1] or [G=" + std::to_string(G) + "] float32, got " + Dims(*thresholds));
    p.thresholds = n;
  }
  if (scale != nullptr) {
    const bool shared = scale->size() == 1 && (*scale)[0] == a.K;
    const bool per_member = scale->size() == 2 && (*scale)[0] == G && (*scale)[1] == a.K;
    if (!shared && !per_member)
      fail("scale must be float32 [K=" + std::to_string(a.K) + "] or [G=" + std::to_string(G) + ", K], got " + Dims(*scale));
    p.scale_rows = shared ? 1 : G;
  }
  return p;
}

int RuleGroups(const Attributes& a, const Problem& p) {
  const int G = a.Members();
  if (G == 1 || p.scale_rows > 1) return G;
  if (a.mode == Mode::kThreshold) return p.thresholds > 1 ? G : 1;
  for (int64_t v : a.ks)
    if (v != a.ks[0]) return G;
  return 1;
}

namespace {

OrtStatusPtr MakeStatus(OrtErrorCode code, const std::string& msg) { return Ort::GetApi().CreateStatus(code, msg.c_str()); }

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
    return MakeStatus(ORT_FAIL, std::string(kOpName) + ": " + e.what());
  }
}

/// Reads attributes through the C API (absent attribute: false; a wrong attribute type is an error).
class InfoReader : public AttributeReader {
 public:
  explicit InfoReader(const OrtKernelInfo* info) : info_(info), api_(Ort::GetApi()) {}
  bool Int(const char* name, int64_t* out) const override { return Ok(api_.KernelInfoGetAttribute_int64(info_, name, out)); }
  bool Float(const char* name, float* out) const override { return Ok(api_.KernelInfoGetAttribute_float(info_, name, out)); }
  bool Ints(const char* name, std::vector<int64_t>* out) const override {
    size_t n = 0;
    if (!Ok(api_.KernelInfoGetAttributeArray_int64(info_, name, nullptr, &n))) return false;
    out->assign(n, 0);
    return n == 0 || Ok(api_.KernelInfoGetAttributeArray_int64(info_, name, out->data(), &n));
  }
  bool String(const char* name, std::string* out) const override {
    size_t n = 0;
    if (!Ok(api_.KernelInfoGetAttribute_string(info_, name, nullptr, &n))) return false;
    out->assign(n, '\0');
    if (!Ok(api_.KernelInfoGetAttribute_string(info_, name, out->data(), &n))) return false;
    if (!out->empty() && out->back() == '\0') out->pop_back();
    return true;
  }

 private:
  bool Ok(OrtStatus* st) const {
    if (st == nullptr) return true;
    api_.ReleaseStatus(st);
    return false;
  }
  const OrtKernelInfo* info_;
  const OrtApi& api_;
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

template <typename T>
constexpr ONNXTensorElementDataType ElementType() {
  return std::is_same<T, float>::value ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

/// The inputs of one run, validated.
struct Bound {
  Problem p;
  Ort::ConstValue x, q, scales, offsets, thresholds, scale;
  Ort::UnownedValue y;
};

std::vector<int64_t> ShapeOf(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

Bound Bind(Ort::KernelContext& ctx, const Attributes& a) {
  Bound b;
  b.x = ctx.GetInput(0);
  b.q = ctx.GetInput(1);
  b.scales = ctx.GetInput(2);
  b.offsets = ctx.GetInput(3);
  const size_t n = ctx.GetInputCount();
  if (n > 4) b.thresholds = ctx.GetInput(4);
  if (n > 5) b.scale = ctx.GetInput(5);
  std::vector<int64_t> t_shape, s_shape;
  if (b.thresholds != nullptr) t_shape = ShapeOf(b.thresholds);
  if (b.scale != nullptr) s_shape = ShapeOf(b.scale);
  b.p = CheckShapes(a, ShapeOf(b.x), ShapeOf(b.q), ShapeOf(b.scales), ShapeOf(b.offsets),
                    a.mode == Mode::kThreshold && b.thresholds != nullptr ? &t_shape : nullptr, b.scale != nullptr ? &s_shape : nullptr);
  b.y = ctx.GetOutput(0, b.p.y_shape);
  return b;
}

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
      using S = typename std::conditional<std::is_same<T, float>::value, float, uint16_t>::type;
      CpuRun<S>(attrs, b.p, static_cast<const S*>(b.x.GetTensorRawData()), b.q.GetTensorData<uint8_t>(),
                static_cast<const S*>(b.scales.GetTensorRawData()), static_cast<const S*>(b.offsets.GetTensorRawData()),
                attrs.mode == Mode::kThreshold ? b.thresholds.GetTensorData<float>() : nullptr,
                b.scale != nullptr ? b.scale.GetTensorData<float>() : nullptr, static_cast<S*>(b.y.GetTensorMutableRawData()),
                &OrtParallel, &ctx);
    });
  }
};

#ifdef ACTTAIL_WITH_CUDA
template <typename T>
struct CudaKernel {
  Attributes attrs;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard([&] {
      Ort::KernelContext ctx(context);
      Bound b = Bind(ctx, attrs);
      const bool half = std::is_same<T, Ort::Float16_t>::value;
      CudaArgs args;
      args.x = b.x.GetTensorRawData();
      args.q = b.q.GetTensorData<uint8_t>();
      args.scales = b.scales.GetTensorRawData();
      args.offsets = b.offsets.GetTensorRawData();
      args.thresholds = attrs.mode == Mode::kThreshold ? b.thresholds.GetTensorData<float>() : nullptr;
      args.scale = b.scale != nullptr ? b.scale.GetTensorData<float>() : nullptr;
      args.y = b.y.GetTensorMutableRawData();
      args.stream = ctx.GetGPUComputeStream();
      const size_t bytes = CudaWorkspaceBytes(attrs, b.p, half);
      std::unique_ptr<void, std::function<void(void*)>> scratch(nullptr, [](void*) {});
      if (bytes > 0) {
        OrtAllocator* alloc = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(b.x.GetTensorMemoryInfo()));
        if (alloc == nullptr) throw std::runtime_error("no device allocator for the workspace");
        void* ptr = alloc->Alloc(alloc, bytes);
        if (ptr == nullptr) throw std::runtime_error("could not allocate " + std::to_string(bytes) + " bytes of workspace");
        scratch = std::unique_ptr<void, std::function<void(void*)>>(ptr, [alloc](void* q) { alloc->Free(alloc, q); });
        args.workspace = ptr;
      }
      const std::string err = CudaRun(half, attrs, b.p, args);
      if (!err.empty()) throw std::runtime_error(std::string(kOpName) + " node '" + attrs.node + "': CUDA error: " + err);
    });
  }
};
#endif

template <typename T, template <typename> class Kernel, bool kCuda>
struct Op : Ort::CustomOpBase<Op<T, Kernel, kCuda>, Kernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] {
      size_t inputs = 0;
      Ort::ThrowOnError(Ort::GetApi().KernelInfo_GetInputCount(info, &inputs));
      auto k = std::make_unique<Kernel<T>>();
      k->attrs = ParseAttributes(InfoReader(info), NodeName(info), inputs);
      *kernel = k.release();
    });
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : i >= 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ElementType<T>();
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ElementType<T>(); }
};

struct Ops {
  Op<float, CpuKernel, false> cpu_f32;
  Op<Ort::Float16_t, CpuKernel, false> cpu_f16;
#ifdef ACTTAIL_WITH_CUDA
  Op<float, CudaKernel, true> cuda_f32;
  Op<Ort::Float16_t, CudaKernel, true> cuda_f16;
#endif
};

}  // namespace

/// Add the SparseMatMulNBits kernels to `domain` (the com.acttail domain of RegisterCustomOps).
void AddOps(Ort::CustomOpDomain& domain) {
  static Ops* ops = new Ops();  // never destroyed: sessions may outlive static destruction
  domain.Add(&ops->cpu_f32);
  domain.Add(&ops->cpu_f16);
#ifdef ACTTAIL_WITH_CUDA
  domain.Add(&ops->cuda_f32);
  domain.Add(&ops->cuda_f16);
#endif
}

}  // namespace nbits
}  // namespace acttail
