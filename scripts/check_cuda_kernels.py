"""Check the CUDA kernels of SparseMatMul through the benchmark harness, without ONNX Runtime.

For kernel work on a machine with a GPU and torch but no onnxruntime-gpu (and for running the kernels
under ``compute-sanitizer`` cheaply): random problems through ``acttail_bench_sparse_matmul`` (the op's
CUDA dispatch, csrc/sparse_matmul_bench.cu), every decode-kernel variant, compared with the float64 numpy
reference of tests/test_ops.py. Build the harness first::

    nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -cudart shared -gencode arch=compute_90,code=sm_90 -Icsrc \\
         csrc/sparse_matmul_impl.cu csrc/sparse_matmul_bench.cu -o build/libacttail_bench.so
    python scripts/check_cuda_kernels.py build/libacttail_bench.so --cases 400
    compute-sanitizer --tool memcheck python scripts/check_cuda_kernels.py build/libacttail_bench.so --cases 60

Exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # test_ops (the numpy reference) imports acttail_export

VARIANTS = (0, 1, 2, 3)  # LaunchDecode: shipped, memset scratch, plain grid, pooled grid


def main(argv: list[str] | None = None) -> int:
    import torch
    from test_ops import assert_matches

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("harness", help="libacttail_bench.so")
    ap.add_argument("--cases", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-m", type=int, default=33, help="largest number of rows (8: decode kernels only)")
    args = ap.parse_args(argv)

    lib = ctypes.CDLL(args.harness)
    f = lib.acttail_bench_sparse_matmul
    f.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_longlong] * 3 + [ctypes.c_int, ctypes.c_longlong, ctypes.c_int,
                                                                                      ctypes.c_char_p, ctypes.c_int]
    ws_bytes = lib.acttail_bench_workspace_bytes
    ws_bytes.argtypes = [ctypes.c_longlong] * 3 + [ctypes.c_int]
    ws_bytes.restype = ctypes.c_longlong
    err = ctypes.create_string_buffer(512)
    rng = np.random.default_rng(args.seed)
    streams = [torch.cuda.Stream() for _ in range(2)]

    def run(x, w, mode, t, k, variant, stream):
        dt = torch.float16 if x.dtype == np.float16 else torch.float32
        M, K, N = int(np.prod(x.shape[:-1])), w.shape[0], w.shape[1]
        with torch.cuda.stream(stream):
            xd = torch.from_numpy(x.reshape(M, K).copy()).cuda()
            wd = torch.from_numpy(w).cuda()
            yd = torch.full((M, N), 7.0, dtype=dt, device="cuda")
            td = torch.tensor(0.0 if t is None else t, dtype=torch.float32, device="cuda")
            # garbage in the per-call workspace: the memset variant must zero what it uses
            ws = torch.full((max(ws_bytes(M, K, N, int(mode == "topk")), 8) // 4 + 2,), -1, dtype=torch.int32, device="cuda")
            rc = f(int(dt == torch.float16), xd.data_ptr(), wd.data_ptr(), yd.data_ptr(), td.data_ptr(), ws.data_ptr(), stream.cuda_stream,
                   M, K, N, int(mode == "topk"), k or 0, variant, err, 512)
            assert rc == 0, err.value.decode()
        torch.cuda.synchronize()
        return yd.cpu().numpy().reshape(x.shape[:-1] + (N,))

    passed = failed = 0
    t0 = time.time()
    for it in range(args.cases):
        dtype = (np.float32, np.float16)[it % 2]
        M = int(rng.choice([m for m in (0, 1, 1, 1, 2, 3, 4, 5, 8, 9, 17, 33) if m <= args.max_m]))
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
        x = x.astype(dtype)
        w = rng.uniform(-1, 1, (K, N)).astype(dtype)
        mode = ("threshold", "topk")[(it // 2) % 2]
        t = k = None
        if mode == "threshold":
            t = float(rng.choice([0.0, 0.5, 1.5, np.inf, -1.0]))
        else:
            k = int(rng.choice([0, 1, K // 2, K, int(rng.integers(0, K + 1))]))
        variant = VARIANTS[it % len(VARIANTS)]
        try:
            assert_matches(run(x, w, mode, t, k, variant, streams[(it // 3) % 2]), x, w, mode, t, k)
            passed += 1
        except AssertionError as exc:
            failed += 1
            print("FAIL", dtype.__name__, M, K, N, mode, t, k, f"special={special} variant={variant}", str(exc)[:300])
    print(f"harness check: {passed} passed, {failed} failed in {time.time() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
