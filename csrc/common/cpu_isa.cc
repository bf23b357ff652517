#include "common/cpu_isa.h"

#include <cstdlib>

namespace acttail {
namespace {

bool ParseIsa(const std::string& s, Isa& out) {
  if (s == "avx512") out = Isa::kAvx512;
  else if (s == "avx2") out = Isa::kAvx2;
  else if (s == "scalar" || s == "base") out = Isa::kScalar;
  else return false;
  return true;
}

}  // namespace

Isa CpuIsa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kScalar;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) best = Isa::kAvx512;
    const char* cap = std::getenv("ACTTAIL_CPU_ISA");
    Isa want = best;
    if (cap != nullptr && ParseIsa(cap, want) && want < best) best = want;
    return best;
  }();
  return isa;
}

std::string CheckCpuIsaEnv() {
  const char* cap = std::getenv("ACTTAIL_CPU_ISA");
  Isa unused;
  if (cap == nullptr || *cap == '\0' || ParseIsa(cap, unused)) return "";
  return std::string("ACTTAIL_CPU_ISA must be avx512, avx2 or scalar, got '") + cap + "'";
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace acttail
