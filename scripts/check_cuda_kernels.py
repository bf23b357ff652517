"""Check the CUDA path of SparseMatMul through the benchmark harness, without ONNX Runtime.

For kernel work on a machine with a GPU and torch but no onnxruntime-gpu (and for running the kernels under
``compute-sanitizer`` cheaply): random problems through ``acttail_bench_sparse_matmul`` (the op's CUDA dispatch,
csrc/bench/harness.cu) compared with :func:`acttail_export.reference.sparse_matmul`: decode (M <= 8) and prefill
rows, both dtypes and modes, packed members (segments) with per-member thresholds / ks, ramp, [K] / [G, K] score
scales, NaN / Inf / zeros / ties in x, every harness variant (0-4, and 5 with a random decode GEMV configuration
of the sweep on float16 one-row calls), a workspace filled with garbage, two streams. Build the harness first::

    ACTTAIL_BENCH=1 ACTTAIL_CUDA_ARCHS=90 bash scripts/build_ops.sh
    python scripts/check_cuda_kernels.py build/ops/libacttail_bench.so --cases 400
    compute-sanitizer --tool memcheck python scripts/check_cuda_kernels.py build/ops/libacttail_bench.so --cases 60

Exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
kernel_bench = importlib.import_module("kernel_bench")  # the harness wrapper and the reference comparison
GEMV_SPACE, Harness, mismatch = kernel_bench.GEMV_SPACE, kernel_bench.Harness, kernel_bench.mismatch

VARIANTS = (0, 1, 2, 3, 4, 5)  # harness.cu: op plan, memset scratch, plain grid, pooled grid, no cuBLAS, forced GEMV config


def random_case(rng: np.random.Generator, it: int, max_m: int) -> dict:
    """One random problem: inputs and the op's contract arguments."""
    dtype = (np.float32, np.float16)[it % 2]
    M = int(rng.choice([m for m in (0, 1, 1, 1, 2, 3, 4, 5, 8, 9, 17, 33) if m <= max_m]))
    K = int(rng.choice([1, 7, 64, 100, 257, 1000, 4096, 4097, 5003, 11008, 16384, 20011]))
    N = int(rng.choice([1, 5, 16, 31, 64, 257, 1000, 4096, 4100, 11008]))
    if M * K * N > 3e8:
        N = 257
    x = rng.standard_normal((M, K))
    special = it % 5
    if special == 1:
        x[rng.random(x.shape) < 0.3] = 0
    elif special == 2:
        x[rng.random(x.shape) < 0.1] = np.nan
    elif special == 3:
        x = np.round(x * 2) / 2
    elif special == 4:
        x[rng.random(x.shape) < 0.01] = np.inf
    G = int(rng.choice([1, 1, 2, 3])) if N >= 3 else 1
    segments = sorted(rng.choice(np.arange(1, N), G - 1, replace=False).tolist()) + [N] if G > 1 else None
    mode = ("threshold", "topk")[(it // 2) % 2]
    case = {"x": x.astype(dtype), "w": rng.uniform(-1, 1, (K, N)).astype(dtype), "mode": mode, "segments": segments,
            "ramp": float(rng.choice([0.0, 0.0, 0.5])), "scale": None, "threshold": None, "k": None, "ks": None}
    if rng.random() < 0.3:
        case["scale"] = rng.uniform(0.25, 4.0, (G, K) if rng.random() < 0.5 else (K,)).astype(np.float32)
    if mode == "threshold":
        values = rng.choice([0.0, 0.5, 1.5, np.inf, -1.0], G if rng.random() < 0.5 else 1)
        case["threshold"] = values.astype(np.float32)
    else:
        case["ks"] = [int(rng.choice([0, 1, K // 2, K, int(rng.integers(0, K + 1))])) for _ in range(G)]
    return case


def run(h, case: dict, stream, variant: int, rng: np.random.Generator) -> np.ndarray:
    import torch

    x, w = case["x"], case["w"]
    dt = torch.float16 if x.dtype == np.float16 else torch.float32
    M, K, N = x.shape[0], w.shape[0], w.shape[1]
    with torch.cuda.stream(stream):
        xd, wd = torch.from_numpy(x.copy()).cuda(), torch.from_numpy(w).cuda()
        yd = torch.full((M, N), 7.0, dtype=dt, device="cuda")
        td = torch.from_numpy(np.asarray(0.0 if case["threshold"] is None else case["threshold"], np.float32).reshape(-1)).cuda()
        sd = None if case["scale"] is None else torch.from_numpy(case["scale"]).cuda()
        contract = {"segments": case["segments"], "ks": case["ks"], "ramp": case["ramp"], "scale": sd, "stream": stream.cuda_stream}
        ws = h.workspace(M, K, N, fill=-1, **{k: v for k, v in contract.items() if k != "stream"})  # garbage: the op zeroes what it needs
        h.variant = variant
        h.gemv = tuple(GEMV_SPACE[int(rng.integers(len(GEMV_SPACE)))]) if variant == 5 and M == 1 and dt == torch.float16 else None
        if variant == 5 and h.gemv is None:
            h.variant = 0
        h.run(h.call(xd, wd, yd, td, ws, case["mode"] == "topk", 0, **contract))
    torch.cuda.synchronize()
    return yd.cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("harness", help="libacttail_bench.so")
    ap.add_argument("--cases", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-m", type=int, default=33, help="largest number of rows (8: decode kernels only)")
    args = ap.parse_args(argv)
    h = Harness(args.harness)
    rng = np.random.default_rng(args.seed)
    streams = [torch.cuda.Stream() for _ in range(2)]
    passed = failed = 0
    t0 = time.time()
    for it in range(args.cases):
        case = random_case(rng, it, args.max_m)
        variant = VARIANTS[it % len(VARIANTS)]
        y = run(h, case, streams[(it // 3) % 2], variant, rng)
        why = mismatch(y, case["x"], case["w"], case["mode"], case["threshold"], case["k"], ks=case["ks"], segments=case["segments"],
                       ramp=case["ramp"], scale=case["scale"])
        if why:
            failed += 1
            x, w = case["x"], case["w"]
            print("FAIL", x.dtype, x.shape, w.shape, case["mode"], f"segments={case['segments']} ks={case['ks']} t={case['threshold']}",
                  f"ramp={case['ramp']} scale={None if case['scale'] is None else case['scale'].shape} variant={variant} gemv={h.gemv}:", why)
        else:
            passed += 1
    print(f"harness check: {passed} passed, {failed} failed in {time.time() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
