"""Correctness of the prefill (M > 8) path of SparseMatMul through the ctypes harness vs a float64 numpy reference.

Needs a CUDA device and torch, no onnxruntime (the harness calls acttail::SparseMatMulCuda directly):
    nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -cudart shared -gencode arch=compute_90,code=sm_90 -Icsrc \
         csrc/sparse_matmul_impl.cu csrc/sparse_matmul_bench.cu -o build/libacttail_bench.so
    python3 benchmarks/prefill_check.py [--small] [--harness build/libacttail_bench.so] [--variants 0,4]
--small: only the small cases (for compute-sanitizer). --variants: the harness variants to check, each over
every case (default both: 0 = mask + cuBLAS, 4 = the op's own GEMM kernels). Covers the cuBLAS path and the
float16 tensor-core kernel (csrc/masked_gemm_tc.cuh: edges, K and N tails, both modes), their fallbacks
(float32, unaligned pointers, K or N not a multiple of 8), skipped Inf/NaN rows of W (the guarded exact
kernel), kept Inf/NaN in X, thresholds +inf / NaN / negative, float32 accumulation, and a workspace filled
with garbage.
"""
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from kernel_bench import Harness  # noqa: E402

TOL = {np.float32: 1e-5, np.float16: 2e-3}


def reference_mask(x, mode, threshold=None, k=None):
    mag = np.abs(x.astype(np.float64))
    if mode == "threshold":
        with np.errstate(invalid="ignore"):
            return (mag > np.float64(np.float32(threshold))) & (mag > 0)
    mag = np.where(np.isnan(mag), 0.0, mag)
    mask = np.zeros(x.shape, bool)
    if k:
        cols = np.arange(x.shape[1])
        for row in range(x.shape[0]):
            order = np.lexsort((cols, -mag[row]))
            mask[row, order[:k]] = True
    return mask & (mag > 0)


def reference(x, w, mode, threshold=None, k=None):
    """(Y in float64, scale = |mask(x)| @ |W|); Inf/NaN of W count only where a row keeps that channel (vectorized)."""
    mask = reference_mask(x, mode, threshold, k)
    xm = np.where(mask, x.astype(np.float64), 0.0)
    wf = w.astype(np.float64)
    finite = np.isfinite(wf)
    with np.errstate(invalid="ignore", over="ignore"):
        y = xm @ np.where(finite, wf, 0.0)
        scale = np.abs(xm) @ np.abs(np.where(finite, wf, 0.0))
        if not finite.all():  # kept x (never 0) times +-Inf / NaN: signed Inf hits and NaN hits, by counting
            f32 = np.float32
            pos, neg = (mask & (xm > 0)).astype(f32), (mask & (xm < 0)).astype(f32)
            winf, wninf = (wf == np.inf).astype(f32), (wf == -np.inf).astype(f32)
            hit_pos = (pos @ winf + neg @ wninf) > 0
            hit_neg = (pos @ wninf + neg @ winf) > 0
            hit_nan = (mask.astype(f32) @ np.isnan(wf).astype(f32)) > 0
            y = np.where(hit_pos, y + np.inf, y)
            y = np.where(hit_neg, y - np.inf, y)
            y = np.where(hit_nan, np.nan, y)
            scale = np.where(hit_pos | hit_neg | hit_nan, np.inf, scale)
    return y, scale


def check(y, x, w, mode, threshold, k, name):
    ref, scale = reference(x, w, mode, threshold, k)
    dtype = x.dtype.type
    yf = y.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        bound = TOL[dtype] * (scale + np.abs(ref)) + (1e-7 if dtype == np.float16 else 1e-37)
        err = np.abs(yf - ref)
        expected = ref.astype(dtype).astype(np.float64)
    fin = np.isfinite(expected)
    same_nonfinite = np.array_equal(np.isnan(yf), np.isnan(expected)) and np.array_equal(np.isposinf(yf), np.isposinf(expected)) and \
        np.array_equal(np.isneginf(yf), np.isneginf(expected))
    ok_vals = (err <= bound) | ~fin
    ok = same_nonfinite and ok_vals.all()
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.nanmax(np.where(fin, err / np.maximum(scale + np.abs(ref), 1e-30), 0.0)) if fin.any() else 0.0
    print(f"{'PASS' if ok else 'FAIL'} {name}: max err/(scale+|ref|) {rel:.2e}, nonfinite match {same_nonfinite}, nan {np.isnan(yf).sum()}",
          flush=True)
    return ok


def run(h, x, w, mode, threshold=None, k=0, offset=False):
    half = x.dtype == np.float16
    tdt = torch.float16 if half else torch.float32
    M, K = x.shape
    N = w.shape[1]

    def dev(a):
        if not offset:
            return torch.from_numpy(np.ascontiguousarray(a)).cuda()
        flat = torch.empty(a.size + 1, dtype=tdt, device="cuda")
        v = flat[1:].view(a.shape)
        v.copy_(torch.from_numpy(np.ascontiguousarray(a)))
        return v

    xd, wd = dev(x), dev(w)
    yd = torch.full((M, N), 7.0, dtype=tdt, device="cuda")
    thr = torch.tensor(np.float32(threshold if threshold is not None else 0.0), device="cuda")
    n = max(h.lib.acttail_bench_workspace_bytes(M, K, N, 0), h.lib.acttail_bench_workspace_bytes(M, K, N, 1), 8)
    ws = torch.full(((n + 7) // 8,), -1, device="cuda", dtype=torch.int64)  # garbage: the op must zero what it needs
    stream = torch.cuda.current_stream().cuda_stream
    rc = h.lib.acttail_bench_sparse_matmul(int(half), xd.data_ptr(), wd.data_ptr(), yd.data_ptr(), thr.data_ptr(), ws.data_ptr(), stream, M, K,
                                           N, int(mode == "topk"), k, h.variant, h.err, 512)
    assert rc == 0, h.err.value
    torch.cuda.synchronize()
    return yd.cpu().numpy()


def main():
    small = "--small" in sys.argv
    lib = sys.argv[sys.argv.index("--harness") + 1] if "--harness" in sys.argv else "build/libacttail_bench.so"
    variants = sys.argv[sys.argv.index("--variants") + 1] if "--variants" in sys.argv else "0,4"
    h = Harness(lib)
    ok = True
    for h.variant in (int(v) for v in variants.split(",")):
        print(f"== harness variant {h.variant} ({'mask + cuBLAS' if h.variant == 0 else 'own GEMM kernels'})")
        ok &= check_all(h, small)
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


def check_all(h, small: bool) -> bool:
    """Every case on the harness's current variant; True when all pass."""
    rng = np.random.default_rng(0)
    ok = True
    cases = [(9, 64, 8), (17, 264, 136), (130, 200, 136), (40, 5003, 257), (33, 64, 24), (10, 0, 8), (16, 96, 264)]
    if not small:
        cases += [(17, 4104, 264), (64, 4096, 4096), (512, 4096, 4096), (512, 11008, 512), (9, 4096, 11008), (300, 1000, 1000)]
    for M, K, N in cases:
        for dtype in (np.float16, np.float32) if (M * K * N < 5e7) else (np.float16,):
            for mode in ("threshold", "topk"):
                x = rng.standard_normal((M, K)).astype(dtype)
                if K:
                    x[:, ::7] = np.round(x[:, ::7])
                w = rng.uniform(-1, 1, size=(K, N)).astype(dtype)
                thr, k = (0.7, None) if mode == "threshold" else (None, max(1, (2 * K) // 5) if K else 0)
                y = run(h, x, w, mode, thr, k or 0)
                ok &= check(y, x, w, mode, thr, k, f"{np.dtype(dtype).name} {mode} M={M} K={K} N={N}")
    # unaligned pointers (fallback) for fp16
    for M, K, N in [(33, 64, 24), (20, 136, 16)]:
        x = rng.standard_normal((M, K)).astype(np.float16)
        w = rng.uniform(-1, 1, size=(K, N)).astype(np.float16)
        y = run(h, x, w, "threshold", 0.5, 0, offset=True)
        ok &= check(y, x, w, "threshold", 0.5, None, f"unaligned fp16 M={M} K={K} N={N}")
    # skipped rows of W (NaN/Inf rows where x is masked) -> exact fallback
    for M, K, N in [(40, 64, 16), (40, 4096, 512)] + ([] if small else [(512, 4096, 4096)]):
        for mode in ("threshold", "topk"):
            x = rng.standard_normal((M, K)).astype(np.float16)
            x[:, 1::4] = 0.01  # below the threshold / outside the top-k for every row
            x[:, 3::8] = 0.0
            w = rng.uniform(-1, 1, size=(K, N)).astype(np.float16)
            w[1::4] = np.nan
            w[5::8, ::3] = np.inf
            w[3::8] = -np.inf
            thr, k = (0.1, None) if mode == "threshold" else (None, K // 2)
            y = run(h, x, w, mode, thr, k or 0)
            ok &= check(y, x, w, mode, thr, k, f"skipped W rows fp16 {mode} M={M} K={K} N={N}")
            assert not np.isnan(y).any()
    # a kept NaN row of W in one row of X only; kept Inf / NaN in X
    M, K, N = 24, 64, 32
    x = rng.standard_normal((M, K)).astype(np.float16)
    x[:, 2] = 0.0
    x[5, 2] = 3.0
    x[7, 9] = np.inf
    x[8, 10] = np.nan
    x[9, 11] = -np.inf
    w = rng.uniform(-1, 1, size=(K, N)).astype(np.float16)
    w[2] = np.nan
    w[11, 4] = 0.0
    y = run(h, x, w, "threshold", 0.5)
    ok &= check(y, x, w, "threshold", 0.5, None, "kept NaN row / Inf x (fp16, exact fallback)")
    w[2] = 0.5
    y = run(h, x, w, "threshold", 0.5)
    ok &= check(y, x, w, "threshold", 0.5, None, "kept Inf / NaN x, finite W (fp16, tensor cores)")
    # thresholds: +inf, NaN, negative
    x = rng.standard_normal((12, 48)).astype(np.float16)
    x[0, :5] = np.nan
    w = rng.uniform(-1, 1, size=(48, 16)).astype(np.float16)
    for t in (float("inf"), float("nan"), -1.0, 0.0):
        ok &= check(run(h, x, w, "threshold", t), x, w, "threshold", t, None, f"threshold {t}")
    # fp32 accumulation: 4097 ones over K = 4104 -> 4096
    x = np.zeros((16, 4104), np.float16)
    x[:, :4097] = 1
    y = run(h, x, np.ones((4104, 8), np.float16), "threshold", 0.0)
    print("fp16 4097 ones ->", np.unique(y))
    ok &= bool((y == 4096).all())
    # large values: products overflowing fp16 but not fp32
    x = np.full((16, 64), 200.0, np.float16)
    w = np.full((64, 8), 100.0, np.float16)
    y = run(h, x, w, "threshold", 0.0)
    ok &= check(y, x, w, "threshold", 0.0, None, "overflow to inf")
    return ok


if __name__ == "__main__":
    sys.exit(main())
