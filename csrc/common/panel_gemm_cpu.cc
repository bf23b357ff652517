// The CPU prefill GEMM both ops share (panel_gemm_cpu.h).
#include "common/panel_gemm_cpu.h"

#include <immintrin.h>

#include "common/cpu_isa.h"

namespace acttail {

namespace {

// acc[r][0:16] (row stride ld) += sum_k a_r[k] * panel[k][0:16], r = 0..3 (register-blocked)
__attribute__((always_inline)) inline void MicroTileImpl(const float* __restrict a0, const float* __restrict a1,
                                                         const float* __restrict a2, const float* __restrict a3,
                                                         const float* __restrict panel, int64_t depth, float* __restrict acc,
                                                         int64_t ld) {
  float t[4][kPanelStrip];
  for (int c = 0; c < kPanelStrip; ++c) { t[0][c] = acc[c]; t[1][c] = acc[ld + c]; t[2][c] = acc[2 * ld + c]; t[3][c] = acc[3 * ld + c]; }
  for (int64_t k = 0; k < depth; ++k) {
    const float* wr = panel + k * kPanelStrip;
    const float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
    for (int c = 0; c < kPanelStrip; ++c) {
      t[0][c] += x0 * wr[c];
      t[1][c] += x1 * wr[c];
      t[2][c] += x2 * wr[c];
      t[3][c] += x3 * wr[c];
    }
  }
  for (int c = 0; c < kPanelStrip; ++c) { acc[c] = t[0][c]; acc[ld + c] = t[1][c]; acc[2 * ld + c] = t[2][c]; acc[3 * ld + c] = t[3][c]; }
}
ACTTAIL_SIMD_VARIANTS(MicroTile,
                      (const float* a0, const float* a1, const float* a2, const float* a3, const float* panel, int64_t depth,
                       float* acc, int64_t ld),
                      (a0, a1, a2, a3, panel, depth, acc, ld))

// acc[r][0:16*S] (row stride ld) += sum_k a_r[k] * panels[s][k][0:16], r < 8, s < S (S = 1 or 2): 8 x 32
// outputs in 16 zmm registers, 2 panel loads and 8 broadcasts per 16 FMAs (AVX-512; MLAS-class throughput).
template <int S>
__attribute__((target("avx512f"))) void MicroTile8Avx512(const float* const* a, const float* p0, const float* p1,
                                                          int64_t depth, float* acc, int64_t ld) {
  __m512 t[8][S];
  for (int r = 0; r < 8; ++r) {
    t[r][0] = _mm512_loadu_ps(acc + r * ld);
    if constexpr (S == 2) t[r][1] = _mm512_loadu_ps(acc + r * ld + 16);
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 w0 = _mm512_loadu_ps(p0 + k * kPanelStrip);
    __m512 w1;
    if constexpr (S == 2) w1 = _mm512_loadu_ps(p1 + k * kPanelStrip);
    for (int r = 0; r < 8; ++r) {
      const __m512 x = _mm512_set1_ps(a[r][k]);
      t[r][0] = _mm512_fmadd_ps(x, w0, t[r][0]);
      if constexpr (S == 2) t[r][1] = _mm512_fmadd_ps(x, w1, t[r][1]);
    }
  }
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_ps(acc + r * ld, t[r][0]);
    if constexpr (S == 2) _mm512_storeu_ps(acc + r * ld + 16, t[r][1]);
  }
}

}  // namespace

void PanelGemm(const float* const* a, int64_t rows, const float* panel, int64_t strips, int64_t depth, const float* zeros,
               float* acc, int64_t ld) {
  if (CpuIsa() == Isa::kAvx512) {
    for (int64_t r = 0; r < rows; r += 8) {
      const float* t[8];
      for (int q = 0; q < 8; ++q) t[q] = r + q < rows ? a[r + q] : zeros;
      for (int64_t st = 0; st < strips; st += 2) {
        const float* p0 = panel + st * depth * kPanelStrip;
        float* out = acc + r * ld + st * kPanelStrip;
        if (st + 1 < strips) {
          MicroTile8Avx512<2>(t, p0, p0 + depth * kPanelStrip, depth, out, ld);
        } else {
          MicroTile8Avx512<1>(t, p0, nullptr, depth, out, ld);
        }
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; r += 4) {
    const float* t[4];
    for (int q = 0; q < 4; ++q) t[q] = r + q < rows ? a[r + q] : zeros;
    for (int64_t st = 0; st < strips; ++st)
      MicroTile(t[0], t[1], t[2], t[3], panel + st * depth * kPanelStrip, depth, acc + r * ld + st * kPanelStrip, ld);
  }
}

}  // namespace acttail
