// Whether a stream is being captured into a CUDA graph, for host code that must not allocate, create handles or query
// kernels then (per-stream scratch, cuBLAS handles, the dependent-launch check).
#pragma once

#include <cuda_runtime.h>

namespace acttail {
namespace cuda {

/// The stream is being captured, or its capture status could not be read (that error is cleared): either way the caller
/// takes its capture-safe path.
inline bool StreamCapturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace cuda
}  // namespace acttail
