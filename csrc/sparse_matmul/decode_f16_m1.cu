// Float16 one-row decode GEMV: every GemvConfig of the sweep (benchmarks/kernel_bench.py GEMV_SPACE).
#include <cuda_fp16.h>

#include "sparse_matmul/decode.cuh"

namespace acttail {
namespace detail {
template cudaError_t LaunchDecode<__half, 1>(const CudaArgs&, const CudaPlan&, const Layout&, const cuda::DeviceMask&, void*, cudaStream_t);
}  // namespace detail
}  // namespace acttail
