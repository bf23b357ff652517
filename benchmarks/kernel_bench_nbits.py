"""Kernel benchmark of com.acttail::SparseMatMulNBits (4-bit W) on CUDA against ORT's MatMulNBits and cuBLAS fp16.

Shapes 4096->4096, 4096->11008, 11008->4096, 4096->14336, 14336->4096 (LLaMA-2-7B / Llama-3 / Mistral projections),
decode (1 row) and prefill (512 rows), sparsity 0/50/70/80/90 % (threshold mode at the quantile of |x|; --modes adds
topk). Same random weights for every method: q, fp16 scales, and for MatMulNBits (block 32) uint8 zero points with
our offsets = -zp * scale. In one process:

* nbits_graph: the op's CUDA path through the harness (libacttail_bench.so, ctypes), calls captured in one CUDA graph
  and rotated over weight copies whose total exceeds 3 x the 60 MB L2 (every call reads its weights from DRAM):
  graph_us = CUDA-event time of replays per call, kernel_us = CUPTI sum of kernel durations per call (torch.profiler).
* nbits_ort / matmulnbits_ort: one ONNX Runtime CUDA session per method holding one node per weight copy
  (weights as initializers, as in a model; consecutive nodes read different weights), IO binding, kernel_us from CUPTI
  per node; wall_us per node for reference.
* cublas_fp16: torch.matmul on the dequantized fp16 weights (graph + CUPTI, rotated like the harness rows).
* read_floor: the harness' plain streaming read of as many bytes as the op reads (--floor).
Bytes of the op: Q + scales + offsets = K*N/2 + 4*N*ceil(K/B); effective TB/s = those bytes / kernel time (any
sparsity: the speed a dense 4-bit read would need), actual TB/s = bytes read (kept rows of Q, the scales / offsets of
the blocks a row keeps) / kernel time. MatMulNBits reads K*N/2 + N*ceil(K/32)*2.5 bytes. Copy bandwidth (read +
write of a 1 GiB device copy) is measured in the same run.

Run on a CUDA machine (see csrc/sparse_matmul_nbits/README.md for the exact commands):
    python benchmarks/kernel_bench_nbits.py --harness build/ops/libacttail_bench.so --out docs/results/nbits
    python benchmarks/kernel_bench_nbits.py --table docs/results/nbits/kernel_bench_nbits.json
    python benchmarks/kernel_bench_nbits.py --harness ... --sweep --out ...   # decode parameters per shape
Correctness of every harness path against numpy: tests/test_ops_nbits_harness.py (also under compute-sanitizer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from acttail_export.nbits_harness import BLOCK, Harness

logger = logging.getLogger("kernel_bench_nbits")
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9)
L2_BYTES = 60 * 2**20


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def cuda_kernel_us(fn, calls: int, breakdown: bool = False):
    """Per-call sum of CUDA kernel durations (CUPTI) over one run of fn() making `calls` calls (and per kernel name)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in ev.name.lower() and "memset" not in ev.name.lower():
            per[ev.name] = per.get(ev.name, 0.0) + ev.time_range.elapsed_us() / calls
    total = sum(per.values())
    return (total, per) if breakdown else total


def time_graph(calls, reps: int = 20) -> tuple[float, float, dict]:
    """(graph_us, kernel_us, per-kernel us) per call of a list of launch callables captured in one CUDA graph."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):  # the warm-up stream: the per-stream scratch already exists there
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    trials = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        trials.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    kernel, per = cuda_kernel_us(lambda: [g.replay() for _ in range(3)], 3 * len(calls), breakdown=True)
    return statistics.median(trials), kernel, per


def copy_bandwidth() -> float:
    """TB/s of a 1 GiB device-to-device copy, read + write."""
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


# --------------------------------------------------------------------------------------------
# weights and sessions
# --------------------------------------------------------------------------------------------
def dequantized(q_packed, scales, offsets, N: int, block: int = BLOCK):
    """float32 W [K, N] = s q + o of the op's layout on the device (q_packed [K, ceil(N/2)], scales / offsets [ceil(K/B), N])."""
    import torch

    K = q_packed.shape[0]
    rows = torch.arange(K, device=q_packed.device) // block
    q = torch.stack([q_packed & 15, q_packed >> 4], dim=-1).reshape(K, -1)[:, :N].float()
    return scales.float()[rows] * q + offsets.float()[rows]


class Weights:
    """One random 4-bit weight in both layouts: ours (q [K, N/2], scales / offsets [K/B, N]) and MatMulNBits'
    (B [N, K/32, 16], scales [N * K/32], packed uint8 zero points), on the device (torch) and on the host."""

    def __init__(self, rng, K: int, N: int, block: int = BLOCK):
        import torch

        nb = (K + block - 1) // block
        q = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
        zp = rng.integers(6, 10, size=(nb, N), dtype=np.uint8)
        s = (rng.uniform(0.5, 1.5, size=(nb, N)) * 0.02 / 7.5).astype(np.float16)
        self.K, self.N, self.block = K, N, block
        self.q_packed = q[:, 0::2] | (q[:, 1::2] << 4)
        self.scales = s
        self.offsets = (-zp.astype(np.float32) * s.astype(np.float32)).astype(np.float16)
        kp = nb * block  # MatMulNBits: per column n, block b, byte j holds k = b*B + 2j (low) and 2j + 1 (high)
        qt = np.zeros((N, kp), np.uint8)
        qt[:, :K] = q.T
        self.mnb_b = (qt[:, 0::2] | (qt[:, 1::2] << 4)).reshape(N, nb, block // 2)
        self.mnb_scales = s.T.reshape(-1).copy()
        zpt = np.zeros((N, nb + nb % 2), np.uint8)
        zpt[:, :nb] = zp.T
        self.mnb_zp = (zpt[:, 0::2] | (zpt[:, 1::2] << 4)).reshape(-1)
        self.dev = {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))).cuda() for name in ("q_packed", "scales", "offsets")}
        self.nbytes = K * N // 2 + 4 * N * nb
        self.mnb_bytes = self.mnb_b.nbytes + self.mnb_scales.nbytes + self.mnb_zp.nbytes

    def dense(self):
        """The dequantized float16 W [K, N] on the device."""
        return dequantized(self.dev["q_packed"], self.dev["scales"], self.dev["offsets"], self.N, self.block).half()


def ort_session(kind: str, ws: list[Weights], M: int, library: str, thresholds: list[float] | None = None, k: int | None = None,
                topk: bool = False):
    """One CUDA session with one node per weight copy, all reading the same X [M, K] input: kind "nbits" (ours) or
    "matmulnbits" (com.microsoft, block 32, uint8 zero points)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    K, N = ws[0].K, ws[0].N
    nodes, inits = [], []
    for i, w in enumerate(ws):
        if kind == "nbits":
            inits += [numpy_helper.from_array(w.q_packed, f"q{i}"), numpy_helper.from_array(w.scales, f"s{i}"),
                      numpy_helper.from_array(w.offsets, f"o{i}")]
            attrs = {"K": K, "N": N, "block_size": w.block, "bits": 4, "mode": "topk" if topk else "threshold"}
            if topk:
                attrs["k"] = k
                names = ["X", f"q{i}", f"s{i}", f"o{i}"]
            else:
                inits.append(numpy_helper.from_array(np.array(thresholds[i], np.float32), f"t{i}"))
                names = ["X", f"q{i}", f"s{i}", f"o{i}", f"t{i}"]
            nodes.append(helper.make_node("SparseMatMulNBits", names, [f"Y{i}"], domain="com.acttail", **attrs))
        else:
            inits += [numpy_helper.from_array(w.mnb_b, f"b{i}"), numpy_helper.from_array(w.mnb_scales, f"s{i}"),
                      numpy_helper.from_array(w.mnb_zp, f"z{i}")]
            nodes.append(helper.make_node("MatMulNBits", ["X", f"b{i}", f"s{i}", f"z{i}"], [f"Y{i}"], domain="com.microsoft", K=K, N=N,
                                          bits=4, block_size=w.block))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [M, K])],
                              [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT16, [M, N]) for i in range(len(ws))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acttail", 1),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(library)
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])


def ort_time(sess, x, n_out: int, N: int, runs: int = 20) -> tuple[float, float, dict, list]:
    """(wall_us per node, kernel_us per node, per-kernel us per node, outputs of node 0 and 1) with IO binding."""
    import torch

    ys = [torch.empty((x.shape[0], N), dtype=torch.float16, device="cuda") for _ in range(n_out)]
    b = sess.io_binding()
    b.bind_input("X", "cuda", 0, np.float16, list(x.shape), x.data_ptr())
    for i, y in enumerate(ys):
        b.bind_output(f"Y{i}", "cuda", 0, np.float16, list(y.shape), y.data_ptr())
    for _ in range(3):
        sess.run_with_iobinding(b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run_with_iobinding(b)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e6 / (runs * n_out)
    kernel, per = cuda_kernel_us(lambda: [sess.run_with_iobinding(b) for _ in range(runs)], runs * n_out, breakdown=True)
    return wall, kernel, per, ys[:2]


def kept_bytes(x, thr: float, K: int, N: int, block: int) -> int:
    """Bytes the op reads at threshold thr: kept rows of Q, scales + offsets of the blocks any row keeps."""
    keep = ((x.float().abs() > thr) & (x != 0)).any(dim=0).cpu().numpy()
    nb = (K + block - 1) // block
    touched = np.zeros(nb, bool)
    np.logical_or.at(touched, np.arange(K) // block, keep)
    return int(keep.sum()) * N // 2 + int(touched.sum()) * 4 * N


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
def bench_shape(h: Harness, K: int, N: int, M: int, args, library: str | None, rng, others: dict | None = None) -> list[dict]:
    import torch

    ref_bytes = K * N // 2 + 4 * N * ((K + BLOCK - 1) // BLOCK)
    copies = max(3, math.ceil(3 * L2_BYTES / ref_bytes))
    ws = [Weights(rng, K, N) for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    y = torch.empty(M, N, device="cuda", dtype=torch.float16)
    reps = max(1, 48 // copies)
    base = {"K": K, "N": N, "M": M, "copies": copies, "bytes": ref_bytes, "mnb_bytes": ws[0].mnb_bytes}
    rows = []
    dense_copies = max(3, math.ceil(3 * L2_BYTES / (K * N * 2)))
    wd = [ws[i % copies].dense() for i in range(dense_copies)]
    calls = [lambda c=c: torch.matmul(x, wd[c], out=y) for c in range(dense_copies)] * max(1, 48 // dense_copies)
    g_us, k_us, _ = time_graph(calls, args.reps)
    rows.append(base | {"method": "cublas_fp16", "sparsity": 0.0, "graph_us": g_us, "kernel_us": k_us, "dense_bytes": K * N * 2})
    logger.info("%dx%d M=%d cuBLAS fp16: graph %.2f us, kernels %.2f us", K, N, M, g_us, k_us)
    ref = x.float() @ wd[0].float()
    wd = calls = None  # free the dense copies
    torch.cuda.empty_cache()
    if library is not None and not args.no_ort:
        sess = ort_session("matmulnbits", ws, M, library)
        wall, k_us, per, outs = ort_time(sess, x, copies, N, args.runs)
        err = float((outs[0].float() - ref).abs().max() / ref.abs().max())
        rows.append(base | {"method": "matmulnbits_ort", "sparsity": 0.0, "wall_us": wall, "kernel_us": k_us, "kernels_us": per,
                            "max_rel_err_vs_fp16": err, "tb_s": ws[0].mnb_bytes / k_us / 1e6})
        logger.info("%dx%d M=%d ORT MatMulNBits: kernels %.2f us (%.2f TB/s), wall %.1f us/node, err %.1e; %s", K, N, M, k_us,
                    rows[-1]["tb_s"], wall, err, ", ".join(f"{n[:40]} {t:.2f}" for n, t in per.items()))
        del sess
    for s in [float(v) for v in args.sparsities.split(",")] if args.sparsities else SPARSITIES:
        thr = float(torch.quantile(x.float().abs().flatten()[: 2**24], s)) if s > 0 else 0.0
        k = K - int(s * K)
        for mode in args.modes.split(","):
            topk = mode == "topk"
            thr_t = torch.tensor([thr], dtype=torch.float32, device="cuda")
            mk = [Harness.call(x, w.dev["q_packed"], w.dev["scales"], w.dev["offsets"], y, thresholds=None if topk else thr_t, topk=topk,
                               ks=(k,)) for w in ws]
            work = h.workspace(mk[0])
            for c in mk:
                c.workspace = work.data_ptr()
            h.run(mk[0])
            got = y.float().clone()
            xm = torch.where((x.float().abs() > thr) & (x != 0), x.float(), 0.0) if not topk else None
            if topk:
                idx = x.float().abs().topk(k, dim=1).indices
                xm = torch.zeros_like(x.float()).scatter_(1, idx, x.float().gather(1, idx))
            want = xm @ ws[0].dense().float()
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
            read = kept_bytes(x, thr, K, N, BLOCK) if not topk else int(k * N // 2 + 4 * N * ((K + BLOCK - 1) // BLOCK))
            calls = [lambda c=c: h.run(c) for c in mk] * reps
            g_us, k_us, per = time_graph(calls, args.reps)
            row = base | {"method": f"nbits_graph_{mode}", "sparsity": s, "graph_us": g_us, "kernel_us": k_us, "kernels_us": per,
                          "max_rel_err": err, "read_bytes": read, "effective_tb_s": ref_bytes / k_us / 1e6, "actual_tb_s": read / k_us / 1e6}
            rows.append(row)
            logger.info("%dx%d M=%d %s s=%.1f: graph %.2f us, kernels %.2f us (effective %.2f TB/s, actual %.2f), err %.1e; %s", K, N, M,
                        mode, s, g_us, k_us, row["effective_tb_s"], row["actual_tb_s"], err,
                        ", ".join(f"{n[:30]} {t:.2f}" for n, t in per.items()))
            for label, hb in (others or {}).items():  # the same calls through other builds of the harness (--base-harness)
                bwork = hb.workspace(mk[0])
                for c in mk:
                    c.workspace = bwork.data_ptr()
                hb.run(mk[0])
                berr = float((y.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
                calls = [lambda c=c: hb.run(c) for c in mk] * reps
                bg, bk, bper = time_graph(calls, args.reps)
                rows.append(base | {"method": f"nbits_graph_{mode}_{label}", "sparsity": s, "graph_us": bg, "kernel_us": bk, "kernels_us": bper,
                                    "max_rel_err": berr})
                logger.info("   harness %s: graph %.2f us, kernels %.2f us, err %.1e; %s", label, bg, bk, berr,
                            ", ".join(f"{n[:30]} {t:.2f}" for n, t in bper.items()))
                for c in mk:
                    c.workspace = work.data_ptr()
                del bwork
            for kb in ([int(v) for v in args.prefill_chunks.split(",") if v] if M > 8 and s in (0.0, 0.5) else []):
                variant = (0, 0, 1, -1, -1, -1, -1, 0, kb, 0)  # cuBLAS prefill, W in chunks of kb KiB (-2: all of W at once)
                vwork = h.workspace(mk[0], variant)
                for c in mk:
                    c.workspace = vwork.data_ptr()
                h.run(mk[0], variant)
                verr = float((y.float() - want).abs().max() / want.abs().max().clamp_min(1e-6))
                calls = [lambda c=c: h.run(c, variant) for c in mk] * reps
                vg, vk, vper = time_graph(calls, args.reps)
                rows.append(base | {"method": f"nbits_graph_{mode}_chunk", "chunk_kb": kb, "sparsity": s, "graph_us": vg, "kernel_us": vk,
                                    "kernels_us": vper, "max_rel_err": verr})
                logger.info("   chunks of %s: graph %.2f us, kernels %.2f us, err %.1e", "all of W" if kb == -2 else f"{kb} KiB", vg, vk,
                            verr)
                for c in mk:
                    c.workspace = work.data_ptr()
                del vwork
            if args.floor and h.floor is not None and M == 1 and mode == "threshold":
                sink = torch.zeros(64, device="cuda", dtype=torch.int32)
                buf = torch.empty(max(read, 16) * copies, dtype=torch.uint8, device="cuda")
                sms = torch.cuda.get_device_properties(0).multi_processor_count
                best = None
                for per_sm in (1, 2, 4):
                    calls = [lambda c=c, b=buf, n=read, sk=sink, blocks=per_sm * sms: h.read_floor(b[c * n:], n, sk, blocks)
                             for c in range(copies)] * reps
                    fg, fk, _ = time_graph(calls, args.reps)
                    if best is None or fk < best[1]:
                        best = (fg, fk)
                rows.append(base | {"method": "read_floor", "sparsity": s, "graph_us": best[0], "kernel_us": best[1], "read_bytes": read,
                                    "actual_tb_s": read / best[1] / 1e6})
                logger.info("   read floor %.1f MB: kernel %.2f us (%.2f TB/s)", read / 1e6, best[1], rows[-1]["actual_tb_s"])
            if library is not None and mode == "threshold" and s in [float(v) for v in args.ort_sparsities.split(",") if v]:
                sess = ort_session("nbits", ws, M, library, thresholds=[thr] * copies)
                wall, ko, pero, outs = ort_time(sess, x, copies, N, args.runs)
                rows.append(base | {"method": "nbits_ort_threshold", "sparsity": s, "wall_us": wall, "kernel_us": ko, "kernels_us": pero,
                                    "max_rel_err": float((outs[0].float() - want).abs().max() / want.abs().max().clamp_min(1e-6))})
                logger.info("   through ORT: kernels %.2f us, wall %.1f us/node", ko, wall)
                del sess
    del ws
    torch.cuda.empty_cache()
    return rows


# (columns per lane, blocks per SM, L2 prefetch, staged rows, kernel, splits). Stream-K (kernel 0): 32 columns per lane
# needs ~210 registers, one block per SM; stage = 1: rows staged in shared memory (cp.async). Cluster (kernel 1, one row,
# sm_90+): 4 / 8 / 16 columns per lane; splits 0 = blocks per tile from blocks per SM, else forced.
_STREAM_K = [(16, 3, 0, 0, 0, 0), (32, 1, 0, 0, 0, 0), (16, 1, 0, 1, 0, 0), (16, 2, 0, 1, 0, 0), (16, 3, 0, 1, 0, 0), (32, 1, 0, 1, 0, 0)]
_CLUSTER = [(c, b, 0, 0, 1, 0) for c, b in ((4, 2), (8, 2), (8, 3), (16, 1), (16, 2))] + [(8, 1, 0, 0, 1, 16), (4, 1, 0, 0, 1, 16)]
_MMA = [(16, b, 0, 0, 2, 0) for b in (2, 3)]  # stream-K with the tensor-core row loop (kernel 2, float16, sm_80+)
_ONE = [(16, 2, 0, 0, 3, 0), (16, 3, 0, 0, 3, 0), (32, 1, 0, 0, 3, 0)]  # stream-K with the one-row loop (kernel 3)
_PIPE = [(16, 2, 0, 0, 4, 0), (16, 3, 0, 0, 4, 0), (32, 1, 0, 0, 4, 0)]  # the one-row loop software-pipelined (kernel 4)
# early prefetch before the wait on the previous kernel (prefetch 2: scales, 3: scales and rows), shipped loops
_EARLY = [(16, 3, p, 0, k, 0) for k in (0, 4) for p in (0, 2, 3)]
SWEEP_VARIANTS = {"early": _EARLY, "stream-k": _STREAM_K, "cluster": [(16, 3, 0, 0, 0, 0)] + _CLUSTER, "mma": [(16, 3, 0, 0, 0, 0)] + _MMA,
                  "one": [(16, 3, 0, 0, 0, 0)] + _ONE, "pipe": [(16, 3, 0, 0, 0, 0), (16, 3, 0, 0, 3, 0)] + _PIPE,
                  "all": _STREAM_K + _CLUSTER + _MMA + _ONE + _PIPE}


def sweep(h: Harness, args) -> list[dict]:
    """Decode (M = 1) timings of every (columns per lane, blocks per SM) on the shapes, at 0 / 50 / 90 % (--sweep-sparsities)."""
    import torch

    rng = np.random.default_rng(1)
    rows = []
    pdl_before = os.environ.get("ACTTAIL_PDL")
    for K, N in SHAPES:
        ref_bytes = K * N // 2 + 4 * N * ((K + BLOCK - 1) // BLOCK)
        copies = max(3, math.ceil(3 * L2_BYTES / ref_bytes))
        ws = [Weights(rng, K, N) for _ in range(copies)]
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        y = torch.empty(1, N, device="cuda", dtype=torch.float16)
        for s in [float(v) for v in args.sweep_sparsities.split(",")]:
            thr = torch.tensor([float(torch.quantile(x.float().abs(), s)) if s else 0.0], device="cuda")
            mk = [Harness.call(x, w.dev["q_packed"], w.dev["scales"], w.dev["offsets"], y, thresholds=thr, topk=False) for w in ws]
            work = h.workspace(mk[0])
            for c in mk:
                c.workspace = work.data_ptr()
            for variant, pdl in itertools.product(SWEEP_VARIANTS[args.sweep_kernels], args.sweep_pdl.split(",")):
                cpl, bps, pre, stage, kernel, splits = variant
                v = (cpl, bps, -1, -1, pre, stage, kernel, splits)
                calls = [lambda c=c, v=v: h.run(c, v) for c in mk] * max(1, 48 // copies)
                os.environ["ACTTAIL_PDL"] = pdl  # read when the calls are captured
                g_us, k_us, _ = time_graph(calls, args.reps)
                name = {1: "cluster", 2: "mma", 3: "one", 4: "pipe"}.get(kernel, "stream-k")
                rows.append({"K": K, "N": N, "M": 1, "sparsity": s, "kernel": name, "cols_per_lane": cpl,
                             "blocks_per_sm": bps, "splits": splits, "prefetch": pre, "stage": stage, "pdl": int(pdl), "graph_us": g_us,
                             "kernel_us": k_us, "effective_tb_s": ref_bytes / k_us / 1e6})
                logger.info("sweep %dx%d s=%.1f %s cpl=%d bps=%d splits=%d prefetch=%d stage=%d pdl=%s: kernels %.2f us, graph %.2f us (%.2f TB/s)",
                            K, N, s, rows[-1]["kernel"], cpl, bps, splits, pre, stage, pdl, k_us, g_us, rows[-1]["effective_tb_s"])
        del ws
        torch.cuda.empty_cache()
    if pdl_before is None:
        os.environ.pop("ACTTAIL_PDL", None)
    else:
        os.environ["ACTTAIL_PDL"] = pdl_before
    return rows


def markdown_tables(result: dict) -> str:
    """Markdown tables of a kernel_bench_nbits.json: per shape and row count, each method's kernel time."""
    rows, env = result["rows"], result["env"]
    out = [(f"GPU {env['gpu']}, driver {env.get('driver', '?')}, torch {env['torch']}, onnxruntime {env.get('onnxruntime', '-')}, "
            f"device copy {env['copy_tb_s']:.2f} TB/s (read + write)"), ""]
    if rows and "cols_per_lane" in rows[0]:
        # PDL (--sweep-pdl): a dependent launch starts before the previous kernel ends, so its CUPTI kernel time includes
        # the wait; the graph time per call is what compares
        pdl = any("pdl" in r for r in rows)
        metric = "graph_us" if pdl else "kernel_us"
        out += ["| K→N | sparsity | kernel | cols/lane | blocks/SM | splits | L2 prefetch | staged | PDL | kernel µs | graph µs | effective TB/s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['K']}→{r['N']} | {r['sparsity']:.1f} | {r.get('kernel', 'stream-k')} | {r['cols_per_lane']} | {r['blocks_per_sm']} | "
                       f"{r.get('splits', 0)} | {r.get('prefetch', 0)} | {r.get('stage', 0)} | {r.get('pdl', '-')} | "
                       f"{r['kernel_us']:.2f} | {r['graph_us']:.2f} | {r['effective_tb_s']:.2f} |")
        best: dict = {}
        for r in rows:
            key = (r["K"], r["N"])
            variant = (r.get("kernel", "stream-k"), r["cols_per_lane"], r["blocks_per_sm"], r.get("splits", 0), r.get("prefetch", 0),
                       r.get("stage", 0)) + ((r.get("pdl", "-"),) if pdl else ())
            best.setdefault(key, {}).setdefault(variant, []).append(r[metric])
        names = "kernel, cols/lane, blocks/SM, splits, prefetch, staged" + (", PDL" if pdl else "")
        levels = " / ".join(f"{int(round(s * 100))}" for s in dict.fromkeys(r["sparsity"] for r in rows))
        out += ["", f"| K→N | best ({names}) by the sum over the sparsities | {'graph' if pdl else 'kernel'} µs at {levels} % |",
                "|---|---|---|"]
        for key, variants in best.items():
            v, t = min(variants.items(), key=lambda kv: sum(kv[1]))
            out.append(f"| {key[0]}→{key[1]} | {v} | {' / '.join(f'{u:.2f}' for u in t)} |")
        return "\n".join(out)
    for M in sorted({r["M"] for r in rows}):
        sp = [s for s in SPARSITIES if any(r["sparsity"] == s and r["M"] == M and r["method"].startswith("nbits_graph") for r in rows)]
        head = " | ".join(f"{int(s * 100)} %" for s in sp)
        out += [f"M = {M} rows, kernel µs (CUPTI) and speedup over MatMulNBits; effective TB/s = op bytes / time", "",
                f"| K→N | cuBLAS fp16 | MatMulNBits (TB/s) | mode | {head} |", "|---|---|---|---|" + "---|" * len(sp)]
        for K, N in dict.fromkeys((r["K"], r["N"]) for r in rows if r["M"] == M):
            sel = [r for r in rows if r["M"] == M and r["K"] == K and r["N"] == N]
            cub = next((r for r in sel if r["method"] == "cublas_fp16"), None)
            mnb = next((r for r in sel if r["method"] == "matmulnbits_ort"), None)
            for mode in dict.fromkeys(r["method"][len("nbits_graph_"):] for r in sel
                                      if r["method"].startswith("nbits_graph_") and not r["method"].endswith("_chunk")):
                cells = []
                for s in sp:
                    r = next((r for r in sel if r["method"] == f"nbits_graph_{mode}" and r["sparsity"] == s), None)
                    if r is None:
                        cells.append("–")
                        continue
                    vs = f", {mnb['kernel_us'] / r['kernel_us']:.2f}×" if mnb else ""
                    cells.append(f"{r['kernel_us']:.2f}{vs}" + (f" ({r['effective_tb_s']:.2f})" if "effective_tb_s" in r else ""))
                out.append(f"| {K}→{N} | {cub['kernel_us']:.2f} | " + (f"{mnb['kernel_us']:.2f} ({mnb['tb_s']:.2f})" if mnb else "–") +
                           f" | {mode} | " + " | ".join(cells) + " |")
        chunks = [r for r in rows if r["M"] == M and r["method"].endswith("_chunk")]
        if chunks:
            out += ["", "| K→N | mode | sparsity | op's plan, kernel µs | chunk KiB (-2: all of W at once) | kernel µs |",
                    "|---|---|---|---|---|---|"]
            for c in chunks:
                mode = c["method"][len("nbits_graph_"):-len("_chunk")]
                r = next(r for r in rows if r["M"] == M and r["K"] == c["K"] and r["N"] == c["N"] and r["sparsity"] == c["sparsity"]
                         and r["method"] == f"nbits_graph_{mode}")
                out.append(f"| {c['K']}→{c['N']} | {mode} | {c['sparsity']:.1f} | {r['kernel_us']:.2f} | {c['chunk_kb']} | {c['kernel_us']:.2f} |")
        floor = [r for r in rows if r["M"] == M and r["method"] == "read_floor"]
        if floor:
            out += ["", "| K→N | sparsity | op kernel µs | read floor of the same bytes, µs | op actual TB/s | floor TB/s |",
                    "|---|---|---|---|---|---|"]
            for f in floor:
                r = next(r for r in rows if r["M"] == M and r["K"] == f["K"] and r["N"] == f["N"] and r["sparsity"] == f["sparsity"]
                         and r["method"] == "nbits_graph_threshold")
                out.append(f"| {f['K']}→{f['N']} | {f['sparsity']:.1f} | {r['kernel_us']:.2f} | {f['kernel_us']:.2f} | {r['actual_tb_s']:.2f} | "
                           f"{f['actual_tb_s']:.2f} |")
        ort_rows = [r for r in rows if r["M"] == M and r["method"] == "nbits_ort_threshold"]
        if ort_rows:
            out += ["", "| K→N | sparsity | through ORT, kernel µs | harness kernel µs | wall µs per node |", "|---|---|---|---|---|"]
            for o in ort_rows:
                r = next(r for r in rows if r["M"] == M and r["K"] == o["K"] and r["N"] == o["N"] and r["sparsity"] == o["sparsity"]
                         and r["method"] == "nbits_graph_threshold")
                out.append(f"| {o['K']}→{o['N']} | {o['sparsity']:.1f} | {o['kernel_us']:.2f} | {r['kernel_us']:.2f} | {o['wall_us']:.1f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness", help="libacttail_bench.so (ACTTAIL_BENCH=1 bash scripts/build_ops.sh); required to measure")
    ap.add_argument("--table", metavar="JSON", help="print the markdown tables of a kernel_bench_nbits.json / nbits_sweep.json and exit")
    ap.add_argument("--library", default=None, help="libacttail_ops.so for the ORT rows (default: acttail_export.ops)")
    ap.add_argument("--out", default="docs/results/nbits", help="output folder")
    ap.add_argument("--rows", default="1,512", help="comma-separated row counts M (1 = decode, 512 = prefill)")
    ap.add_argument("--shapes", default=None, help="comma-separated KxN (default: the five listed shapes)")
    ap.add_argument("--modes", default="threshold", help="comma-separated: threshold, topk")
    ap.add_argument("--reps", type=int, default=20, help="graph replays per timing trial")
    ap.add_argument("--runs", type=int, default=20, help="session runs per ORT timing")
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows (MatMulNBits, the op through ORT)")
    ap.add_argument("--ort-sparsities", default="0,0.5,0.9", help="sparsities at which the op is also timed through ORT")
    ap.add_argument("--prefill-chunks", default="", help="prefill rows (M > 8) at 0 / 50 %%: also time the cuBLAS path with W "
                    "dequantized in chunks of these KiB (comma-separated; -2 = all of W at once, the op's choice otherwise)")
    ap.add_argument("--sparsities", default="", help="comma-separated sparsities to time (default: 0,0.5,0.7,0.8,0.9)")
    ap.add_argument("--base-harness", default=None, help="other builds of libacttail_bench.so (e.g. of an earlier commit), "
                    "comma-separated LABEL=PATH: their rows (nbits_graph_<mode>_<LABEL>) are timed on the same weights in the same process")
    ap.add_argument("--floor", action="store_true", help="also time a plain streaming read of the op's bytes (decode)")
    ap.add_argument("--sweep", action="store_true", help="decode parameter sweep instead (writes nbits_sweep.json)")
    ap.add_argument("--sweep-sparsities", default="0,0.5,0.9", help="sparsities the sweep times (comma-separated)")
    ap.add_argument("--sweep-kernels", choices=sorted(SWEEP_VARIANTS), default="all", help="which decode kernels the sweep times")
    ap.add_argument("--sweep-pdl", default="1", help="ACTTAIL_PDL values the sweep times each variant with (comma-separated: 1, 0 or both)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.table:
        print(markdown_tables(json.loads(Path(args.table).read_text())))
        return 0
    if not args.harness:
        ap.error("--harness is required to measure (or use --table)")
    import torch

    if not torch.cuda.is_available():
        print("kernel_bench_nbits: needs a CUDA device", file=sys.stderr)
        return 2
    h = Harness(args.harness)
    others = {lp.split("=", 1)[0]: Harness(lp.split("=", 1)[1]) for lp in args.base_harness.split(",")} if args.base_harness else {}
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(), "block": BLOCK,
           "l2_bytes_assumed": L2_BYTES, "copy_tb_s": round(copy_bandwidth(), 3)}
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                   text=True, check=False).stdout.strip()
    library = args.library
    if not args.no_ort:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        if library is None:
            from acttail_export.ops import get_library_path

            library = get_library_path()
    logger.info("env %s", env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        result = {"env": env, "rows": sweep(h, args)}
        (out / "nbits_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
        print(markdown_tables(result))
        return 0
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rng = np.random.default_rng(0)
    rows = []
    for M in (int(m) for m in args.rows.split(",")):
        for K, N in shapes:
            rows += bench_shape(h, K, N, M, args, library if not args.no_ort else None, rng, others)
            (out / "kernel_bench_nbits.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")  # partial results survive
    result = {"env": env, "rows": rows}
    (out / "kernel_bench_nbits.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_tables(result))
    print(f"wrote {out / 'kernel_bench_nbits.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
