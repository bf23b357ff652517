// One-time device checks (when a kernel is created): run a flagging kernel over device data on a private stream of
// the data's device and read the flag back, synchronously. Not for the compute path (it waits for the device).
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace acttail {
namespace cuda {

/// Runs `launch(flag, stream)` (a kernel that sets *flag = 1 when it finds what it looks for) on a private stream of
/// `ptr`'s device, after the work already on the legacy default stream (ONNX Runtime's synchronous copies of the
/// initializers); *found = the flag. The thread's calls run in relaxed capture mode, so that they cannot end a CUDA-graph
/// capture of another thread. Returns "" or the CUDA error text, with the error cleared (then *found stays true:
/// nothing is assumed, the caller keeps its guard).
template <typename Launch>
std::string RunFlagCheck(const void* ptr, Launch launch, bool* found) {
  *found = true;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) {
    cudaGetLastError();
    return "capture mode";
  }
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  int previous = 0;
  if (err == cudaSuccess && attr.type == cudaMemoryTypeDevice) err = cudaGetDevice(&previous);
  const bool on_device = err == cudaSuccess && attr.type == cudaMemoryTypeDevice;  // else nothing to check here
  const bool switch_device = on_device && attr.device != previous;
  if (switch_device) err = cudaSetDevice(attr.device);
  cudaStream_t stream = nullptr;
  unsigned* flag = nullptr;
  unsigned host = 1;
  if (on_device && err == cudaSuccess) {
    err = cudaStreamSynchronize(cudaStreamLegacy);
    if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (err == cudaSuccess) err = cudaMalloc(&flag, sizeof(unsigned));
    if (err == cudaSuccess) err = cudaMemsetAsync(flag, 0, sizeof(unsigned), stream);
    if (err == cudaSuccess) err = launch(flag, stream);
    if (err == cudaSuccess) err = cudaMemcpyAsync(&host, flag, sizeof(unsigned), cudaMemcpyDeviceToHost, stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
    const cudaError_t freed = flag != nullptr ? cudaFree(flag) : cudaSuccess;
    const cudaError_t destroyed = stream != nullptr ? cudaStreamDestroy(stream) : cudaSuccess;
    for (cudaError_t e : {freed, destroyed})
      if (err == cudaSuccess) err = e;
  }
  const cudaError_t restored = switch_device ? cudaSetDevice(previous) : cudaSuccess;
  if (err == cudaSuccess) err = restored;
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (err != cudaSuccess) {
    cudaGetLastError();  // a failed check must not surface in a later, unrelated error query
    return std::string("weight check: ") + cudaGetErrorString(err);
  }
  if (on_device) *found = host != 0;
  return "";
}

}  // namespace cuda
}  // namespace acttail
