"""Top-k selection kernel alone (csrc/common/cuda/topk_select.cuh) on the CUDA machine: CUDA-graph time per call of 48
selections of one float16 row, with and without the programmatic dependent launch (ACTTAIL_PDL); the selections of
both variants must be identical. The kernel µs (CUPTI) of a dependent launch includes its wait on the previous
kernel: the graph µs per call is the measure.

    python3 benchmarks/select_bench.py --harness build/ops/libacttail_bench.so --out OUT/select_bench.json
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import Harness, time_graph, write_rows  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", required=True, help="libacttail_bench.so (ACTTAIL_BENCH=1 bash scripts/build_ops.sh)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--ks", default="4096,11008,14336", help="comma-separated row widths K")
    ap.add_argument("--keep", type=float, default=0.5, help="kept fraction: k = keep * K")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    import torch

    h = Harness(args.harness)
    rows = []
    pdl_before = os.environ.get("ACTTAIL_PDL")
    for K in [int(v) for v in args.ks.split(",")]:
        k = int(args.keep * K)
        gen = torch.Generator(device="cuda").manual_seed(K)
        xs = [torch.randn(1, K, device="cuda", dtype=torch.float16, generator=gen) for _ in range(8)]
        ws = [torch.zeros(16, device="cuda", dtype=torch.int64) for _ in xs]
        results = {}
        for pdl in ("1", "0"):
            os.environ["ACTTAIL_PDL"] = pdl  # read when the calls are captured
            for x, w in zip(xs, ws):
                w.zero_()
                h.select(x, w, k)
            torch.cuda.synchronize()
            results[pdl] = [w[:1].cpu().tolist() for w in ws]
            calls = [partial(h.select, x, w, k) for x, w in zip(xs, ws)] * 6
            g_us, k_us = time_graph(calls, args.reps)
            rows.append({"K": K, "k": k, "pdl": int(pdl), "graph_us": g_us, "kernel_us": k_us})
            print(f"K={K} k={k} pdl={pdl}: graph {g_us:.2f} us, kernel {k_us:.2f} us", flush=True)
        same = results["1"] == results["0"]
        print(f"K={K}: selections identical across variants: {same}", flush=True)
        if not same:
            raise SystemExit(f"K={K}: the variants selected differently")
    if pdl_before is None:
        os.environ.pop("ACTTAIL_PDL", None)
    else:
        os.environ["ACTTAIL_PDL"] = pdl_before
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
