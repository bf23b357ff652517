// Tensor-core masked GEMM for the float16 prefill path (M > 8 rows) of com.acttail::SparseMatMul.
//
//   Y[M, N] = mask(X)[M, K] @ W[K, N],  float16 in, float32 accumulate (mma.sync m16n8k16), rounded once.
//
// Block tile 128 x 128 x 32, 8 warps (2 along M x 4 along N, 64 x 32 outputs each), kTcStages-deep
// cp.async pipeline in dynamic shared memory (XOR-swizzled 16-byte chunks, ldmatrix without bank
// conflicts). The mask is applied in shared memory: after its cp.async group has landed, each thread
// rewrites the X chunks it copied itself (masked, zero and NaN entries -> +0) before the block barrier
// that publishes the stage, so the MMAs only ever see kept entries of X.
//
// Exactness: a tensor core multiplies a masked (zeroed) x by every W[k, n], so 0 * Inf = NaN would
// reach Y where the contract skips the row. The blocks of the first row tile therefore check every W
// element they load (exponent bits all ones) and store 1 into `nonfinite` if any is Inf/NaN; the
// launcher then runs the exact MaskedGemmKernel guarded by that flag (it returns at once when the flag
// is 0), which overwrites all of Y. Finite weights pay one empty launch.
//
// Requirements (checked by TcGemmEligible; otherwise the launcher uses MaskedGemmKernel only):
// x, w, y 16-byte aligned, K % 8 == 0, N % 8 == 0 (every 16-byte chunk of a row is wholly in or out
// of range). Any M, K, N otherwise: out-of-range chunks are zero-filled by cp.async.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda/mask_rule.cuh"

namespace acttail {
namespace cuda {

constexpr int kTcBM = 128, kTcBN = 128, kTcBK = 32, kTcStages = 4, kTcThreads = 256;
constexpr int kTcStageA = kTcBM * kTcBK * 2;                      // bytes of one X stage (128 rows x 64 B)
constexpr int kTcStageB = kTcBK * kTcBN * 2;                      // bytes of one W stage (32 rows x 256 B)
constexpr int kTcSmemBytes = kTcStages * (kTcStageA + kTcStageB);  // 64 KiB
constexpr size_t kTcFlagBytes = 256;  // workspace bytes for the Inf/NaN-in-W flag (one unsigned, padded)

__device__ __forceinline__ uint32_t TcSmemAddr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

/// 16-byte global -> shared copy; `valid == false` writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void TcCpAsync16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void TcCpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void TcCpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void TcLdmatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void TcLdmatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void TcMma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Swizzled byte offsets inside one stage. X: row r (0..127) holds 4 chunks of 8 channels; chunk c is
// stored at c ^ ((r >> 1) & 3). W: row r (0..31) holds 16 chunks of 8 columns, chunk c stored at c ^ (r & 7).
__device__ __forceinline__ uint32_t TcOffA(int r, int c) { return (uint32_t)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4)); }
__device__ __forceinline__ uint32_t TcOffB(int r, int c) { return (uint32_t)(r * 256 + ((c ^ (r & 7)) << 4)); }

/// True where the tensor-core kernel may run on a column slice of N columns, row stride ld (see above).
inline bool TcGemmEligible(const void* x, const void* w, const void* y, int64_t K, int64_t N, int64_t ld) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(y) % 16 == 0 && K % 8 == 0 && N % 8 == 0 && ld % 8 == 0;
}

__global__ void __launch_bounds__(kTcThreads, 2)
    MaskedGemmTcKernel(const __half* __restrict__ x, const __half* __restrict__ w, __half* __restrict__ y, int M, int K, int N, int ld,
                       DeviceMask dm, int g, unsigned* __restrict__ nonfinite) {
  extern __shared__ __align__(128) unsigned char tc_smem[];
  const uint32_t smem = TcSmemAddr(tc_smem);
  const uint32_t smem_b = smem + kTcStages * kTcStageA;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64.., columns wn*32..
  const int row0 = blockIdx.y * kTcBM, col0 = blockIdx.x * kTcBN;
  const bool check_w = blockIdx.y == 0;  // one row tile checks W for Inf/NaN (all of it, over the column tiles)

  // this thread's copy slots: X chunks (ar + 64 i, ac), W chunks (br + 16 i, bc), i = 0, 1
  const int ar = tid >> 2, ac = tid & 3;
  const int br = tid >> 4, bc = tid & 15;
  Rule rule[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) rule[i] = LoadRule(dm, row0 + ar + 64 * i, M, g);

  const int ktiles = (K + kTcBK - 1) / kTcBK;
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kTcBK;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row0 + ar + 64 * i, k = k0 + ac * 8;
      const bool ok = r < M && k < K;
      TcCpAsync16(smem + stage * kTcStageA + TcOffA(ar + 64 * i, ac), ok ? x + (int64_t)r * K + k : x, ok);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int k = k0 + br + 16 * i, n = col0 + bc * 8;
      const bool ok = k < K && n < N;
      TcCpAsync16(smem_b + stage * kTcStageB + TcOffB(br + 16 * i, bc), ok ? w + (int64_t)k * ld + n : w, ok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    TcCpAsyncCommit();
  }

  uint32_t bad = 0;  // OR of "exponent all ones" over the W elements this thread checked
  for (int kt = 0; kt < ktiles; ++kt) {
    const int stage = kt % kTcStages;
    TcCpAsyncWait<kTcStages - 2>();  // this thread's copies of tile kt have landed
    // mask the X chunks this thread copied (visible to it after the wait), check its W chunks
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint4* p = reinterpret_cast<uint4*>(tc_smem + stage * kTcStageA + TcOffA(ar + 64 * i, ac));
      uint4 v = *p;
      __half* h = reinterpret_cast<__half*>(&v);
      const int c0 = kt * kTcBK + ac * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float mv = MaskedValue(h[e], c0 + e, rule[i], dm);
        if (!IsKeptValue(mv)) h[e] = __ushort_as_half((unsigned short)0);
        else if (dm.ramp != 0.0f) h[e] = __float2half_rn(mv);
      }
      *p = v;
    }
    if (check_w) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint4 v = *reinterpret_cast<const uint4*>(tc_smem + kTcStages * kTcStageA + stage * kTcStageB + TcOffB(br + 16 * i, bc));
        const uint32_t wd[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) bad |= NonFiniteWord<__half>(wd[j]);
      }
    }
    __syncthreads();  // tile kt masked and visible to all; every warp is done with tile kt - 1
    {
      const int next = kt + kTcStages - 1;
      if (next < ktiles) load_stage(next % kTcStages, next);  // refills the buffer of tile kt - 1
      TcCpAsyncCommit();
    }
    const uint32_t a_base = smem + stage * kTcStageA, b_base = smem_b + stage * kTcStageB;
#pragma unroll
    for (int kk = 0; kk < kTcBK / 16; ++kk) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int r = wm * 64 + mi * 16 + (lane & 15);
        TcLdmatrixX4(a[mi], a_base + TcOffA(r, kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int r = kk * 16 + (lane & 15);
        uint32_t t[4];
        TcLdmatrixX4Trans(t, b_base + TcOffB(r, wn * 4 + nj * 2 + (lane >> 4)));
        b[2 * nj][0] = t[0];
        b[2 * nj][1] = t[1];
        b[2 * nj + 1][0] = t[2];
        b[2 * nj + 1][1] = t[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) TcMma16816(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  }
  TcCpAsyncWait<0>();
  if (bad) *nonfinite = 1u;

  // epilogue: round once to float16; fragment (row lane/4 [+8], columns 2*(lane%4) + {0,1})
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
    const int r = row0 + wm * 64 + mi * 16 + (lane >> 2);
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int c = col0 + wn * 32 + ni * 8 + (lane & 3) * 2;
      if (c >= N) continue;  // N % 8 == 0: c < N implies c + 1 < N
      if (r < M) *reinterpret_cast<__half2*>(y + (int64_t)r * ld + c) = __floats2half2_rn(acc[mi][ni][0], acc[mi][ni][1]);
      if (r + 8 < M) *reinterpret_cast<__half2*>(y + (int64_t)(r + 8) * ld + c) = __floats2half2_rn(acc[mi][ni][2], acc[mi][ni][3]);
    }
  }
}

/// Enqueue the tensor-core kernel (caller: TcGemmEligible, `nonfinite` zeroed on the stream before).
inline cudaError_t LaunchMaskedGemmTc(const __half* x, const __half* w, __half* y, int64_t M, int64_t K, int64_t N, int64_t ld,
                                      const DeviceMask& dm, int g, unsigned* nonfinite, cudaStream_t stream) {
  static bool attr_set[64] = {};  // dynamic shared memory above 48 KiB needs an opt-in, once per device
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64 || !attr_set[dev]) {
    err = cudaFuncSetAttribute(MaskedGemmTcKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTcSmemBytes);
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) attr_set[dev] = true;
  }
  const dim3 grid((unsigned)((N + kTcBN - 1) / kTcBN), (unsigned)((M + kTcBM - 1) / kTcBM));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  MaskedGemmTcKernel<<<grid, kTcThreads, kTcSmemBytes, stream>>>(x, w, y, (int)M, (int)K, (int)N, (int)ld, dm, g, nonfinite);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace acttail
