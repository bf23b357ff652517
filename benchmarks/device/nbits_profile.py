"""Calls of SparseMatMulNBits' CUDA decode path through the harness, for a profiler (Nsight Compute) to look at.

One float16 row, threshold mode at the given quantiles of |x|, block 32, one weight copy per call as in
benchmarks/kernel_bench_nbits.py (rotated over copies larger than 3x L2, so every call reads from DRAM). On the CUDA
machine, from the project root, with the harness built (benchmarks/device/README.md)::

    ncu --clock-control none -k regex:NBitsGemv --launch-skip 8 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python3 benchmarks/device/nbits_profile.py --harness build/ops/libacttail_bench.so --shape 4096x11008 --sparsity 0

``--variant`` forces decode parameters (acttail_export.nbits_harness.VARIANT_FIELDS, e.g. ``cols_per_lane=32``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_bench_nbits import L2_BYTES, Weights  # noqa: E402

from acttail_export.nbits_harness import BLOCK, VARIANT_FIELDS, Harness  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness", required=True, help="libacttail_bench.so")
    ap.add_argument("--shape", default="4096x11008", help="KxN")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0], help="quantiles of |x| used as thresholds, in order")
    ap.add_argument("--calls", type=int, default=12, help="calls per sparsity")
    ap.add_argument("--variant", nargs="*", default=[], help="FIELD=VALUE decode overrides")
    args = ap.parse_args()

    import torch

    K, N = (int(v) for v in args.shape.lower().split("x"))
    variant = {}
    for item in args.variant:
        name, _, value = item.partition("=")
        if name not in VARIANT_FIELDS:
            ap.error(f"unknown variant field {name!r}; one of {', '.join(VARIANT_FIELDS)}")
        variant[name] = int(value)
    h = Harness(args.harness)
    rng = np.random.default_rng(0)
    ref_bytes = K * N // 2 + 4 * N * ((K + BLOCK - 1) // BLOCK)
    ws = [Weights(rng, K, N) for _ in range(max(3, math.ceil(3 * L2_BYTES / ref_bytes)))]
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    y = torch.empty(1, N, device="cuda", dtype=torch.float16)
    for s in args.sparsity:
        thr = float(torch.quantile(x.float().abs().flatten(), s)) if s > 0 else 0.0
        thr_t = torch.tensor([thr], dtype=torch.float32, device="cuda")
        calls = [Harness.call(x, w.dev["q_packed"], w.dev["scales"], w.dev["offsets"], y, thresholds=thr_t, topk=False) for w in ws]
        work = h.workspace(calls[0])
        for c in calls:
            c.workspace = work.data_ptr()
        forced = tuple(variant.get(f, 0 if f in ("cols_per_lane", "blocks_per_sm") else -1) for f in VARIANT_FIELDS) if variant else None
        for i in range(args.calls):
            h.run(calls[i % len(calls)], forced)
        torch.cuda.synchronize()
        print(f"{K}x{N} sparsity {s}: {args.calls} calls done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
