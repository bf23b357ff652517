// Decode GEMV for float32 and for 2-8 float16 rows: the default GemvConfig only.
#include <cuda_fp16.h>

#include "sparse_matmul/decode.cuh"

namespace acttail {
namespace detail {
#define ACTTAIL_DECODE(T, MR) \
  template cudaError_t LaunchDecode<T, MR>(const CudaArgs&, const CudaPlan&, const Layout&, const cuda::DeviceMask&, void*, cudaStream_t);
ACTTAIL_DECODE(__half, 2)
ACTTAIL_DECODE(__half, 4)
ACTTAIL_DECODE(__half, 8)
ACTTAIL_DECODE(float, 1)
ACTTAIL_DECODE(float, 2)
ACTTAIL_DECODE(float, 4)
ACTTAIL_DECODE(float, 8)
#undef ACTTAIL_DECODE
}  // namespace detail
}  // namespace acttail
