"""A/B timing of two (or more) builds of the op library on the CPU execution provider, in one process.

Each library gets its own session over the same graph (`--layers` independent `SparseMatMul` nodes of one
shape, float32; threshold mode at the |x| quantile `--sparsity`, or `--mode topk` with k = K - ⌊sK⌋), and the sessions run alternately, one call
each per round, so that drift and noise on a shared machine hit both alike. Pool threads do not spin
between calls (`session.intra_op.allow_spinning = 0`): a spinning idle session would take the cores from the
one being timed. Prints the median and quartiles per library (µs per node) and writes them as JSON:

    python benchmarks/cpu_ab.py --libs old.so new.so --rows 128 --shapes 576x1536 1536x576 576x576 \
        --sparsity 0.8 --output docs/results/cpu_kernel/prefill_ab.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import cpu_session  # noqa: E402


def time_libraries(libs: list[str], M: int, K: int, N: int, sparsity: float, layers: int, rounds: int, threads: int,
                   mode: str = "threshold") -> dict[str, list[float]]:
    """µs per node of each library's session, `rounds` alternating calls each."""
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((K, N)) * 0.02).astype(np.float32) for _ in range(layers)]
    xs = [rng.standard_normal((M, K)).astype(np.float32) for _ in range(layers)]
    case = f"{mode} {sparsity * 100:g}%"
    sessions = [cpu_session(M, K, N, xs, ws, case, threads, library=lib, spinning=False) for lib in libs]
    feeds = {f"X{i}": x for i, x in enumerate(xs)}
    outputs = [s.run(None, feeds) for s in sessions]
    for out in outputs[1:]:  # the builds must agree before their speed is compared
        for a, b in zip(out, outputs[0]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    times: dict[str, list[float]] = {lib: [] for lib in libs}
    for _ in range(rounds):
        for lib, sess in zip(libs, sessions):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[lib].append((time.perf_counter() - t0) / layers * 1e6)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--libs", nargs="+", required=True, help="libacttail_ops.so builds to compare")
    ap.add_argument("--rows", type=int, nargs="+", default=[128], help="row counts M")
    ap.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576", "576x576"], help="KxN shapes")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.8])
    ap.add_argument("--mode", choices=["threshold", "topk"], default="threshold")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for M in args.rows:
        for shape in args.shapes:
            K, N = (int(v) for v in shape.split("x"))
            for s in args.sparsity:
                times = time_libraries(args.libs, M, K, N, s, args.layers, args.rounds, args.threads, args.mode)
                row = {"M": M, "K": K, "N": N, "mode": args.mode, "sparsity": s,
                       "libs": {lib: {"median_us": statistics.median(t), "p25_us": float(np.percentile(t, 25)),
                                      "p75_us": float(np.percentile(t, 75))} for lib, t in times.items()}}
                rows.append(row)
                libs = ", ".join(f"{Path(lib).name} {v['median_us']:.0f} us (p25-p75 {v['p25_us']:.0f}-{v['p75_us']:.0f})"
                                 for lib, v in row["libs"].items())
                print(f"M={M} {K}->{N} {args.mode} s={s}: {libs}", flush=True)
    if args.output:
        import onnxruntime as ort

        env = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "onnxruntime": ort.__version__,
               "layers": args.layers, "rounds": args.rounds}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
