"""Decode GEMV for 4-bit blocks along N (the harness prototype) against the op's decode on blocks along K, one call.

docs/quantization.md ("Scales that travel with their row") and docs/benchmarks.md (#15's bound) say the 80 % target
needs a layout whose dropped input channels take their scales with them. This measures the prototype kernel for that
layout (csrc/sparse_matmul_nbits/kernels/gemv_nblocks.cuh, one float16 row, threshold mode) beside the shipped
decode path of SparseMatMulNBits (blocks of 32 along K, its own per-shape plan) and cuBLAS fp16, with the methods of
kernel_bench_nbits.py: calls captured in one CUDA graph and rotated over weight copies whose total exceeds 3 x the
60 MB L2; graph_us = CUDA-event time per call, kernel_us = CUPTI kernel time per call. Bytes of the N-block layout:
K*N/2 + 4*K*ceil(N/B); effective TB/s = those bytes / kernel_us, actual TB/s = bytes of the kept rows (codes and their
pairs) / kernel_us. Each row's result is checked against torch on the dequantized weight (max relative error).

    python benchmarks/nblocks_bench.py --harness build/ops/libacttail_bench.so --out runs/device/nblocks
    python benchmarks/nblocks_bench.py --table docs/results/kernels/nblocks/nblocks_bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench_nbits import L2_BYTES, SHAPES, Weights, copy_bandwidth, kept_bytes, time_graph  # noqa: E402

from acttail_export.nbits_harness import BLOCK, Harness  # noqa: E402

logger = logging.getLogger("nblocks_bench")
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9)


def nblock_weights(K: int, N: int, B: int, gen):
    """Random codes [K, N/2] and (scale, offset) pairs [K, ceil(N/B), 2] in float16 on the device (MatMulNBits-like
    ranges: scale ~0.0027, offset = -zero_point * scale with zero points 6..9)."""
    import torch

    q = torch.randint(0, 256, (K, N // 2), dtype=torch.uint8, device="cuda", generator=gen)
    nb = (N + B - 1) // B
    s = (torch.rand((K, nb), device="cuda", generator=gen) + 0.5) * (0.02 / 7.5)
    zp = torch.randint(6, 10, (K, nb), device="cuda", generator=gen).float()
    return q, torch.stack([s, -zp * s], -1).half().contiguous()


def dequantize_nblocks(q, pairs, B: int):
    """float32 W [K, N] of the N-block layout."""
    import torch

    codes = torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1).float()
    cols = torch.arange(codes.shape[1], device=q.device) // B
    return pairs[:, cols, 0].float() * codes + pairs[:, cols, 1].float()


def bench_shape(h: Harness, K: int, N: int, args, gen) -> list[dict]:
    import torch

    rows = []
    x = torch.randn(1, K, device="cuda", dtype=torch.float16, generator=gen)
    y = torch.empty(1, N, device="cuda", dtype=torch.float16)
    # the op on blocks of 32 along K (the exported layout), its own plan
    kbytes = K * N // 2 + 4 * N * ((K + BLOCK - 1) // BLOCK)
    kcopies = max(3, math.ceil(3 * L2_BYTES / kbytes))
    rng = np.random.default_rng(K + N)
    ws = [Weights(rng, K, N) for _ in range(kcopies)]
    wd = ws[0].dense()
    dense_copies = max(3, math.ceil(3 * L2_BYTES / (K * N * 2)))
    wds = [wd] + [ws[i % kcopies].dense() for i in range(1, dense_copies)]
    calls = [lambda c=c: torch.matmul(x, wds[c], out=y) for c in range(dense_copies)] * max(1, 48 // dense_copies)
    g_us, k_us, _ = time_graph(calls, args.reps)
    base = {"K": K, "N": N}
    rows.append(base | {"method": "cublas_fp16", "sparsity": 0.0, "graph_us": g_us, "kernel_us": k_us, "bytes": K * N * 2,
                        "effective_tb_s": K * N * 2 / k_us / 1e6})
    logger.info("%dx%d cuBLAS fp16: kernels %.2f us", K, N, k_us)
    wds = calls = None
    torch.cuda.empty_cache()
    for B in args.blocks:
        nbytes = K * N // 2 + 4 * K * ((N + B - 1) // B)
        ncopies = max(3, math.ceil(3 * L2_BYTES / nbytes))
        nws = [nblock_weights(K, N, B, gen) for _ in range(ncopies)]
        wn = dequantize_nblocks(*nws[0], B)
        scratch = torch.zeros(N, dtype=torch.float32, device="cuda")
        counters = torch.zeros((N + 511) // 512, dtype=torch.int32, device="cuda")
        for s in args.sparsities:
            thr = float(torch.quantile(x.float().abs().flatten(), s)) if s > 0 else 0.0
            keep = (x.float().abs() > thr) & (x != 0)
            xm = torch.where(keep, x.float(), 0.0)
            kept = int(keep.sum())
            if B == args.blocks[0]:  # the op's K-block path once per sparsity
                thr_t = torch.tensor([thr], dtype=torch.float32, device="cuda")
                mk = [Harness.call(x, w.dev["q_packed"], w.dev["scales"], w.dev["offsets"], y, thresholds=thr_t, topk=False) for w in ws]
                work = h.workspace(mk[0])
                for c in mk:
                    c.workspace = work.data_ptr()
                h.run(mk[0])
                want = xm @ wd.float()
                err = float((y.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
                calls = [lambda c=c: h.run(c) for c in mk] * max(1, 48 // kcopies)
                g_us, k_us, _ = time_graph(calls, args.reps)
                read = kept_bytes(x, thr, K, N, BLOCK)
                rows.append(base | {"method": "op_kblocks32", "B": BLOCK, "sparsity": s, "graph_us": g_us, "kernel_us": k_us, "max_rel_err": err,
                                    "bytes": kbytes, "read_bytes": read, "effective_tb_s": kbytes / k_us / 1e6, "actual_tb_s": read / k_us / 1e6})
                logger.info("%dx%d s=%.1f op (K-blocks 32): kernels %.2f us (effective %.2f TB/s), err %.1e", K, N, s, k_us,
                            rows[-1]["effective_tb_s"], err)
                del work, mk
            want = xm @ wn
            read = kept * (N // 2 + 4 * ((N + B - 1) // B))
            xv = x.reshape(-1)
            for cpl, unroll in args.variants:
                if N % cpl or B % cpl:
                    continue
                h.run_nblocks(xv, thr, nws[0][0], nws[0][1], y.reshape(-1), scratch, counters, block=B, cols_per_lane=cpl, unroll=unroll)
                torch.cuda.synchronize()
                err = float((y.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
                calls = [lambda w=w, cpl=cpl, unroll=unroll: h.run_nblocks(xv, thr, w[0], w[1], y.reshape(-1), scratch, counters, block=B,
                                                                           cols_per_lane=cpl, unroll=unroll)
                         for w in nws] * max(1, 48 // ncopies)
                g_us, k_us, _ = time_graph(calls, args.reps)
                rows.append(base | {"method": f"nblocks_cpl{cpl}_u{unroll}", "B": B, "sparsity": s, "graph_us": g_us, "kernel_us": k_us,
                                    "max_rel_err": err,
                                    "bytes": nbytes, "read_bytes": read, "effective_tb_s": nbytes / k_us / 1e6, "actual_tb_s": read / k_us / 1e6})
                logger.info("%dx%d s=%.1f N-blocks %d cpl %d unroll %d: kernels %.2f us (effective %.2f, actual %.2f TB/s), err %.1e", K, N, s, B,
                            cpl, unroll, k_us, rows[-1]["effective_tb_s"], rows[-1]["actual_tb_s"], err)
        del nws, wn
        torch.cuda.empty_cache()
    return rows


def markdown_table(result: dict) -> str:
    """Per shape and sparsity: cuBLAS fp16, the op on K-blocks, the best N-block variant per block size (kernel us)."""
    rows = result["rows"]
    blocks = sorted({r["B"] for r in rows if r["method"].startswith("nblocks")})
    head = "| K→N | sparsity | cuBLAS fp16 µs | op, K-blocks 32 µs | " + " | ".join(f"N-blocks {b} µs (best variant; actual TB/s)" for b in blocks)
    head += " | best N-block vs op |"
    out = [head, "|" + "---|" * (5 + len(blocks))]
    for K, N in dict.fromkeys((r["K"], r["N"]) for r in rows):
        dense = next(r for r in rows if (r["K"], r["N"]) == (K, N) and r["method"] == "cublas_fp16")
        for s in dict.fromkeys(r["sparsity"] for r in rows if (r["K"], r["N"]) == (K, N) and r["method"] != "cublas_fp16"):
            op = next((r for r in rows if (r["K"], r["N"], r["sparsity"], r["method"]) == (K, N, s, "op_kblocks32")), None)
            cells, best = [], math.inf
            for b in blocks:
                cand = [r for r in rows if (r["K"], r["N"], r["sparsity"], r.get("B")) == (K, N, s, b) and r["method"].startswith("nblocks")]
                if not cand:
                    cells.append("–")
                    continue
                r = min(cand, key=lambda r: r["kernel_us"])
                best = min(best, r["kernel_us"])
                cells.append(f"{r['kernel_us']:.2f} ({r['method'].removeprefix('nblocks_')}; {r['actual_tb_s']:.2f})")
            ratio = f"{op['kernel_us'] / best:.2f}×" if op and best < math.inf else "–"
            op_cell = f"{op['kernel_us']:.2f}" if op else "–"
            out.append(f"| {K}→{N} | {s:.0%} | {dense['kernel_us']:.2f} | {op_cell} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--harness", help="libacttail_bench.so built from the current csrc/")
    p.add_argument("--out", type=Path, default=Path("runs/device/nblocks"))
    p.add_argument("--table", type=Path, help="print the table of a recorded JSON and exit")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--sparsities", type=lambda v: [float(s) for s in v.split(",")], default=list(SPARSITIES))
    p.add_argument("--blocks", type=lambda v: [int(b) for b in v.split(",")], default=[64, 128])
    p.add_argument("--variants", type=lambda v: [tuple(int(a) for a in c.split("x")) for c in v.split(",")],
                   default=[(16, 4), (32, 4), (16, 8), (32, 8)], help="columns per lane x unroll, e.g. 16x4,32x8")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if not args.harness:
        p.error("--harness is required (or --table)")
    import torch

    h = Harness(args.harness)
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "copy_tb_s": copy_bandwidth(), "rows": []}
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        result["rows"] += bench_shape(h, K, N, args, gen)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nblocks_bench.json").write_text(json.dumps(result, indent=1))
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
