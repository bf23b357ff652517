"""The projections of one decode step as a CUDA graph: the 4-bit op's 128 calls against reads of the same bytes alone.

docs/benchmarks.md (#15's bound) estimates what the projections of a full 32-layer 7B decode step may cost for issue
#15's targets, and what 128 calls at the copy bandwidth would cost, assuming a fixed ~2 us per call taken from isolated
calls. This script measures that floor in the form a decode step has: 128 calls, one per packed projection and layer
(q|k|v, o, gate|up, down with the SwiGLU input), each on weights of its own (4 GB in all, so every call reads DRAM),
captured back to back in one CUDA graph, per token:

* ``op``: the op's decode GEMV (``SparseMatMulNBits`` through the harness, threshold mode at the quantile of |x|, one
  float16 row, the ``density`` attribute set as an export sets it), as the exported folders call it;
* ``floor_*``: a plain streaming read (``acttail_bench_read_floor_launch``) of as many bytes per call as

  - ``op_layout``: the kept 4-bit rows plus every 32-row block's float16 scale and offset (what the op reads),
  - ``own_scales_b128``: the kept rows with a scale pair per row and 128 outputs (blocks along N: scales dropped with
    their rows),
  - ``kept_rows``: the kept 4-bit rows alone (no format reads fewer bytes),
  - ``matmulnbits``: at 0 % only, the bytes of ORT's ``MatMulNBits`` (block 32, float16 scales, 4-bit zero points),

  on the fastest of grids of 1-4 blocks of 512 threads per SM, launched plainly (``plain``), as a programmatic
  dependent that waits before its reads (``wait_first``: a GEMV must wait for its input) or after them (``read_first``:
  the best case of a kernel that fetched its weights before its input was ready).

``floor_op_layout_2layers`` / ``floor_kept_rows_2layers``: the same 128 plain reads rotated over the first two layers'
weights (253 MB, over 3x the L2, so still from DRAM), to show what the 4 GB footprint itself costs;
``floor_*_per_layer`` / ``floor_*_per_token``: the same bytes read in 32 calls (one per layer) or in one call (the
weights lie one call after another in one allocation), to show what the 128 launches cost.
The reads are contiguous and carry no arithmetic: a ``floor_*`` row estimates what a kernel reading those bytes in 128
calls costs at best on this GPU. CUDA-event time of graph replays per call (``graph_us``) and CUPTI kernel time per call
(``kernel_us``); ms per token = 128 x graph_us. Run on the CUDA machine after ``source benchmarks/device/env.sh``::

    python3 benchmarks/device/decode_floor_graph.py --harness build/ops/libacttail_bench.so --model llama2-7b --output <json>
    python benchmarks/device/decode_floor_graph.py --table <json>
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("decode_floor_graph")
BLOCK = 32  # quant block along K (the exporter's default and genai's -p int4)
# (hidden, intermediate, q|k|v output widths) of the full 32-layer shapes benchmarks/decode.py builds
MODELS = {"llama2-7b": (4096, 11008, (4096, 4096, 4096)), "mistral-7b": (4096, 14336, (4096, 1024, 1024))}
LAYERS = 32
FLOORS = ("op_layout", "own_scales_b128", "kept_rows")
LAUNCHES = {"plain": 0, "wait_first": 1, "read_first": 2}


def projections(model: str) -> list[tuple[str, int, int, tuple[int, ...], bool]]:
    """(name, K, N, member ends, swiglu input) of one layer's packed projections, in the order a decode step calls them."""
    hidden, inter, qkv = MODELS[model]
    ends = tuple(sum(qkv[: i + 1]) for i in range(len(qkv)))
    return [("qkv", hidden, sum(qkv), ends, False), ("o", hidden, hidden, (hidden,), False),
            ("gate_up", hidden, 2 * inter, (inter, 2 * inter), False), ("down", inter, hidden, (hidden,), True)]


def floor_bytes(kind: str, K: int, N: int, s: float) -> int:
    """Bytes one call reads under each format at sparsity s (kept fraction 1 - s of the input channels)."""
    nb = math.ceil(K / BLOCK)
    rows = (1.0 - s) * K * math.ceil(N / 2)
    if kind == "op_layout":
        return int(rows + 4 * nb * N)
    if kind == "own_scales_b128":
        return int((1.0 - s) * (K * math.ceil(N / 2) + 4 * K * math.ceil(N / 128)))
    if kind == "kept_rows":
        return int(rows)
    if kind == "matmulnbits":
        return int(K * math.ceil(N / 2) + 2 * nb * N + math.ceil(nb / 2) * N)
    raise ValueError(kind)


def measure(args) -> dict:
    import torch
    from kernel_bench_nbits import copy_bandwidth, dequantized, time_graph

    from acttail_export.nbits_harness import Harness

    h = Harness(args.harness)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    layer = projections(args.model)
    calls = []  # per call: dict with its tensors
    sizes = [K * math.ceil(N / 2) + 4 * math.ceil(K / BLOCK) * N for _, K, N, _, _ in layer] * LAYERS
    big = torch.empty(sum(sizes) + 16 * len(sizes), dtype=torch.uint8, device="cuda")  # every call's weights, one after another
    offset = 0
    for _ in range(LAYERS):
        for name, K, N, ends, swiglu in layer:
            nb = math.ceil(K / BLOCK)
            qbytes = K * math.ceil(N / 2)
            buf = big[offset:offset + qbytes + 4 * nb * N]
            offset += (qbytes + 4 * nb * N + 15) // 16 * 16
            buf[:qbytes].random_(0, 256)
            scales = buf[qbytes:qbytes + 2 * nb * N].view(torch.float16).view(nb, N)
            offsets = buf[qbytes + 2 * nb * N:].view(torch.float16).view(nb, N)
            scales.copy_((torch.rand(nb, N, device="cuda") + 0.5) * (0.02 / 7.5))
            offsets.copy_(-8.0 * scales.float())
            x = torch.randn(1, 2 * K if swiglu else K, device="cuda", dtype=torch.float16)
            calls.append({"name": name, "K": K, "N": N, "ends": ends, "swiglu": swiglu, "buf": buf, "q": buf[:qbytes].view(K, -1),
                          "scales": scales, "offsets": offsets, "x": x, "y": torch.empty(1, N, device="cuda", dtype=torch.float16)})
    total = sum(c["buf"].numel() for c in calls)
    logger.info("%s: %d calls, %.3f GB of 4-bit weights, scales and offsets; %s, %d SMs", args.model, len(calls), total / 1e9, props.name,
                props.multi_processor_count)
    out = {"model": args.model, "device": props.name, "sms": sms,
           "layers": LAYERS, "calls_per_token": len(calls), "weight_bytes": total, "copy_tb_s": copy_bandwidth(), "rows": []}
    sink = torch.zeros(64, dtype=torch.int32, device="cuda")

    def record(row: dict, g_us: float, k_us: float, per_token: int = len(calls)) -> None:
        row |= {"graph_us_per_call": g_us, "kernel_us_per_call": k_us, "ms_per_token": g_us * per_token / 1e3, "calls_per_token": per_token}
        if "bytes_per_token" in row:
            row["tb_s"] = row["bytes_per_token"] / (row["ms_per_token"] * 1e-3) / 1e12
        out["rows"].append(row)
        logger.info("%-28s s=%.2f %-10s %.3f ms/token (%.2f us/call graph, %.2f kernel)%s", row["method"], row["sparsity"],
                    row.get("launch", ""), row["ms_per_token"], g_us, k_us, f", {row['tb_s']:.2f} TB/s" if "tb_s" in row else "")
        if args.output:
            Path(args.output).write_text(json.dumps(out, indent=1) + "\n")

    def floor(method: str, s: float, launch: str, spans: list, token_bytes: int, per_token: int = len(calls)) -> None:
        """Reads of (buffer, bytes) spans, launched as `launch` says, in one graph on each grid of --blocks-per-sm; the fastest is the floor."""
        mode = LAUNCHES[launch]
        tries = {}  # blocks per SM -> (graph us, kernel us)
        for per_sm in args.blocks_per_sm:
            fl = [lambda b=b, n=n, g=per_sm * sms: h.read_floor_launch(b, n, sink, g, mode) for b, n in spans]
            tries[per_sm] = time_graph(fl, args.reps)[:2]
        best = min(tries, key=lambda b: tries[b][0])
        record({"method": method, "sparsity": s, "launch": launch, "bytes_per_token": token_bytes, "blocks_per_sm": best,
                "tries_us": {str(b): t for b, t in tries.items()}}, *tries[best], per_token=per_token)

    for s in args.sparsities:
        # the op: thresholds at the quantile s of each member's |input| (for down, of silu(gate) * up)
        op_calls, check = [], None
        for c in calls:
            xin = c["x"].float()
            if c["swiglu"]:
                g, u = xin[:, : c["K"]], xin[:, c["K"]:]
                xin = torch.nn.functional.silu(g) * u
            thr = float(torch.quantile(xin.abs().flatten(), s)) if s > 0 else 0.0
            t = torch.full((len(c["ends"]),), thr, dtype=torch.float32, device="cuda")
            call = Harness.call(c["x"], c["q"], c["scales"], c["offsets"], c["y"], thresholds=t, topk=False, ends=list(c["ends"]),
                                density=1.0 - s, swiglu=c["swiglu"])
            work = h.workspace(call)
            call.workspace = work.data_ptr()
            call._keep += (work,)
            op_calls.append(call)
            if check is None:
                check = (call, c, xin, thr)
        call, c, xin, thr = check  # the first call against a float32 reference
        h.run(call)
        torch.cuda.synchronize()
        xm = torch.where(xin.abs() > thr, xin, 0.0)
        want = xm @ dequantized(c["q"], c["scales"], c["offsets"], c["N"], BLOCK)
        err = float((c["y"].float() - want).abs().max() / want.abs().max())
        if not err < 1e-2:  # float16 output of a float32 sum: ~1e-3; anything larger is a broken call, not a timing
            raise RuntimeError(f"op check failed at sparsity {s}: max relative error {err:.3g}")
        for pdl in args.op_pdl:
            os.environ["ACTTAIL_PDL"] = pdl  # read per call, i.e. when the graph is captured
            g_us, k_us, per = time_graph([lambda c=c: h.run(c) for c in op_calls], args.reps)
            record({"method": "op", "sparsity": s, "launch": "dependent" if pdl == "1" else "plain", "max_rel_err": err,
                    "kernels_us": per}, g_us, k_us)
        os.environ.pop("ACTTAIL_PDL", None)
        for kind in FLOORS + (("matmulnbits",) if s == 0 else ()):
            nbytes = [floor_bytes(kind, c["K"], c["N"], s) for c in calls]
            spans = [(c["buf"], n) for c, n in zip(calls, nbytes)]
            for launch in args.launches:
                floor(f"floor_{kind}", s, launch, spans, sum(nbytes))
            if kind in ("op_layout", "kept_rows"):  # the same calls over two layers' weights (253 MB, > 3x L2): the footprint's share
                floor(f"floor_{kind}_2layers", s, "plain", [(calls[i % 8]["buf"], n) for i, n in enumerate(nbytes)], sum(nbytes))
                # fewer launches for the same bytes: one read per layer (32 calls), one per token (1 call); a span starts at
                # its first call's weights and runs on through the next calls' (one allocation)
                for label, n_calls in (("layer", LAYERS), ("token", 1)):
                    group = len(calls) // n_calls
                    spans = [(calls[i * group]["buf"], sum(nbytes[i * group:(i + 1) * group])) for i in range(n_calls)]
                    floor(f"floor_{kind}_per_{label}", s, "plain", spans * (1 if n_calls > 1 else 8), sum(nbytes), per_token=n_calls)

    return out


def table(result: dict) -> str:
    lines = [f"{result['model']}, {result['layers']} layers x {result['calls_per_token'] // result['layers']} projections, "
             f"{result['device']} ({result['sms']} SMs), copy {result['copy_tb_s']:.2f} TB/s (read + write)", "",
             "| sparsity | method | launch | calls / token | blocks / SM | GB per token | ms per token (graph) | µs per call | kernel µs per call "
             "| TB/s |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        gb = f"{r['bytes_per_token'] / 1e9:.3f}" if "bytes_per_token" in r else ""
        tb = f"{r['tb_s']:.2f}" if "tb_s" in r else ""
        calls = r.get("calls_per_token", result["calls_per_token"])
        grid = r.get("blocks_per_sm", result.get("blocks_per_sm", "") if r["method"] != "op" else "")  # the first runs: one grid
        lines.append(f"| {r['sparsity']:.2f} | {r['method']} | {r.get('launch', '')} | {calls} | {grid} | {gb} | "
                     f"{r['ms_per_token']:.3f} | "
                     f"{r['graph_us_per_call']:.2f} | {r['kernel_us_per_call']:.2f} | {tb} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness", help="libacttail_bench.so built for this GPU")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8])
    ap.add_argument("--launches", nargs="+", choices=sorted(LAUNCHES), default=list(LAUNCHES))
    ap.add_argument("--op-pdl", nargs="+", choices=["1", "0"], default=["1"], help="ACTTAIL_PDL values for the op's rows")
    ap.add_argument("--blocks-per-sm", type=int, nargs="+", default=[1, 2, 3, 4],
                    help="grids of the floor reads (blocks of 512 threads per SM); each row keeps the fastest")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--output")
    ap.add_argument("--table", metavar="JSON", help="print the table of a recorded run and exit")
    args = ap.parse_args(argv)
    if args.table:
        try:
            result = json.loads(Path(args.table).read_text())
        except (OSError, ValueError) as e:
            print(f"error: cannot read {args.table}: {e}", file=sys.stderr)
            return 2
        print(table(result))
        return 0
    if not args.harness:
        print("error: --harness is required (or --table JSON)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(args)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
