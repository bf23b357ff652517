"""The CPU 4-bit op's paths, A/B in one process: the default against ``--switch``=0.

``ACTTAIL_CPU_ROW_TILES`` (default switch): one row of X in register tiles, or the per-row path;
``ACTTAIL_CPU_DENSE_PREFILL``: many rows through the dense prefill GEMM, or the exact row-block path. One
``SparseMatMulNBits`` node per shape (float32, blocks of 32, random codes, threshold mode at the |x| quantile
``--sparsity`` of X), ``--rows`` rows of X. The variable is read per call, so the two paths alternate call by call in
one session; both outputs are checked against each other first. Prints and writes the median µs per call of each::

    python benchmarks/nbits_cpu_ab.py --threads 1 2 --output docs/results/cpu_kernel/nbits_row_tiles_ab.json
    python benchmarks/nbits_cpu_ab.py --switch ACTTAIL_CPU_DENSE_PREFILL --rows 128 --threads 2 \
        --sparsity 0 0.5 0.7 0.8 0.9 --rounds 30 --output docs/results/cpu_kernel/nbits_dense_prefill_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

SWITCHES = ("ACTTAIL_CPU_ROW_TILES", "ACTTAIL_CPU_DENSE_PREFILL")


def node_session(M: int, K: int, N: int, block: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from acttail_export import ops

    node = helper.make_node("SparseMatMulNBits", ["X", "Q", "scales", "offsets", "thresholds"], ["Y"], domain=ops.DOMAIN,
                            K=K, N=N, block_size=block, mode="threshold")
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("X", f32, [M, K]), helper.make_tensor_value_info("Q", TensorProto.UINT8, None),
              helper.make_tensor_value_info("scales", f32, None), helper.make_tensor_value_info("offsets", f32, None),
              helper.make_tensor_value_info("thresholds", f32, None)]
    graph = helper.make_graph([node], "nbits", inputs, [helper.make_tensor_value_info("Y", f32, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    model.ir_version = 8
    options = ops.session_options()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_pair(session, feeds: dict, rounds: int, env: str) -> tuple[list[float], list[float]]:
    """µs per call with the default and with ``env``=0, alternating."""
    tiles, per_row = [], []
    for i in range(rounds + 10):
        for value, out in ((None, tiles), ("0", per_row)):
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value
            t0 = time.perf_counter()
            session.run(None, feeds)
            if i >= 10:  # warm-up calls are not kept
                out.append((time.perf_counter() - t0) * 1e6)
    os.environ.pop(env, None)
    return tiles, per_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["576x960", "576x576", "576x3072", "1536x576"],
                    help="KxN (SmolLM2's q|k|v, o, gate|up, down)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, default=1, help="rows of X (M)")
    ap.add_argument("--switch", choices=SWITCHES, default=SWITCHES[0], help="the variable set to 0 for the B side")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for threads in args.threads:
        for shape in args.shapes:
            K, N = (int(v) for v in shape.split("x"))
            blocks = -(-K // args.block_size)
            session = node_session(args.rows, K, N, args.block_size, threads)
            q = rng.integers(0, 256, (K, (N + 1) // 2), dtype=np.uint8)
            scales = (rng.random((blocks, N)) * 0.01).astype(np.float32)
            offsets = (-8 * scales).astype(np.float32)
            x = rng.standard_normal((args.rows, K)).astype(np.float32)
            for s in args.sparsity:
                t = float(np.quantile(np.abs(x), s)) if s else -1.0
                feeds = {"X": x, "Q": q, "scales": scales, "offsets": offsets, "thresholds": np.array([t], np.float32)}
                y_tiles = session.run(None, feeds)[0]
                os.environ[args.switch] = "0"
                y_rows = session.run(None, feeds)[0]
                os.environ.pop(args.switch, None)
                diff = float(np.abs(y_tiles - y_rows).max() / max(np.abs(y_rows).max(), 1e-30))
                if diff > 1e-5:
                    raise SystemExit(f"{shape} at {s}: the two paths differ by {diff:.2e} of max |y|")
                default, off = time_pair(session, feeds, args.rounds, args.switch)
                row = {"threads": threads, "M": args.rows, "K": K, "N": N, "sparsity": s, "default_us": float(np.median(default)),
                       "off_us": float(np.median(off)), "max_rel_diff": diff}
                row["speedup"] = row["off_us"] / row["default_us"]
                rows.append(row)
                print(f"{threads} thr M={args.rows} {K}x{N} {s:.0%}: default {row['default_us']:.1f} us, {args.switch}=0 "
                      f"{row['off_us']:.1f} us, {row['speedup']:.2f}x (outputs {diff:.1e} apart)", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "switch": args.switch,
                                           "block_size": args.block_size, "rounds": args.rounds, "rows": rows},
                                          indent=1) + "\n")


if __name__ == "__main__":
    main()
