"""Top-k decode of SparseMatMulNBits with the selection inside the GEMV blocks (plan self_select; ACTTAIL_FUSED_SELECT=1
in the op) against the selection kernel before the GEMV (the op's default), on the CUDA machine: CUDA-graph time per call of one float16
row through the LLaMA-2-7B decode projections as the default genai base packs them (q|k|v and gate|up with a budget per
member, down with the SwiGLU folded in), weights rotated over copies larger than L2. The fused variant must run without
a selection or SwiGLU kernel (kernel names); the outputs of both are printed as their largest difference relative to
max |Y| (the stream-K blocks add float32 partial sums in a varying order, so not bit for bit; correctness is
tests/test_ops_nbits_harness.py's).

    python3 benchmarks/fused_select_bench.py --harness build/ops/libacttail_bench.so --out OUT/fused_select.json
    python3 benchmarks/fused_select_bench.py --table OUT/fused_select*.json    # the markdown table of recorded runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import time_graph, write_rows  # noqa: E402

from acttail_export.nbits_harness import Harness  # noqa: E402

# (name, K, member widths, kept fraction per member relative to --keep, SwiGLU input)
SHAPES = [("qkv", 4096, (4096, 4096, 4096), (1.1, 0.9, 1.0), False), ("o", 4096, (4096,), (1.0,), False),
          ("gate_up", 4096, (11008, 11008), (1.05, 0.95), False), ("down", 11008, (4096,), (1.0,), True)]


def variant(fused: int) -> tuple[int, ...]:
    """The op's own decode choice, with the selection inside the GEMV (1) or the selection kernel first (0)."""
    return (0, 0, -1, -1, -1, -1, -1, 0, -1, -1, fused)


def table(results: list[dict]) -> str:
    """Markdown table of recorded runs: per shape and kept fraction, the median CUDA-graph time per call of the selection
    kernel first (the op's default) and of the selection inside the GEMV blocks, and their ratio."""
    lines = ["| shape | K -> N | kept (k / K) | selection kernel first, us | selection in the GEMV blocks, us | fused / kernel |",
             "|---|---|---:|---:|---:|---:|"]
    for result in results:
        shapes = dict.fromkeys(r["shape"] for r in result["rows"])
        for name in shapes:
            rows = [r for r in result["rows"] if r["shape"] == name]
            us = {f: statistics.median(r["graph_us"] for r in rows if r["fused"] == f) for f in (0, 1)}
            r0 = rows[0]
            keep = sum(r0["ks"]) / (r0["K"] * len(r0["ks"]))
            lines.append(f"| {name} | {r0['K']} -> {r0['N']} | {keep:.2f} | {us[0]:.2f} | {us[1]:.2f} | {us[1] / us[0]:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown table of recorded runs and exit")
    ap.add_argument("--harness", help="libacttail_bench.so (ACTTAIL_BENCH=1 bash scripts/build_ops.sh)")
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument("--keep", type=float, default=0.5, help="kept fraction of the input channels (k = keep * K per member)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two variants")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(Path(f).read_text()) for f in args.table]))
        return 0
    if not args.harness or not args.out:
        ap.error("--harness and --out are required (or --table JSON...)")
    import torch
    from torch.profiler import ProfilerActivity, profile

    h = Harness(args.harness)
    rows = []
    for name, K, widths, rel, swiglu in SHAPES:
        N = sum(widths)
        ends = [sum(widths[:i + 1]) for i in range(len(widths))]
        ks = [min(K, int(round(args.keep * r * K))) for r in rel]
        gen = torch.Generator(device="cuda").manual_seed(K + N)
        copies = max(2, -(-3 * 50 * 2**20 // (K * N // 2)))  # weights of all copies > 3x a 50 MB L2
        ws = [(torch.randint(0, 256, (K, N // 2), dtype=torch.uint8, device="cuda", generator=gen),
               torch.rand(K // 32, N, device="cuda", generator=gen).half() * 0.02,
               torch.rand(K // 32, N, device="cuda", generator=gen).half() * -0.1) for _ in range(copies)]
        xs = [torch.randn(1, 2 * K if swiglu else K, device="cuda", dtype=torch.float16, generator=gen) for _ in range(max(8, copies))]
        calls = {}
        outs = {}
        for fused in (1, 0):
            cs, ys = [], []
            for i, x in enumerate(xs):
                q, s, o = ws[i % copies]
                y = torch.empty(1, N, device="cuda", dtype=torch.float16)
                c = h.call(x, q, s, o, y, topk=True, ks=ks, ends=ends, swiglu=swiglu)
                buf = h.workspace(c, variant(fused))
                c.workspace = buf.data_ptr()
                c._keep += (buf,)
                cs.append(c)
                ys.append(y)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for c in cs:
                    h.run(c, variant(fused))
                torch.cuda.synchronize()
            names = {ev.name for ev in prof.events()}
            selects = any("TopKSelect" in n or "SwiGluKernel" in n for n in names)
            if selects == bool(fused):
                raise SystemExit(f"{name}: fused={fused} ran {'a' if selects else 'no'} selection kernel: {sorted(names)}")
            outs[fused] = torch.cat(ys).cpu()
            calls[fused] = [partial(h.run, c, variant(fused)) for c in cs] * max(1, 48 // len(cs))
        a, b = outs[1].float(), outs[0].float()
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        print(f"{name} K={K} N={N} ks={ks} swiglu={swiglu}: largest |Y fused - Y kernel| / max |Y| = {rel:.2e}", flush=True)
        for r in range(args.rounds):
            for fused in (1, 0):
                g_us, k_us = time_graph(calls[fused], args.reps)
                rows.append({"shape": name, "K": K, "N": N, "ks": ks, "swiglu": swiglu, "fused": fused, "round": r,
                             "graph_us": g_us, "kernel_us": k_us})
                print(f"{name} fused={fused} round {r}: graph {g_us:.2f} us per call, kernels {k_us:.2f} us", flush=True)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
