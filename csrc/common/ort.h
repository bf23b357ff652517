// The ONNX Runtime C++ API as every translation unit of the library includes it: manual API init
// (RegisterCustomOps calls Ort::InitApi with the API it negotiated), so no TU may include
// onnxruntime_cxx_api.h directly.
#pragma once

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT
#endif
#include <onnxruntime_cxx_api.h>

namespace acttail {

/// ONNX Runtime C API version the library is built against and asks for (onnxruntime >= 1.20).
constexpr uint32_t kOrtApiVersion = ORT_API_VERSION;

/// Domain of every op of the library.
constexpr const char* kDomain = "com.acttail";

}  // namespace acttail
