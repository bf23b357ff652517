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

// BEGIN TABLE (written by benchmarks/kernel_bench.py --write-table)
inline constexpr GemvTableEntry kGemvTable[] = {
    {0, 0, 0, GemvConfig{}},  // no sweep recorded yet
};
// END TABLE

inline GemvConfig LookupGemvConfig(int sms, int64_t K, int64_t N) {
  for (const GemvTableEntry& e : kGemvTable)
    if (e.sms == sms && e.K == K && e.N == N) return e.config;
  return GemvConfig{};
}

}  // namespace acttail
