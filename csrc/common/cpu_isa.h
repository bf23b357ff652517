// Instruction set of the CPU kernels, picked once at run time (no -march=native): AVX-512 (prefill GEMM
// tile), AVX2+FMA (every hot loop), or plain x86-64 ("scalar"; the compiler may still use SSE2).
//
// ACTTAIL_CPU_ISA=avx512|avx2|scalar ("base" = scalar) caps the choice, so tests run every path on one
// machine; a cap above what the CPU has gives the best it has. Read once, when the library registers
// its ops: an unknown value makes RegisterCustomOps fail with a one-line status.
#pragma once

#include <string>

namespace acttail {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

/// The ISA the CPU kernels use (best supported, capped by ACTTAIL_CPU_ISA).
Isa CpuIsa();

/// "" when ACTTAIL_CPU_ISA is unset or valid, else the error message.
std::string CheckCpuIsaEnv();

/// Names of the ISA paths compiled into the library, best first (libacttail_ops.json's cpu_isa).
const char* IsaName(Isa isa);

// A hot loop `name##Impl` (always_inline) compiled for AVX2+FMA and for baseline x86-64, `name` picking one by CpuIsa()
// (GCC's target_clones("arch=haswell") would only match Haswell CPUs, not later ones).
#define ACTTAIL_SIMD_VARIANTS(name, params, args)                                      \
  __attribute__((target("avx2,fma"))) void name##Avx2 params { name##Impl args; }      \
  void name##Base params { name##Impl args; }                                          \
  inline void name params { CpuIsa() >= Isa::kAvx2 ? name##Avx2 args : name##Base args; }

}  // namespace acttail
