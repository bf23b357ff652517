// com.acttail::SparseMatMul: Y[..., N] = mask(X)[..., K] @ W[K, N] with W in ONNX MatMul layout (a masked
// channel k skips row k of W). The mask rule is common/mask.h; the op's inputs and attributes are in op.cc.
// This header holds what the op's CPU kernel (cpu.cc), CUDA launchers (cuda.cu) and the CUDA benchmark
// harness (csrc/bench/) share.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/mask.h"

namespace acttail {

constexpr const char* kSparseMatMul = "SparseMatMul";

/// Problem size after flattening X to [M, K].
struct Problem {
  int64_t M = 0, K = 0, N = 0;
  std::vector<int64_t> y_shape;
};

/// Validate shapes of X [..., K] and W [K, N]; throws InvalidArgument naming the fix.
Problem CheckShapes(const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape, const std::string& where);

// ---- CPU kernel (cpu.cc) ------------------------------------------------------------------------
/// Parallel-for callback: fn(data, i) for i in [0, total).
using ParallelFn = void (*)(void* ctx, void (*fn)(void*, size_t), size_t total, void* data);

/// Run the CPU kernel; T is float or uint16_t (IEEE half bits). rules[g] applies to output columns
/// [spans.begin[g], spans.end[g]). `parallel` may be null (serial).
template <typename T>
void SparseMatMulCpu(const T* x, const T* w, T* y, const Problem& p, const std::vector<MemberRule>& rules,
                     const MemberSpans& spans, ParallelFn parallel, void* parallel_ctx);

}  // namespace acttail
