// Programmatic dependent launch (sm_90+): a kernel launched with LaunchDependent may start its blocks before the
// previous kernel on the stream has finished; it must touch nothing that kernel writes or reads (activations, scratch,
// outputs) before GridDependencyWait(). A previous kernel of this library lets it start early with
// GridLaunchDependents(); any other kernel (ONNX Runtime's) lets it start when its blocks have exited. ACTTAIL_PDL=0
// turns it off (read per call).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <map>
#include <mutex>
#include <utility>

#include "common/cuda/stream_capture.h"
#include "common/env.h"

namespace acttail {
namespace cuda {

/// Waits until the kernels this one depends on have finished and their writes are visible (griddepcontrol.wait; returns
/// at once when the kernel was not launched as a programmatic dependent, and compiles to nothing before sm_90).
__device__ __forceinline__ void GridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/// Lets a kernel launched after this one as a programmatic dependent start its blocks now (griddepcontrol.launch_dependents;
/// nothing before sm_90). Its reads of this kernel's results still wait for the whole grid (GridDependencyWait).
__device__ __forceinline__ void GridLaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/// Programmatic dependent launch is asked for: on unless ACTTAIL_PDL=0.
inline bool DependentLaunchWanted() { return !EnvIs("ACTTAIL_PDL", "0"); }

/// The current device runs programmatic dependent launches (compute capability 9.0+; read once per device).
inline bool DependentLaunchSupported() {
  static std::atomic<int> cache[64] = {};  // 0: not read yet, 1: no, 2: yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return false;
  }
  int state = cache[dev].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    state = major >= 9 ? 2 : 1;
    cache[dev].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

/// The code the device runs for `kernel` was compiled for sm_90+ (its PTX version), so that GridDependencyWait() is in
/// it: a library built without sm_90 and JIT-compiled from older PTX on a newer GPU has no wait and must launch plainly.
/// Read once per device and kernel, outside stream capture (ONNX Runtime runs a graph before capturing it); false until
/// then.
inline bool CompiledWithGridDependency(const void* kernel, cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, bool> cache;  // per device: each may run other code of the kernel
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({dev, kernel});
  if (it != cache.end()) return it->second;
  if (StreamCapturing(stream)) return false;
  cudaFuncAttributes attr = {};
  const bool ok = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess;
  if (!ok) cudaGetLastError();
  return cache[{dev, kernel}] = ok && attr.ptxVersion >= 90;
}

/// Launches kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the stream's previous work
/// when `dependent`, the device is sm_90+ and the kernel was compiled with its wait; when the driver refuses that
/// launch, a plain one (outside stream capture: a refused launch during capture invalidates the capture, and the plain
/// launch's error is then returned).
template <typename... KArgs, typename... Args>
cudaError_t LaunchDependent(bool dependent, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                            Args&&... args) {
  if (dependent && DependentLaunchSupported() && CompiledWithGridDependency(reinterpret_cast<const void*>(kernel), stream)) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    if (cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...) == cudaSuccess) return cudaGetLastError();
    cudaGetLastError();
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace acttail
