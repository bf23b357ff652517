"""Kernel benchmark of com.acttail::SparseMatMul on CUDA: y = mask(x) @ W, fp16, one row.

LLaMA-2-7B and Llama-3 / Mistral MLP projection shapes (4096->4096, 4096->11008, 11008->4096, 4096->14336,
14336->4096) at 0/50/80/90% sparsity, against dense cuBLAS (torch.matmul) and dense ONNX Runtime MatMul on the
same inputs, in the same process.

Two timings per method, both with L2 flushed between weights (the calls rotate over several copies
of W whose total size is well above the 60 MB L2):
  * graph_us: per-call time of a CUDA graph holding many calls, replayed (CUDA events) - includes
    the gaps between dependent kernels in a graph;
  * kernel_us: per-call sum of GPU kernel durations recorded by CUPTI (torch.profiler).
The "harness" rows call the op's CUDA path directly (csrc/bench/harness.cu, built from the same sources as the
op library: ACTTAIL_BENCH=1 bash scripts/build_ops.sh -> build/ops/libacttail_bench.so) so that calls can be
captured in CUDA graphs; the "ort" rows run the op through ONNX Runtime's CUDA execution provider with IO
binding (kernel_us from CUPTI, wall_us per run).

Run on a CUDA machine (benchmarks/device/kernel_bench.sh runs all of it):
    python benchmarks/kernel_bench.py --harness build/ops/libacttail_bench.so --out docs/results
Decode GEMV parameter sweep (every csrc/bench GEMV configuration per shape; writes the op's per-shape table):
    python benchmarks/kernel_bench.py --harness build/ops/libacttail_bench.so --sweep --out runs/sweep \
        --write-table csrc/sparse_matmul/gemv_table.h
    python benchmarks/kernel_bench.py --from-sweep runs/sweep/kernel_bench_sweep.json --write-table csrc/sparse_matmul/gemv_table.h
Prefill variant (M = 512 rows, mask + cuBLAS, and with --variants 0,4 also the op's own GEMM kernels, against
cuBLAS torch.matmul on unmasked x; harness only):
    python benchmarks/kernel_bench.py --harness build/ops/libacttail_bench.so --no-ort --prefill --variants 0,4 --out docs/results/prefill
CPU variant (fused op vs ONNX Runtime MatMul on the CPU execution provider, SmolLM2-135M shapes):
    python benchmarks/kernel_bench.py --cpu --threads 2 --reps 20 --out docs/results
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

logger = logging.getLogger("kernel_bench")
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))  # LLaMA-2-7B, Llama-3 / Mistral MLP
#: --sweep: the shapes above plus the packed q|k|v and gate|up of LLaMA-2-7B and Mistral-7B (one op, K -> all members)
SWEEP_SHAPES = SHAPES + ((4096, 12288), (4096, 22016), (4096, 6144), (4096, 28672))
SWEEP_SPARSITIES = (0.0, 0.5, 0.8)
DEFAULT_GEMV = (8, 1, 4, 1, -1)  # GemvConfig{} of csrc/sparse_matmul/cuda.h: what a shape outside the table runs
SPARSITIES = (0.0, 0.5, 0.8, 0.9)
L2_BYTES = 60 * 2**20
TARGETS = {0.5: 1.85, 0.8: 3.5, 0.9: 5.0}  # issue #4: kernel speedup over dense cuBLAS


def _cuda_kernel_us(fn, calls: int) -> float:
    """Sum of CUDA kernel durations per call (CUPTI), over one run of fn() doing `calls` calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in ev.name.lower():
            total += ev.time_range.elapsed_us()
    return total / calls


def _call_all(calls) -> None:
    for c in calls:
        c()


def _graph(calls, warmup: int = 2):
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):  # the warm-up stream: per-stream scratch is already there
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    return g


def write_rows(out: str, rows: list) -> None:
    """A harness benchmark's JSON: its command line, the GPU and torch version, and its rows."""
    import torch

    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"command": " ".join(sys.argv), "env": env, "rows": rows}, indent=1) + "\n")


def time_graph(calls, reps: int = 20) -> tuple[float, float]:
    """(graph_us, kernel_us) per call for a list of launch callables captured in one CUDA graph."""
    import torch

    g = _graph(calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    trials = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        trials.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    kernel = _cuda_kernel_us(lambda: [g.replay() for _ in range(3)], 3 * len(calls))
    return statistics.median(trials), kernel


class BenchCall(ctypes.Structure):
    """csrc/bench/harness.cu's BenchCall: one call of the op as ONNX Runtime would make it."""

    _fields_ = [("half", ctypes.c_int), ("x", ctypes.c_void_p), ("w", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("thresholds", ctypes.c_void_p), ("threshold_count", ctypes.c_longlong), ("scale", ctypes.c_void_p),
                ("scale_rows", ctypes.c_longlong), ("workspace", ctypes.c_void_p), ("stream", ctypes.c_void_p),
                ("M", ctypes.c_longlong), ("K", ctypes.c_longlong), ("N", ctypes.c_longlong), ("topk", ctypes.c_int),
                ("ramp", ctypes.c_float), ("G", ctypes.c_int), ("ends", ctypes.POINTER(ctypes.c_longlong)),
                ("ks", ctypes.POINTER(ctypes.c_longlong))]


#: Decode GEMV parameters the harness can force (variant 5): (warps, seg, unroll, chunks, pooled); the float16
#: one-row instances of csrc/sparse_matmul/cuda.cu DispatchGemv.
GEMV_SPACE = [(w, s, u, c, 0) for w in (4, 8) for s in (1, 2) for u in (4, 8) for c in (1, 2, 4)] + \
             [(w, s, u, 1, 1) for w in (4, 8) for s in (1, 2) for u in (4, 8)]


class Harness:
    """ctypes wrapper of libacttail_bench.so (ACTTAIL_BENCH=1 bash scripts/build_ops.sh)."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.err = ctypes.create_string_buffer(512)
        f = self.lib.acttail_bench_sparse_matmul
        f.argtypes = [ctypes.POINTER(BenchCall), ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int]
        f.restype = ctypes.c_int
        b = self.lib.acttail_bench_workspace_bytes
        b.argtypes = [ctypes.POINTER(BenchCall)]
        b.restype = ctypes.c_longlong
        r = self.lib.acttail_bench_read_floor
        r.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        r.restype = ctypes.c_int
        self.variant = 0
        self.gemv: tuple[int, ...] | None = None  # with variant 5: (warps, seg, unroll, chunks, pooled)
        s = self.lib.acttail_bench_topk_select
        s.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 3 + [ctypes.c_char_p, ctypes.c_int]
        s.restype = ctypes.c_int

    @staticmethod
    def call(x, w, y, thr, ws, topk: bool, k: int = 0, *, segments=None, ks=None, ramp: float = 0.0, scale=None,
             stream=None) -> BenchCall:
        """A BenchCall over torch CUDA tensors (x [M, K], w [K, N], y [M, N], thr float32 with 1 or G values)."""
        import torch

        G = len(segments) if segments else 1
        ends = (ctypes.c_longlong * G)(*(segments or [w.shape[1]]))
        kv = (ctypes.c_longlong * G)(*(ks if ks is not None else [k] * G))
        c = BenchCall(int(x.dtype == torch.float16), x.data_ptr(), w.data_ptr(), y.data_ptr(), thr.data_ptr() if thr is not None else None,
                      thr.numel() if thr is not None else 0, scale.data_ptr() if scale is not None else None,
                      (scale.shape[0] if scale.dim() == 2 else 1) if scale is not None else 0, ws.data_ptr() if ws is not None else None,
                      stream if stream is not None else torch.cuda.current_stream().cuda_stream, x.shape[0], x.shape[1], w.shape[1],
                      int(topk), float(ramp), G, ends, kv)
        c._keep = (ends, kv)  # the arrays must outlive the call
        return c

    def run(self, call: BenchCall) -> None:
        gemv = (ctypes.c_int * 5)(*self.gemv) if self.gemv is not None else None
        if self.lib.acttail_bench_sparse_matmul(ctypes.byref(call), self.variant, gemv, self.err, 512):
            raise RuntimeError(self.err.value.decode())

    def matmul(self, x, w, y, thr, ws, topk: bool, k: int, **contract) -> None:
        self.run(self.call(x, w, y, thr, ws, topk, k, **contract))

    def read_floor(self, w, nbytes: int, sink, blocks: int) -> None:
        import torch

        rc = self.lib.acttail_bench_read_floor(w.data_ptr(), nbytes // 16 * 16, sink.data_ptr(), blocks, torch.cuda.current_stream().cuda_stream,
                                               self.err, 512)
        if rc:
            raise RuntimeError(self.err.value.decode())

    def workspace_bytes(self, call: BenchCall) -> int:
        return int(self.lib.acttail_bench_workspace_bytes(ctypes.byref(call)))

    def workspace(self, M: int, K: int, N: int, fill: int = 0, **contract):
        """Device workspace the op would allocate (the larger of both modes), filled with `fill`."""
        import torch

        x = torch.empty(max(M, 1), max(K, 1), device="cuda", dtype=torch.float16)
        w = torch.empty(max(K, 1), max(N, 1), device="cuda", dtype=torch.float16)
        n = 8
        for topk in (False, True):
            probe = self.call(x, w, x, None, None, topk, 0, **contract)
            probe.M, probe.K, probe.N = M, K, N
            n = max(n, self.workspace_bytes(probe))
        return torch.full(((n + 7) // 8,), fill, device="cuda", dtype=torch.int64)

    def select(self, x, ws, k: int) -> None:
        import torch

        rc = self.lib.acttail_bench_topk_select(1, x.data_ptr(), ws.data_ptr(), torch.cuda.current_stream().cuda_stream, x.shape[0], x.shape[1], k,
                                                self.err, 512)
        if rc:
            raise RuntimeError(self.err.value.decode())


def reference_case(x: np.ndarray, w: np.ndarray, mode: str, threshold=None, k=None, *, ks=None, segments=None, ramp: float = 0.0,
                   scale=None) -> tuple[np.ndarray, np.ndarray]:
    """(Y, bound) of :func:`acttail_export.reference.sparse_matmul`, member by member. In top-k mode channels whose
    score is NaN, zero or negative are zeroed first: the op ranks them with key 0 and never keeps them."""
    from acttail_export import reference as ref

    K, N = w.shape
    lead = x.shape[:-1]
    rows = int(np.prod(lead))
    ends = list(segments or [N])
    thresholds = np.resize(np.asarray(0.0 if threshold is None else threshold, np.float32).ravel(), len(ends))
    budgets = list(ks) if ks is not None else [k] * len(ends)
    y, bound = np.zeros((rows, N)), np.zeros((rows, N))
    for g, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):
        member_scale = None if scale is None else (scale if scale.ndim == 1 else scale[g])
        if rows * K == 0:
            continue
        xg = x.reshape(rows, K)
        if mode == "topk":
            xg = np.where(ref.scores(xg, member_scale) > 0, xg, np.zeros((), x.dtype))
        member = ref.Member(threshold=float(thresholds[g]), k=budgets[g], scale=member_scale)
        y[:, lo:hi], bound[:, lo:hi] = ref.sparse_matmul(xg, w[:, lo:hi], mode, [member], None, ramp)
    return y.reshape(lead + (N,)), bound.reshape(lead + (N,))


def mismatch(y: np.ndarray, x: np.ndarray, w: np.ndarray, mode: str, threshold=None, k=None, **contract) -> str:
    """"" when the op's output y agrees with the reference (error within 1e-5 (float32) / 2e-3 (float16) of the bound
    sum |v||w| + |y|, Inf and NaN exactly where the rounded reference has them), else what differs."""
    want, bound = reference_case(x, w, mode, threshold, k, **contract)
    tol = 2e-3 if x.dtype == np.float16 else 1e-5
    got = y.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = want.astype(x.dtype).astype(np.float64)
        err = np.abs(got - want)
        limit = tol * (bound + np.abs(want)) + (1e-7 if x.dtype == np.float16 else 1e-37)
    edge = np.zeros(want.shape, bool)
    if x.dtype == np.float16:  # the float16 overflow edge may round either way after float32 accumulation
        edge = np.isfinite(want) & (np.abs(want) > 65504 * (1 - tol)) & (np.abs(want) < 65520 * (1 + tol))
        if not ((np.isinf(got) & (np.sign(got) == np.sign(want))) | (err <= limit))[edge].all():
            return "wrong value at the float16 overflow edge"
    rest = ~edge
    if not np.array_equal(np.isnan(got)[rest], np.isnan(rounded)[rest]):
        return f"NaN at {np.argwhere(np.isnan(got) != np.isnan(rounded))[:3].tolist()} differs"
    inf = rest & np.isinf(rounded)
    if not np.array_equal(got[inf], rounded[inf]):
        return "Inf placement differs"
    bad = rest & np.isfinite(rounded) & ~(err <= limit)
    return f"max error {err[bad].max():.3g} > limit at {np.argwhere(bad)[:3].tolist()}" if bad.any() else ""


def reference(x, w, mode: str, thr: float | None, k: int):
    import torch

    xf = x.float()
    if mode == "threshold":
        keep = (xf.abs() > thr) & (xf != 0)
    else:
        keep = torch.zeros_like(xf, dtype=torch.bool)
        if k:
            keep.scatter_(1, xf.abs().topk(k, dim=1).indices, True)
    return (torch.where(keep, xf, 0.0) @ w.float())


def ort_sessions(K: int, N: int, library: str, ks: list[int]):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def model(node, extra_inputs=()):
        inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [1, K]), helper.make_tensor_value_info("W", TensorProto.FLOAT16, [K, N])]
        inputs += list(extra_inputs)
        g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [1, N])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acttail", 1)])
        m.ir_version = 8
        return m.SerializeToString()

    def session(blob):
        opts = ort.SessionOptions()
        opts.register_custom_ops_library(library)
        opts.log_severity_level = 3
        return ort.InferenceSession(blob, opts, providers=["CUDAExecutionProvider"])

    sess = {"dense": session(model(helper.make_node("MatMul", ["X", "W"], ["Y"])))}
    sess["threshold"] = session(model(helper.make_node("SparseMatMul", ["X", "W", "t"], ["Y"], domain="com.acttail", mode="threshold"),
                                      [helper.make_tensor_value_info("t", TensorProto.FLOAT, [])]))
    for k in ks:
        sess[("topk", k)] = session(model(helper.make_node("SparseMatMul", ["X", "W"], ["Y"], domain="com.acttail", mode="topk", k=k)))
    return sess


def ort_time(sess, feeds_per_copy, y, runs: int = 60) -> tuple[float, float]:
    """(wall_us per run with IO binding, kernel_us per run from CUPTI), rotating over W copies."""
    import torch

    bindings = []
    for feeds in feeds_per_copy:
        b = sess.io_binding()
        for name, t in feeds.items():
            b.bind_input(name, "cuda", 0, np.float16 if t.dtype == torch.float16 else np.float32, list(t.shape), t.data_ptr())
        b.bind_output("Y", "cuda", 0, np.float16, list(y.shape), y.data_ptr())
        bindings.append(b)

    def loop(n):
        for i in range(n):
            sess.run_with_iobinding(bindings[i % len(bindings)])

    loop(10)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loop(runs)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e6 / runs
    kernel = _cuda_kernel_us(lambda: loop(runs), runs)
    sess.run_with_iobinding(bindings[0])  # leave copy 0's result in y for the caller's check
    torch.cuda.synchronize()
    return wall, kernel


def copy_bandwidth() -> float:
    import torch

    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) * 1e-3) / 1e12


def prefill_table(result: dict) -> str:
    """Markdown table of kernel_bench_prefill.json: per shape, mode and sparsity the kernel time against dense cuBLAS
    (variant 0: mask + cuBLAS; v4: the op's own GEMM kernels) and the mask kernel's share (CUPTI)."""
    rows, env = result["rows"], result["env"]
    out = [f"GPU {env['gpu']}, torch {env['torch']}, M = {rows[0]['M']} rows", "",
           "| K→N | path | sparsity | kernel µs | × dense cuBLAS (kernel) | × (graph) | mask kernel µs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "prefill_cublas_dense":
            out.append(f"| {r['K']}→{r['N']} | dense cuBLAS | – | {r['kernel_us']:.2f} | 1.00× | 1.00× | – |")
            continue
        mask = sum(us for name, us in r.get("kernels_us", {}).items() if "MaskRows" in name)
        out.append(f"| {r['K']}→{r['N']} | {r['method'][len('prefill_harness_'):]} | {r['sparsity']:.1f} | {r['kernel_us']:.2f} | "
                   f"{r['vs_cublas_kernel']:.2f}× | {r['vs_cublas_graph']:.2f}× | {f'{mask:.2f}' if mask else '–'} |")
    return "\n".join(out)


def markdown_tables(result: dict) -> str:
    """Markdown tables (harness kernels vs cuBLAS, ORT rows, top-k selection cost) from kernel_bench.json."""
    rows = result["rows"]
    env = result["env"]
    out = [(f"GPU {env['gpu']}, driver {env['driver']}, torch {env['torch']}, onnxruntime {env.get('onnxruntime', '-')}, "
            f"device copy {env['copy_tb_s']:.2f} TB/s (read+write)"), ""]
    dense = {(r["K"], r["N"]): r for r in rows if r["method"] == "cublas_dense"}
    ort_dense = {(r["K"], r["N"]): r for r in rows if r["method"] == "ort_dense_matmul"}
    out += ["| K→N | mode | sparsity | kept | kernel µs | graph µs | speedup (kernel) | speedup (graph) | ideal | effective TB/s | actual TB/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (K, N), d in dense.items():
        out.append(f"| {K}→{N} | cuBLAS dense | 0 | 1.00 | {d['kernel_us']:.2f} | {d['graph_us']:.2f} | 1.00× | 1.00× | 1× | "
                   f"{d['w_bytes'] / d['kernel_us'] / 1e6:.2f} | {d['w_bytes'] / d['kernel_us'] / 1e6:.2f} |")
        for r in rows:
            if r["K"] == K and r["N"] == N and r["method"].startswith("harness_"):
                out.append(f"| {K}→{N} | {r['method'][8:]} | {r['sparsity']:.1f} | {r['kept_fraction']:.2f} | {r['kernel_us']:.2f} | "
                           f"{r['graph_us']:.2f} | {r['speedup_kernel']:.2f}× | {r['speedup_graph']:.2f}× | {r['ideal']:.0f}× | "
                           f"{r['effective_tb_s']:.2f} | {r['actual_tb_s']:.2f} |")
    floor = {(r["K"], r["N"], r["sparsity"]): r for r in rows if r["method"] == "read_floor"}
    if floor:
        out += ["", "| K→N | sparsity | threshold kernel µs | speedup | streaming read of the kept bytes, µs | its speedup (bound) | target |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            f = floor.get((r["K"], r["N"], r["sparsity"]))
            if r["method"] == "harness_threshold" and f is not None and r["sparsity"] > 0:
                target = TARGETS.get(round(r["sparsity"], 1), "-")
                out.append(f"| {r['K']}→{r['N']} | {r['sparsity']:.1f} | {r['kernel_us']:.2f} | {r['speedup_kernel']:.2f}× | "
                           f"{f['kernel_us']:.2f} | {f['speedup_kernel']:.2f}× | {target}× |")
    out += ["", "| K→N | top-k sparsity | selection kernel µs (CUPTI) | selection, graph µs | whole top-k call, kernel µs |", "|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "harness_topk":
            out.append(f"| {r['K']}→{r['N']} | {r['sparsity']:.1f} | {r['select_kernel_us']:.2f} | {r['select_graph_us']:.2f} | "
                       f"{r['kernel_us']:.2f} |")
    if ort_dense:
        out += ["", "| K→N | ORT node | sparsity | kernel µs (CUPTI) | speedup vs cuBLAS kernel | wall µs per run (IO binding) |",
                "|---|---|---|---|---|---|"]
        for (K, N), d in ort_dense.items():
            speedup = dense[(K, N)]["kernel_us"] / d["kernel_us"]
            out.append(f"| {K}→{N} | MatMul (dense) | 0 | {d['kernel_us']:.2f} | {speedup:.2f}× | {d['wall_us']:.1f} |")
            for r in rows:
                if r["K"] == K and r["N"] == N and r["method"].startswith("ort_") and r["method"] != "ort_dense_matmul":
                    out.append(f"| {K}→{N} | SparseMatMul {r['method'][4:]} | {r['sparsity']:.1f} | {r['kernel_us']:.2f} | "
                               f"{r['speedup_kernel_vs_cublas']:.2f}× | {r['wall_us']:.1f} |")
    return "\n".join(out)


def cpu_session(M: int, K: int, N: int, xs: list, ws: list, case: str, threads: int, library: str | None = None,
                spinning: bool = True):
    """CPU session over one graph of len(ws) independent nodes [M, K] x [K, N], float32, each with its own input
    X<i> and weight initializer W<i>. ``case``: "dense MatMul" (ONNX Runtime's MatMul), or "threshold S%" /
    "topk S%" (``SparseMatMul``: threshold at the S quantile of |X<i>|, or k = K - ⌊sK⌋). ``library``: the op
    library (default: the package's); ``spinning=False`` keeps idle pool threads from spinning."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from acttail_export.ops import get_library_path

    nodes, inits = [], []
    for i, w in enumerate(ws):
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        if case == "dense MatMul":
            nodes.append(helper.make_node("MatMul", [f"X{i}", f"W{i}"], [f"Y{i}"]))
            continue
        mode, s = case.split()
        s = float(s.rstrip("%")) / 100
        if mode == "threshold":
            inits.append(numpy_helper.from_array(np.array(np.quantile(np.abs(xs[i]), s), np.float32), f"t{i}"))
            nodes.append(helper.make_node("SparseMatMul", [f"X{i}", f"W{i}", f"t{i}"], [f"Y{i}"], domain="com.acttail", mode="threshold"))
        else:
            nodes.append(helper.make_node("SparseMatMul", [f"X{i}", f"W{i}"], [f"Y{i}"], domain="com.acttail", mode="topk",
                                          k=K - int(s * K)))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"X{i}", TensorProto.FLOAT, [M, K]) for i in range(len(ws))],
                          [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [M, N]) for i in range(len(ws))], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acttail", 1)])
    m.ir_version = 8
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library or get_library_path()))
    opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def cpu_bench(out: Path, threads: int, runs: int, row_counts: tuple[int, ...] = (1, 512)) -> dict:
    """CPU execution provider: SparseMatMul (fused) vs ORT MatMul, SmolLM2-135M projection shapes, float32.

    One graph per case holds `layers` independent nodes of one shape, each with its own input and its own
    weight initializer (M = 1: 24 weights, 30-85 MB, more than the L3 cache, so W comes from memory as in
    decoding; M rows: max(3, 1536 // M)), so one `run` amortizes the Python / session overhead over many projections. The
    sessions are timed one after the other in blocks, never interleaved: an idle session's spinning pool
    threads would otherwise take the cores from the one being timed.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    rows = []
    cases = ["dense MatMul"] + [f"{mode} {s}%" for s in (0, 50, 80, 90) for mode in ("threshold", "topk")]
    for K, N in ((576, 576), (576, 1536), (1536, 576)):
        for M, layers in ((M, 24 if M == 1 else max(3, 1536 // M)) for M in row_counts):
            ws = [(rng.standard_normal((K, N)) * 0.02).astype(np.float32) for _ in range(layers)]
            xs = [rng.standard_normal((M, K)).astype(np.float32) for _ in range(layers)]
            feeds = {f"X{i}": x for i, x in enumerate(xs)}
            calls = runs * (10 if M == 1 else 1)
            for case in cases:
                sess = cpu_session(M, K, N, xs, ws, case, threads)
                for _ in range(3):
                    sess.run(None, feeds)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    sess.run(None, feeds)
                    times.append(time.perf_counter() - t0)
                us = statistics.median(times) / layers * 1e6
                rows.append({"K": K, "N": N, "M": M, "case": case, "us": us, "ms": us / 1e3, "layers": layers,
                             "w_gb_s": K * N * 4 / us / 1e3})
                logger.info("%d->%d M=%d %s: %.1f us per projection (%.1f GB/s of W)", K, N, M, case, us, rows[-1]["w_gb_s"])
                del sess
                time.sleep(0.2)  # let this ORT session's pool threads stop spinning
    dense = {(r["K"], r["N"], r["M"]): r["us"] for r in rows if r["case"] == "dense MatMul"}
    for r in rows:
        r["speedup"] = dense[(r["K"], r["N"], r["M"])] / r["us"]
    result = {"env": {"cpu": platform.processor() or platform.machine(), "threads": threads, "calls": runs,
                      "onnxruntime": ort.__version__, "method": "per projection, graphs of independent nodes, median"}, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_bench_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(cpu_table(result))
    return result


def cpu_table(result: dict) -> str:
    """Markdown table of a kernel_bench_cpu.json: µs per projection and speedup over ORT's MatMul."""
    rows = result["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = [f"CPU: {result['env']['cpu']}, {result['env']['threads']} intra-op threads, onnxruntime {result['env'].get('onnxruntime', '?')}", "",
             "| K→N | rows | " + " | ".join(cases) + " |", "|---|---|" + "---|" * len(cases)]
    for key in dict.fromkeys((r["K"], r["N"], r["M"]) for r in rows):
        by = {r["case"]: r for r in rows if (r["K"], r["N"], r["M"]) == key}
        cells = [f"{by[c]['us']:.1f} µs" + ("" if c == "dense MatMul" else f" ({by[c]['speedup']:.2f}×)") for c in cases]
        lines.append(f"| {key[0]}→{key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cuda_kernel_breakdown(fn, calls: int) -> dict[str, float]:
    """Per-call CUDA time of each kernel name (CUPTI) over one run of fn() doing `calls` calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in ev.name.lower():
            out[ev.name] = out.get(ev.name, 0.0) + ev.time_range.elapsed_us() / calls
    return out


def prefill_bench(h: Harness, args, env: dict) -> dict:
    """M = args.prefill_rows rows (prefill, the masked GEMM path) of the LLaMA-2-7B shapes, fp16, against cuBLAS.

    Rows: prefill_cublas_dense (torch.matmul into a preallocated output) and prefill_harness_<mode> per sparsity;
    TFLOP/s counts the dense 2*M*K*N for every row (so it compares like with like), W rotated over copies
    (L2 flushed between calls) as in the decode benchmark, one x per copy of W.
    """
    import torch

    M = args.prefill_rows
    rows = []
    for K, N in SHAPES:
        wbytes = K * N * 2
        flop = 2.0 * M * K * N
        copies = max(3, math.ceil(3 * L2_BYTES / wbytes))
        W = [torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
        X = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in range(copies)]
        Y = torch.empty(M, N, device="cuda", dtype=torch.float16)
        ws = h.workspace(M, K, N)
        reps = max(1, 48 // copies)
        calls = [partial(torch.matmul, X[c], W[c], out=Y) for c in range(copies)] * reps
        dense_graph, dense_kernel = time_graph(calls, args.reps)
        base = {"M": M, "K": K, "N": N, "copies": copies, "w_bytes": wbytes}
        rows.append(base | {"method": "prefill_cublas_dense", "sparsity": 0.0, "graph_us": dense_graph, "kernel_us": dense_kernel,
                            "tflop_s": flop / (dense_kernel * 1e-6) / 1e12})
        logger.info("prefill M=%d %dx%d cuBLAS dense: graph %.2f us, kernels %.2f us (%.0f TFLOP/s)", M, K, N, dense_graph, dense_kernel,
                    rows[-1]["tflop_s"])
        for s in SPARSITIES:
            k = K - int(s * K)
            thr = [torch.quantile(x.float().abs().flatten()[:2**24], s).reshape(()) if s > 0 else torch.zeros((), device="cuda") for x in X]
            for mode, variant in [(m, v) for m in args.modes.split(",") for v in (int(v) for v in args.variants.split(","))]:
                h.variant = variant
                h.matmul(X[0], W[0], Y, thr[0], ws, mode == "topk", k)
                ref = reference(X[0], W[0], mode, float(thr[0]), k)
                err = float((Y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                kept = float((((X[0].float().abs() > thr[0]) & (X[0] != 0)).sum()) / X[0].numel() if mode == "threshold" else k / K)
                calls = [partial(h.matmul, X[c], W[c], Y, thr[c], ws, mode == "topk", k) for c in range(copies)] * reps
                g_us, k_us = time_graph(calls, args.reps)
                per_kernel = _cuda_kernel_breakdown(partial(_call_all, calls), len(calls))
                row = base | {"method": f"prefill_harness_{mode}" + (f"_v{variant}" if variant else ""), "sparsity": s, "kept_fraction": kept,
                              "graph_us": g_us, "kernel_us": k_us,
                              "kernels_us": per_kernel, "max_rel_err": err, "tflop_s": flop / (k_us * 1e-6) / 1e12,
                              "vs_cublas_kernel": dense_kernel / k_us, "vs_cublas_graph": dense_graph / g_us}
                rows.append(row)
                logger.info("prefill M=%d %dx%d %s v%d s=%.1f: graph %.2f us (%.2fx cuBLAS), kernels %.2f us (%.2fx, %.0f TFLOP/s), err %.1e; %s",
                            M, K, N, mode, variant, s, g_us, row["vs_cublas_graph"], k_us, row["vs_cublas_kernel"], row["tflop_s"], err,
                            ", ".join(f"{n[:40]} {t:.2f}" for n, t in per_kernel.items()))
        del W, X
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"env": env, "rows": rows}
    (out / "kernel_bench_prefill.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'kernel_bench_prefill.json'}")
    return result


def time_graph_us(calls, reps: int = 10, trials: int = 3) -> float:
    """Median per-call time (µs) of a CUDA graph holding `calls`, replayed `reps` times per trial (no CUPTI)."""
    import torch

    g = _graph(calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    trial_us = []
    for _ in range(trials):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        trial_us.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    return statistics.median(trial_us)


def choose_gemv(dense_us: float, timings: dict[tuple, list[float]], target: float = 0.98) -> tuple[tuple, str]:
    """The configuration the op should run for one shape, and why. Candidates at 0 % sparsity within `target` of dense
    cuBLAS (time <= dense / target) compete on the sum of their sparse times; if none is, the fastest at 0 %."""
    ok = {cfg: t for cfg, t in timings.items() if t[0] <= dense_us / target}
    if ok:
        best = min(ok, key=lambda cfg: (sum(ok[cfg][1:]), ok[cfg][0]))
        return best, f"fastest sparse among {len(ok)} configurations >= {target:.2f}x cuBLAS at 0 %"
    best = min(timings, key=lambda cfg: timings[cfg][0])
    return best, f"no configuration reaches {target:.2f}x cuBLAS at 0 %: the fastest at 0 %"


def gemv_sweep(h: Harness, args, env: dict) -> dict:
    """Every GEMV_SPACE configuration (and the default) of the float16 one-row decode GEMV, threshold mode, per shape
    at SWEEP_SPARSITIES, against dense cuBLAS (torch.matmul), W rotated over copies (L2 flushed), graph time. Writes
    kernel_bench_sweep.json (rows and the chosen table) and, with --write-table, the op's table header."""
    import torch

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SWEEP_SHAPES
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, table = [], []
    t0 = time.time()
    for K, N in shapes:
        copies = max(3, math.ceil(3 * L2_BYTES / (K * N * 2)))
        W = [torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
        X = [torch.randn(1, K, device="cuda", dtype=torch.float16) for _ in range(copies)]
        Y = torch.empty(1, N, device="cuda", dtype=torch.float16)
        ws = h.workspace(1, K, N)
        reps = max(1, 48 // copies)
        dense_us = time_graph_us([partial(torch.matmul, X[c], W[c], out=Y) for c in range(copies)] * reps, args.reps)
        thr = {s: [torch.quantile(x.float().abs(), s).reshape(()) if s > 0 else torch.zeros((), device="cuda") for x in X]
               for s in SWEEP_SPARSITIES}
        timings: dict[tuple, list[float]] = {}
        for cfg in [DEFAULT_GEMV, *GEMV_SPACE]:
            h.variant, h.gemv = 5, cfg
            h.matmul(X[0], W[0], Y, thr[0.5][0], ws, False, 0)
            want = reference(X[0], W[0], "threshold", float(thr[0.5][0]), 0)
            err = float((Y.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
            if err > 1e-2:
                raise RuntimeError(f"GEMV {cfg} on {K}x{N}: relative error {err:.2e}")
            timings[cfg] = [time_graph_us([partial(h.matmul, X[c], W[c], Y, thr[s][c], ws, False, 0) for c in range(copies)] * reps,
                                          args.reps) for s in SWEEP_SPARSITIES]
            rows.append({"K": K, "N": N, "gemv": list(cfg), "dense_us": dense_us, "us": timings[cfg],
                         "vs_cublas": [dense_us / t for t in timings[cfg]]})
        best, why = choose_gemv(dense_us, timings)
        entry = {"sms": sms, "K": K, "N": N, "gemv": list(best), "dense_us": dense_us, "us": timings[best],
                 "vs_cublas": [dense_us / t for t in timings[best]], "default_vs_cublas": [dense_us / t for t in timings[DEFAULT_GEMV]],
                 "why": why}
        table.append(entry)
        logger.info("%dx%d: cuBLAS %.2f us; chosen %s: %s x cuBLAS at %s (default %s); %s; %.0f s", K, N, dense_us, best,
                    "/".join(f"{v:.2f}" for v in entry["vs_cublas"]), "/".join(f"{s:.0%}" for s in SWEEP_SPARSITIES),
                    "/".join(f"{v:.2f}" for v in entry["default_vs_cublas"]), why, time.time() - t0)
        del W, X
        torch.cuda.empty_cache()
    h.variant, h.gemv = 0, None
    result = {"env": env | {"sms": sms, "sparsities": list(SWEEP_SPARSITIES)}, "rows": rows, "table": table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_bench_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'kernel_bench_sweep.json'}")
    if args.write_table:
        write_table(result, Path(args.write_table))
    return result


def write_table(sweep: dict, header: Path) -> None:
    """Replace the entries between the BEGIN/END TABLE markers of csrc/sparse_matmul/gemv_table.h by the sweep's choice."""
    text = header.read_text()
    begin, end = text.index("// BEGIN TABLE"), text.index("// END TABLE")
    env = sweep["env"]
    lines = [(f"// BEGIN TABLE (written by benchmarks/kernel_bench.py --write-table from a sweep on {env['gpu']}, {env['sms']} SMs; "
              f"x cuBLAS at {'/'.join(f'{s:.0%}' for s in env['sparsities'])} sparsity)"), "inline constexpr GemvTableEntry kGemvTable[] = {"]
    for e in sweep["table"]:
        w, sg, u, c, p = e["gemv"]
        ratios = "/".join(f"{v:.2f}" for v in e["vs_cublas"])
        lines.append(f"    {{{e['sms']}, {e['K']}, {e['N']}, GemvConfig{{{w}, {sg}, {u}, {c}, {p}}}}},  // {ratios}")
    if not sweep["table"]:
        lines.append("    {0, 0, 0, GemvConfig{}},  // no sweep recorded yet")
    lines.append("};\n")
    header.write_text(text[:begin] + "\n".join(lines) + text[end:])
    print(f"wrote {len(sweep['table'])} entries into {header}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness", help="libacttail_bench.so (ACTTAIL_BENCH=1 bash scripts/build_ops.sh; required to measure)")
    ap.add_argument("--table", metavar="JSON", help="print the markdown tables of docs/kernels.md from a kernel_bench.json and exit")
    ap.add_argument("--library", default=None, help="libacttail_ops.so for the ORT rows (default: acttail_export.ops)")
    ap.add_argument("--out", default="docs/results", help="folder for kernel_bench.json")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows")
    ap.add_argument("--variants", default="0", help="comma-separated harness variants to time (csrc/bench/harness.cu: 0 = the "
                    "op's plan, 1 = memset scratch, 2 = plain grid, 3 = pooled grid; with --prefill: 0 = the op's plan "
                    "(cuBLAS), 4 = the op's own tensor-core / exact GEMM kernels); rows of variants other than 0 are "
                    "named harness_<mode>_v<N> (prefill_harness_<mode>_v<N>)")
    ap.add_argument("--modes", default="threshold,topk", help="comma-separated: threshold, topk")
    ap.add_argument("--floor", action="store_true", help="also time a plain streaming read of the kept bytes (contiguous, "
                    "read_floor rows): the bandwidth floor of each row")
    ap.add_argument("--hot-x", action="store_true", help="one x (and threshold) for every copy of W, so x stays in L2 as in decode, "
                    "where the previous op has just written it (default: one x per copy of W, evicted with it)")
    ap.add_argument("--prefill", action="store_true", help="prefill benchmark instead (harness only): M = --prefill-rows rows of the "
                    "LLaMA-2-7B shapes through the masked GEMM path vs cuBLAS torch.matmul; writes kernel_bench_prefill.json")
    ap.add_argument("--prefill-rows", type=int, default=512, help="rows (tokens) of the prefill benchmark")
    ap.add_argument("--sweep", action="store_true", help="decode GEMV parameter sweep instead (harness only): every GEMV_SPACE "
                    "configuration per shape vs cuBLAS; writes kernel_bench_sweep.json")
    ap.add_argument("--shapes", default="", help="comma-separated KxN shapes of the sweep (default: SWEEP_SHAPES)")
    ap.add_argument("--write-table", metavar="HEADER", help="with --sweep or --from-sweep: write the chosen configurations into this "
                    "header (csrc/sparse_matmul/gemv_table.h)")
    ap.add_argument("--from-sweep", metavar="JSON", help="with --write-table: take the table from a kernel_bench_sweep.json, measure nothing")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark instead: fused op vs ORT MatMul, SmolLM2 shapes")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the CPU benchmark")
    ap.add_argument("--cpu-rows", default="1,512", help="comma-separated row counts M of the CPU benchmark (1 = decode)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.table:
        data = json.loads(Path(args.table).read_text())
        first = data["rows"][0]
        print(cpu_table(data) if "case" in first else prefill_table(data) if first["method"].startswith("prefill_") else markdown_tables(data))
        return 0
    if args.from_sweep:
        if not args.write_table:
            ap.error("--from-sweep needs --write-table")
        write_table(json.loads(Path(args.from_sweep).read_text()), Path(args.write_table))
        return 0
    if args.cpu:
        cpu_bench(Path(args.out), args.threads, runs=args.reps, row_counts=tuple(int(m) for m in args.cpu_rows.split(",")))
        print(f"wrote {Path(args.out) / 'kernel_bench_cpu.json'}")
        return 0
    if not args.harness:
        ap.error("--harness is required to measure (or use --table / --cpu)")

    import torch

    if not torch.cuda.is_available():
        print("kernel_bench: needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    h = Harness(args.harness)
    variants = [int(v) for v in args.variants.split(",")]
    lib = args.library
    if lib is None and not args.no_ort and not args.prefill:
        from acttail_export.ops import get_library_path

        lib = get_library_path()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "l2_bytes_assumed": L2_BYTES, "copy_tb_s": round(copy_bandwidth(), 3), "hot_x": args.hot_x}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], check=False, capture_output=True,
                                   text=True).stdout.strip()
    logger.info("env %s", env)
    if args.prefill:
        prefill_bench(h, args, env)
        return 0
    if args.sweep:
        gemv_sweep(h, args, env)
        return 0
    rows = []
    for K, N in SHAPES:
        wbytes = K * N * 2
        copies = max(3, math.ceil(3 * L2_BYTES / wbytes))
        W = [torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
        X = [torch.randn(1, K, device="cuda", dtype=torch.float16) for _ in range(1 if args.hot_x else copies)] * (copies if args.hot_x else 1)
        Y = torch.empty(1, N, device="cuda", dtype=torch.float16)
        ws = h.workspace(1, K, N)
        calls = [partial(torch.matmul, X[c], W[c], out=Y) for c in range(copies)] * max(1, 48 // copies)
        dense_graph, dense_kernel = time_graph(calls, args.reps)
        base = {"K": K, "N": N, "copies": copies, "w_bytes": wbytes}
        rows.append(base | {"method": "cublas_dense", "sparsity": 0.0, "graph_us": dense_graph, "kernel_us": dense_kernel})
        logger.info("%dx%d cuBLAS dense: graph %.2f us, kernels %.2f us", K, N, dense_graph, dense_kernel)
        sess = ort_sessions(K, N, lib, [K - int(s * K) for s in SPARSITIES]) if not args.no_ort else None
        if sess is not None:
            wall, kern = ort_time(sess["dense"], [{"X": X[c], "W": W[c]} for c in range(copies)], Y)
            rows.append(base | {"method": "ort_dense_matmul", "sparsity": 0.0, "wall_us": wall, "kernel_us": kern})
            logger.info("%dx%d ORT dense MatMul: wall %.2f us, kernels %.2f us", K, N, wall, kern)
        if args.floor:
            sink = torch.zeros(64, device="cuda", dtype=torch.int32)
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            for s in SPARSITIES:
                nbytes = int(wbytes * (1 - s))
                best = None
                for per_sm in (1, 2, 4):
                    calls = [partial(h.read_floor, W[c], nbytes, sink, per_sm * sms) for c in range(copies)] * max(1, 48 // copies)
                    g_us, k_us = time_graph(calls, args.reps)
                    if best is None or k_us < best[1]:
                        best = (g_us, k_us, per_sm)
                rows.append(base | {"method": "read_floor", "sparsity": s, "bytes": nbytes, "graph_us": best[0], "kernel_us": best[1],
                                    "blocks_per_sm": best[2], "tb_s": nbytes / (best[1] * 1e-6) / 1e12,
                                    "speedup_kernel": dense_kernel / best[1]})
                logger.info("%dx%d read floor %.1f MB: graph %.2f us, kernel %.2f us (%.2f TB/s, %.2fx cuBLAS)", K, N, nbytes / 1e6, best[0],
                            best[1], rows[-1]["tb_s"], rows[-1]["speedup_kernel"])
        for s in SPARSITIES:
            k = K - int(s * K)  # channels kept
            thr = [torch.quantile(x.float().abs(), s).reshape(()) if s > 0 else torch.zeros((), device="cuda") for x in X]
            for mode, variant in [(m, v) for m in args.modes.split(",") for v in variants]:
                h.variant = variant
                # correctness of this configuration first
                h.matmul(X[0], W[0], Y, thr[0], ws, mode == "topk", k)
                ref = reference(X[0], W[0], mode, float(thr[0]), k)
                err = float((Y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                kept = float((((X[0].float().abs() > thr[0]) & (X[0] != 0)).sum()) if mode == "threshold" else k) / K
                calls = [partial(h.matmul, X[c], W[c], Y, thr[c], ws, mode == "topk", k) for c in range(copies)] * max(1, 48 // copies)
                g_us, k_us = time_graph(calls, args.reps)
                row = base | {"method": f"harness_{mode}" + (f"_v{variant}" if variant else ""), "sparsity": s, "kept_fraction": kept,
                              "graph_us": g_us, "kernel_us": k_us,
                              "max_rel_err": err, "speedup_graph": dense_graph / g_us, "speedup_kernel": dense_kernel / k_us,
                              "ideal": 1 / (1 - s), "effective_tb_s": wbytes / (k_us * 1e-6) / 1e12,
                              "actual_tb_s": kept * wbytes / (k_us * 1e-6) / 1e12}
                if mode == "topk" and variant == 0:
                    sel_calls = [partial(h.select, X[c], ws, k) for c in range(copies)] * max(1, 48 // copies)
                    row["select_graph_us"], row["select_kernel_us"] = time_graph(sel_calls, args.reps)
                rows.append(row)
                logger.info("%dx%d %s v%d s=%.1f: graph %.2f us (%.2fx), kernels %.2f us (%.2fx, ideal %.1fx), %.2f TB/s actual, err %.1e",
                            K, N, mode, variant, s, g_us, row["speedup_graph"], k_us, row["speedup_kernel"], row["ideal"], row["actual_tb_s"], err)
                if sess is not None and variant == 0:
                    key = "threshold" if mode == "threshold" else ("topk", k)
                    feeds = [{"X": X[c], "W": W[c]} | ({"t": thr[c].float()} if mode == "threshold" else {}) for c in range(copies)]
                    wall, kern = ort_time(sess[key], feeds, Y)
                    ort_err = float((Y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                    rows.append(base | {"method": f"ort_{mode}", "sparsity": s, "wall_us": wall, "kernel_us": kern,
                                        "speedup_kernel_vs_cublas": dense_kernel / kern, "max_rel_err": ort_err})
                    logger.info("   ORT %s: wall %.2f us, kernels %.2f us (%.2fx vs cuBLAS kernels), err %.1e", mode, wall, kern,
                                dense_kernel / kern, ort_err)
        del W, X
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_bench.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out / 'kernel_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
