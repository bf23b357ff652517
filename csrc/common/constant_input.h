// Constant inputs (initializers) of a node as its kernel is created: the weights' one-time checks read them there
// (sparse_matmul / sparse_matmul_nbits: W known to be finite lets the cuBLAS prefill skip its Inf/NaN guard).
#pragma once

#include <cstdint>

#include "common/env.h"
#include "common/ort.h"

namespace acttail {

/// A constant input on a GPU: its data and element count (data is null when there is none to check).
struct DeviceConstant {
  const void* data = nullptr;
  int64_t count = 0;
};

/// Input `index` of the node when it is a constant initializer in GPU memory, else {null, 0}: not constant (a graph
/// input), in CPU memory, an ONNX Runtime that does not hand constant inputs to custom kernels, or the checks turned off
/// by ACTTAIL_WEIGHT_CHECK=0 (read when the kernel is created: the A/B switch of the benchmarks and tests).
inline DeviceConstant ConstantDeviceInput(const OrtKernelInfo* info, size_t index) {
  if (EnvIs("ACTTAIL_WEIGHT_CHECK", "0")) return {};
  try {
    int is_constant = 0;
    Ort::ConstValue value = Ort::ConstKernelInfo(info).GetTensorConstantInput(index, &is_constant);
    if (!is_constant || value == nullptr || !value.IsTensor()) return {};
    if (value.GetTensorMemoryInfo().GetDeviceType() != OrtMemoryInfoDeviceType_GPU) return {};
    return {value.GetTensorRawData(), (int64_t)value.GetTensorTypeAndShapeInfo().GetElementCount()};
  } catch (const Ort::Exception&) {
    return {};
  }
}

}  // namespace acttail
