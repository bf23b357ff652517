// Entry point of libacttail_ops.so, its only exported symbol (csrc/exports.map): RegisterCustomOps adds the
// com.acttail domain, holding every op of the library, to the session options it is called with.
#include <mutex>
#include <string>
#include <vector>

#include "common/cpu_isa.h"
#include "common/ort.h"
#include "common/status.h"

namespace acttail {

// Each op folder exposes one function that appends its kernels (one per execution provider and type).
void AppendSparseMatMulOps(std::vector<const OrtCustomOp*>& ops);     // csrc/sparse_matmul/op.cc
#ifdef ACTTAIL_WITH_NBITS
void AppendSparseMatMulNBitsOps(std::vector<const OrtCustomOp*>& ops);  // csrc/sparse_matmul_nbits/op.cc
#endif

namespace {

std::vector<const OrtCustomOp*> AllOps() {
  std::vector<const OrtCustomOp*> ops;
  AppendSparseMatMulOps(ops);
#ifdef ACTTAIL_WITH_NBITS  // defined by csrc/sparse_matmul_nbits/sources.cmake
  AppendSparseMatMulNBitsOps(ops);
#endif
  return ops;
}

/// Domains created so far: each must outlive every session that uses it, so they are never destroyed.
struct Domains {
  std::mutex mu;
  std::vector<Ort::CustomOpDomain> list;
};
Domains& GetDomains() {
  static Domains* d = new Domains();
  return *d;
}

}  // namespace
}  // namespace acttail

/// One com.acttail domain per call, added to `options`. Fails with a status (never a crash) when the
/// onnxruntime loading the library is older than the API version it was built against, or when
/// ACTTAIL_CPU_ISA holds an unknown value.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                              const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(acttail::kOrtApiVersion);
  if (api == nullptr) {  // too old for our API version: report through API 1, which every onnxruntime has
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg = "libacttail_ops needs ONNX Runtime C API version " + std::to_string(acttail::kOrtApiVersion) +
                            " (onnxruntime >= 1.20); this onnxruntime is " + api_base->GetVersionString();
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  return acttail::Guard("RegisterCustomOps", [&] {
    const std::string isa_error = acttail::CheckCpuIsaEnv();
    if (!isa_error.empty()) throw acttail::InvalidArgument("libacttail_ops: " + isa_error);
    auto& d = acttail::GetDomains();
    std::lock_guard<std::mutex> lock(d.mu);
    Ort::CustomOpDomain domain{acttail::kDomain};
    for (const OrtCustomOp* op : acttail::AllOps()) domain.Add(op);
    Ort::UnownedSessionOptions(options).Add(domain);
    d.list.push_back(std::move(domain));
  });
}
