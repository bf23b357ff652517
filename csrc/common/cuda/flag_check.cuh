// One-time device checks (when a kernel is created): run a flagging kernel over device data on a private stream of
// the data's device and read the flag back, synchronously. Not for the compute path (it waits for the device).
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace acttail {
namespace cuda {

/// Runs `launch(flag, stream)` (a kernel that sets *flag = 1 when it finds what it looks for) on a private stream of
/// `ptr`'s device; *found = the flag. Returns "" or the CUDA error text (then *found is true: nothing is assumed).
template <typename Launch>
std::string RunFlagCheck(const void* ptr, Launch launch, bool* found) {
  *found = true;
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) return std::string("pointer attributes: ") + cudaGetErrorString(err);
  if (attr.type != cudaMemoryTypeDevice) return "";  // not device memory: nothing to check here
  int previous = 0;
  err = cudaGetDevice(&previous);
  if (err == cudaSuccess && attr.device != previous) err = cudaSetDevice(attr.device);
  if (err != cudaSuccess) return std::string("device of the weights: ") + cudaGetErrorString(err);
  cudaStream_t stream = nullptr;
  unsigned* flag = nullptr;
  unsigned host = 1;
  err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaMalloc(&flag, sizeof(unsigned));
  if (err == cudaSuccess) err = cudaMemsetAsync(flag, 0, sizeof(unsigned), stream);
  if (err == cudaSuccess) err = launch(flag, stream);
  if (err == cudaSuccess) err = cudaMemcpyAsync(&host, flag, sizeof(unsigned), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  const cudaError_t freed = flag != nullptr ? cudaFree(flag) : cudaSuccess;
  const cudaError_t destroyed = stream != nullptr ? cudaStreamDestroy(stream) : cudaSuccess;
  const cudaError_t restored = attr.device != previous ? cudaSetDevice(previous) : cudaSuccess;
  for (cudaError_t e : {freed, destroyed, restored})
    if (err == cudaSuccess) err = e;
  if (err != cudaSuccess) return std::string("weight check: ") + cudaGetErrorString(err);
  *found = host != 0;
  return "";
}

}  // namespace cuda
}  // namespace acttail
