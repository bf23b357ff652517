#include "common/attributes.h"

#include <cmath>
#include <sstream>

#include "common/status.h"

namespace acttail {

std::string NodeName(const OrtKernelInfo* info) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &size);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return "?";
  }
  std::string name(size, '\0');
  st = api.KernelInfo_GetNodeName(info, name.data(), &size);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return "?";
  }
  if (!name.empty() && name.back() == '\0') name.pop_back();
  return name;
}

namespace {

std::string Join(const std::vector<int64_t>& v) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << "]";
  return s.str();
}

/// An optional ints attribute: true and `out` filled when present.
bool ReadInts(const OrtKernelInfo* info, const char* name, std::vector<int64_t>& out) {
  const OrtApi& api = Ort::GetApi();
  size_t n = 0;
  OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return false;
  }
  out.assign(n, 0);
  if (n > 0) Ort::ThrowOnError(api.KernelInfoGetAttributeArray_int64(info, name, out.data(), &n));
  return true;
}

bool ReadInt(const OrtKernelInfo* info, const char* name, int64_t& out) {
  const OrtApi& api = Ort::GetApi();
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &out);
  if (st == nullptr) return true;
  api.ReleaseStatus(st);
  return false;
}


/// An optional string attribute: true and `out` filled when present.
bool ReadString(const OrtKernelInfo* info, const char* name, std::string& out) {
  const OrtApi& api = Ort::GetApi();
  size_t len = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &len);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return false;
  }
  out.assign(len, '\0');
  Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, name, out.data(), &len));
  if (!out.empty() && out.back() == '\0') out.pop_back();
  return true;
}

std::string ReadMode(const OrtKernelInfo* info, const std::string& where) {
  std::string mode;
  if (!ReadString(info, "mode", mode)) throw InvalidArgument(where + "attribute 'mode' is required (\"threshold\" or \"topk\")");
  return mode;
}

Activation ReadActivation(const OrtKernelInfo* info, const std::string& where) {
  std::string act;
  if (!ReadString(info, "activation", act) || act.empty()) return Activation::kNone;
  if (act == "swiglu") return Activation::kSwiGlu;
  throw InvalidArgument(where + "attribute activation must be \"swiglu\" or left out, got \"" + act + "\"");
}

void ParseSegments(const OrtKernelInfo* info, MaskAttributes& a) {
  if (!ReadInts(info, "segments", a.ends)) return;
  const std::string where = a.Where();
  if (a.ends.empty()) throw InvalidArgument(where + "attribute segments must not be empty (leave it out for one member)");
  if ((int64_t)a.ends.size() > kMaxMembers)
    throw InvalidArgument(where + "attribute segments has " + std::to_string(a.ends.size()) + " members; at most " +
                          std::to_string(kMaxMembers) + " are supported");
  int64_t prev = 0;
  for (int64_t e : a.ends) {
    if (e <= prev)
      throw InvalidArgument(where + "attribute segments must be strictly increasing positive column ends, got " + Join(a.ends));
    prev = e;
  }
}

void ParseTopK(const OrtKernelInfo* info, MaskAttributes& a) {
  const std::string where = a.Where();
  int64_t k = -1;
  const bool has_k = ReadInt(info, "k", k);
  a.ks_given = ReadInts(info, "ks", a.ks);
  if (has_k && a.ks_given) throw InvalidArgument(where + "give either attribute k or ks, not both");
  if (!has_k && !a.ks_given)
    throw InvalidArgument(where + "topk mode needs the int attribute 'k' (channels kept per row) or 'ks' (one per member)");
  if (has_k) {
    if (k < 0) throw InvalidArgument(where + "attribute k must be >= 0, got " + std::to_string(k));
    a.ks.assign((size_t)a.members(), k);
    return;
  }
  if ((int)a.ks.size() != a.members())
    throw InvalidArgument(where + "attribute ks has " + std::to_string(a.ks.size()) + " values but the node has " +
                          std::to_string(a.members()) + " member(s) (segments); give one k per member");
  for (size_t g = 0; g < a.ks.size(); ++g)
    if (a.ks[g] < 0) throw InvalidArgument(where + "attribute ks[" + std::to_string(g) + "] must be >= 0, got " + std::to_string(a.ks[g]));
}

}  // namespace

bool ReadFloat(const OrtKernelInfo* info, const char* name, float& out) {
  const OrtApi& api = Ort::GetApi();
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, &out);
  if (st == nullptr) return true;
  api.ReleaseStatus(st);
  return false;
}

MaskAttributes ParseMaskAttributes(const OrtKernelInfo* info, const char* op, size_t threshold_input) {
  MaskAttributes a;
  a.op = op;
  a.node = NodeName(info);
  const std::string where = a.Where();
  const std::string mode = ReadMode(info, where);
  ParseSegments(info, a);
  a.activation = ReadActivation(info, where);
  if (ReadFloat(info, "ramp", a.ramp) && !(std::isfinite(a.ramp) && a.ramp >= 0.0f))
    throw InvalidArgument(where + "attribute ramp must be a finite number >= 0, got " + std::to_string(a.ramp));
  if (mode == "threshold") {
    a.mode = Mode::kThreshold;
    size_t inputs = 0;
    Ort::ThrowOnError(Ort::GetApi().KernelInfo_GetInputCount(info, &inputs));
    if (inputs <= threshold_input)
      throw InvalidArgument(where + "threshold mode needs a " + (threshold_input == 2 ? "3rd" : std::to_string(threshold_input + 1) + "th") +
                            " input (float32 thresholds: one value, or one per member); add it or use mode=\"topk\"");
  } else if (mode == "topk") {
    a.mode = Mode::kTopK;
    ParseTopK(info, a);
  } else {
    throw InvalidArgument(where + "attribute mode must be \"threshold\" or \"topk\", got \"" + mode + "\"");
  }
  return a;
}

std::vector<int64_t> ActivatedShape(const MaskAttributes& a, std::vector<int64_t> x_shape, int64_t K) {
  if (a.activation == Activation::kNone || x_shape.empty()) return x_shape;
  if (x_shape.back() != 2 * K)
    throw InvalidArgument(a.Where() + "with activation=\"swiglu\" the last dimension of X must be 2*K=" + std::to_string(2 * K) +
                          " ([gate | up] for K=" + std::to_string(K) + " input features), got " + std::to_string(x_shape.back()));
  x_shape.back() = K;
  return x_shape;
}

MemberSpans CheckMembers(const MaskAttributes& a, int64_t K, int64_t N) {
  const std::string where = a.Where();
  MemberSpans s;
  if (a.ends.empty()) {
    s.begin = {0};
    s.end = {N};
  } else {
    if (a.ends.back() != N)
      throw InvalidArgument(where + "attribute segments ends at " + std::to_string(a.ends.back()) + " but W has N=" +
                            std::to_string(N) + " columns; the last end must equal N");
    int64_t prev = 0;
    for (int64_t e : a.ends) {
      s.begin.push_back(prev);
      s.end.push_back(e);
      prev = e;
    }
  }
  if (a.mode == Mode::kTopK) {
    for (size_t g = 0; g < a.ks.size(); ++g) {
      if (a.ks[g] <= K) continue;
      const std::string name = a.ks_given ? "ks[" + std::to_string(g) + "]" : "k";
      throw InvalidArgument(where + "attribute " + name + "=" + std::to_string(a.ks[g]) + " exceeds K=" + std::to_string(K) +
                            " (the last dimension of X); use k <= K");
    }
  }
  return s;
}

void CheckThresholdCount(const MaskAttributes& a, int64_t count) {
  if (count == 1 || count == a.members()) return;
  if (a.members() == 1)
    throw InvalidArgument(a.Where() + "threshold must hold exactly one float32 value, got " + std::to_string(count));
  throw InvalidArgument(a.Where() + "thresholds must hold 1 or " + std::to_string(a.members()) +
                        " float32 values (one per member), got " + std::to_string(count));
}

int64_t CheckScaleShape(const MaskAttributes& a, const std::vector<int64_t>& shape, int64_t K) {
  if (shape.size() == 1 && shape[0] == K) return 1;
  if (shape.size() == 2 && shape[1] == K && (shape[0] == 1 || shape[0] == a.members())) return shape[0];
  throw InvalidArgument(a.Where() + "scale must be float32 [K] or [G, K] = [" + std::to_string(a.members()) + ", " +
                        std::to_string(K) + "] (G members), got " + Join(shape));
}

}  // namespace acttail
