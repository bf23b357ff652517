// Errors of the op library: kernels throw InvalidArgument for bad input (one line, naming the node and
// the fix) and any other exception for failures; Guard turns both into an ORT status, so nothing
// escapes into ONNX Runtime as a C++ exception.
#pragma once

#include <stdexcept>
#include <string>

#include "common/ort.h"

namespace acttail {

/// Bad input; becomes an ORT_INVALID_ARGUMENT status.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline OrtStatusPtr MakeStatus(OrtErrorCode code, const std::string& msg) {
  return Ort::GetApi().CreateStatus(code, msg.c_str());
}

/// Run fn(); exceptions become statuses: InvalidArgument -> ORT_INVALID_ARGUMENT, Ort::Exception keeps its
/// code, anything else -> ORT_FAIL prefixed with `what`.
template <typename Fn>
OrtStatusPtr Guard(const char* what, Fn&& fn) {
  try {
    fn();
    return nullptr;
  } catch (const InvalidArgument& e) {
    return MakeStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return MakeStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return MakeStatus(ORT_FAIL, std::string(what) + ": " + e.what());
  }
}

/// Name of the node a kernel is created for ("?" when ORT cannot say).
std::string NodeName(const OrtKernelInfo* info);

}  // namespace acttail
