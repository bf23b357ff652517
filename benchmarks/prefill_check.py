"""Correctness of the prefill (M > 8) path of SparseMatMul through the ctypes harness vs acttail_export.reference.

Needs a CUDA device and torch, no onnxruntime (the harness calls the op's CUDA dispatch directly):
    ACTTAIL_BENCH=1 ACTTAIL_CUDA_ARCHS=90 bash scripts/build_ops.sh
    python3 benchmarks/prefill_check.py [--small] [--harness build/ops/libacttail_bench.so] [--variants 0,4]
--small: only the small cases (for compute-sanitizer). --variants: the harness variants to check, each over
every case (default both: 0 = mask + cuBLAS, 4 = the op's own GEMM kernels). Covers the cuBLAS path and the
float16 tensor-core kernel (csrc/sparse_matmul/kernels/masked_gemm_tc.cuh: edges, K and N tails, both modes), their
fallbacks (float32, unaligned pointers, K or N not a multiple of 8), packed members (per-member masks and column
slices, with ramp and scales), skipped Inf/NaN rows of W (the guarded exact kernel), kept Inf/NaN in X, thresholds
+inf / NaN / negative, float32 accumulation, and a workspace filled with garbage.
"""
import importlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
kernel_bench = importlib.import_module("kernel_bench")  # the harness wrapper and the reference comparison
Harness, mismatch = kernel_bench.Harness, kernel_bench.mismatch


def check(y, x, w, mode, threshold, k, name, **contract):
    why = mismatch(y, x, w, mode, threshold, k, **contract)
    print(f"{'FAIL' if why else 'PASS'} {name}{': ' + why if why else ''}, nan {int(np.isnan(y.astype(np.float32)).sum())}", flush=True)
    return not why


def run(h, x, w, mode, threshold=None, k=0, offset=False, *, segments=None, ks=None, ramp=0.0, scale=None):
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
    thr = torch.from_numpy(np.asarray(0.0 if threshold is None else threshold, np.float32).reshape(-1)).cuda()
    sd = None if scale is None else torch.from_numpy(scale).cuda()
    contract = {"segments": segments, "ks": ks, "ramp": ramp, "scale": sd}
    ws = h.workspace(M, K, N, fill=-1, **contract)  # garbage: the op must zero what it needs
    h.matmul(xd, wd, yd, thr, ws, mode == "topk", k, **contract)
    torch.cuda.synchronize()
    return yd.cpu().numpy()


def main():
    small = "--small" in sys.argv
    lib = sys.argv[sys.argv.index("--harness") + 1] if "--harness" in sys.argv else "build/ops/libacttail_bench.so"
    variants = sys.argv[sys.argv.index("--variants") + 1] if "--variants" in sys.argv else "0,4"
    h = Harness(lib)
    ok = True
    for h.variant in (int(v) for v in variants.split(",")):
        print(f"== harness variant {h.variant} ({'mask + cuBLAS' if h.variant == 0 else 'own GEMM kernels'})")
        ok &= check_all(h, small)
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


def check_members(h, rng, small: bool) -> bool:
    """Packed members: per-member thresholds / ks, ramp, [G, K] scales, tensor-core eligible widths or not."""
    ok = True
    for M, K, widths in [(17, 264, (128, 64, 64)), (33, 200, (100, 37))] + ([] if small else [(512, 4096, (4096, 1024, 1024))]):
        for mode in ("threshold", "topk"):
            x = rng.standard_normal((M, K)).astype(np.float16)
            w = rng.uniform(-1, 1, size=(K, sum(widths))).astype(np.float16)
            segments = np.cumsum(widths).tolist()
            scale = rng.uniform(0.5, 2.0, (len(widths), K)).astype(np.float32)
            t = np.linspace(0.4, 1.2, len(widths)).astype(np.float32)
            ks = [int(K * f) for f in np.linspace(0.6, 0.2, len(widths))]
            contract = {"segments": segments, "ks": ks if mode == "topk" else None, "ramp": 0.5, "scale": scale}
            y = run(h, x, w, mode, t if mode == "threshold" else None, 0, **contract)
            ok &= check(y, x, w, mode, t if mode == "threshold" else None, None, f"members {mode} M={M} K={K} widths={widths}", **contract)
    return ok


def check_all(h, small: bool) -> bool:
    """Every case on the harness's current variant; True when all pass."""
    rng = np.random.default_rng(0)
    ok = check_members(h, rng, small)
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
