// Per-shape parameters of the float16 one-row decode GEMV (kernels/splitk_gemv.cuh), chosen by a device
// sweep: `python benchmarks/kernel_bench.py --harness build/ops/libacttail_bench.so --sweep --write-table
// csrc/sparse_matmul/gemv_table.h` (benchmarks/device/kernel_bench.sh). An entry applies to a GPU with that
// multiprocessor count and an op with that K and N (all members together); everything else runs GemvConfig's
// defaults (8 warps, 1 segment, 4 rows in flight, 1 chunk, grid-size rule for pooling), the kernel every
// shape ran before the table.
#pragma once

#include <cstdint>

#include "sparse_matmul/cuda.h"

namespace acttail {

struct GemvTableEntry {
  int sms;
  int64_t K, N;
  GemvConfig config;  // warps, seg, unroll, chunks, pooled
};

// BEGIN TABLE (written from the sweep log docs/results/kernels/dense_gemv_sweep_h200.log: NVIDIA H200, 132 SMs; x cuBLAS at 0%/50%/80% sparsity)
inline constexpr GemvTableEntry kGemvTable[] = {
    {132, 4096, 4096, GemvConfig{8, 1, 8, 1, 1}},  // 0.99/1.34/2.18
    {132, 4096, 11008, GemvConfig{8, 2, 4, 1, 1}},  // 1.00/1.62/2.77
    {132, 11008, 4096, GemvConfig{8, 2, 4, 1, 1}},  // 1.09/1.76/3.04
    {132, 4096, 14336, GemvConfig{4, 1, 4, 2, 0}},  // 0.97/1.54/2.61
    {132, 14336, 4096, GemvConfig{4, 1, 8, 2, 0}},  // 1.07/1.74/3.01
    {132, 4096, 12288, GemvConfig{8, 2, 4, 1, 1}},  // 1.00/1.65/2.87
    {132, 4096, 22016, GemvConfig{8, 1, 8, 4, 0}},  // 0.97/1.62/2.95
    {132, 4096, 6144, GemvConfig{8, 1, 8, 1, 1}},  // 1.03/1.51/2.54
    {132, 4096, 28672, GemvConfig{4, 1, 4, 4, 0}},  // 0.98/1.72/3.36
};
// END TABLE

inline GemvConfig LookupGemvConfig(int sms, int64_t K, int64_t N) {
  for (const GemvTableEntry& e : kGemvTable)
    if (e.sms == sms && e.K == K && e.N == N) return e.config;
  return GemvConfig{};
}

}  // namespace acttail
