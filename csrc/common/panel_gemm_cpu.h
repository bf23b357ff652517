// The packed, register-blocked float32 GEMM that both ops' CPU prefill paths share: acc += A x panel, where the
// panel holds a K slice of W packed as [strip][k][16] floats (zero padded) and A is rows of the masked X. Tiles of
// 8 rows x 32 columns on AVX-512, 4 x 16 on AVX2+FMA and baseline x86-64, picked by CpuIsa() (common/cpu_isa.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/float16.h"

namespace acttail {

constexpr int64_t kPanelStrip = 16;  // columns per strip of a packed panel

/// acc[r][0:16 strips] (row stride ld) += sum over k < depth of a[r][k] * panel[s][k][0:16], r < rows, s < strips.
/// a[r] points at row r's K slice; `zeros` (depth floats of 0) stands in for the rows that fill the last tile, whose
/// accumulators (rows up to the next multiple of 8) acc must hold too.
void PanelGemm(const float* const* a, int64_t rows, const float* panel, int64_t strips, int64_t depth, const float* zeros,
               float* acc, int64_t ld);

/// Whether v is finite (bit test: immune to -ffast-math).
inline bool Finite(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return (b & 0x7f800000u) != 0x7f800000u;
}

/// y[r][0:width] (row stride ldy) = acc[r][0:width] (row stride lda) as T (float, or IEEE half bits as uint16_t);
/// whether every value was finite (a dense prefill task's check before its result may stand).
template <typename T>
bool StoreFinite(const float* acc, int64_t lda, int64_t rows, int64_t width, T* y, int64_t ldy) {
  bool finite = true;
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = acc + r * lda;
    T* yr = y + r * ldy;
    for (int64_t c = 0; c < width; ++c) {
      finite &= Finite(ar[c]);
      if constexpr (std::is_same_v<T, float>) {
        yr[c] = ar[c];
      } else {
        yr[c] = FloatToHalf(ar[c]);
      }
    }
  }
  return finite;
}

}  // namespace acttail
