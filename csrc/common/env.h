// The op library's run-time switches (ACTTAIL_CUBLAS, ACTTAIL_PREFILL_FUSE, ACTTAIL_WEIGHT_CHECK, ACTTAIL_PDL,
// ACTTAIL_FUSED_SELECT, ACTTAIL_EARLY_PREFETCH, ACTTAIL_CPU_ROW_TILES, ACTTAIL_CPU_DENSE_PREFILL; docs/kernels.md).
#pragma once

#include <cstdlib>
#include <cstring>

namespace acttail {

/// The environment variable `name` is set to exactly `value`.
inline bool EnvIs(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

}  // namespace acttail
