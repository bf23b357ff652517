"""SparseMatMulNBits' CUDA kernels through the benchmark harness (libacttail_bench.so), outside ONNX Runtime.

Every forced decode variant the per-shape table may pick, and every CUDA path (decode, prefill with and without cuBLAS,
members, Inf scales) against the reference of ``test_ops_nbits.py``. Skipped unless ``ACTTAIL_BENCH_LIB`` points at
the harness (``ACTTAIL_BENCH=1 bash scripts/build_ops.sh``) and torch has CUDA; needs no onnxruntime-gpu, so it also
runs under compute-sanitizer on a machine with only the CPU build of ONNX Runtime.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
from test_ops_nbits import EXACT_TOL, ROUNDING, Case, assert_matches, expected, llm_case, random_weights


def test_call_keeps_its_tensors_alive():
    """The struct holds raw pointers: tensors passed as temporaries must live as long as the call. They did not, so
    torch gave a freed Q / scales block to the workspace, which the per-call scratch zeroes: forced variants failed
    depending on the allocation order (10 failures in the H200 run). Runs on CPU tensors, no GPU needed."""
    torch = pytest.importorskip("torch")
    from acttail_export.nbits_harness import Harness

    x, y = torch.zeros((1, 64), dtype=torch.float16), torch.zeros((1, 32), dtype=torch.float16)
    refs = []

    def temp(shape, dtype):
        t = torch.ones(shape, dtype=dtype)
        refs.append(weakref.ref(t))
        return t

    call = Harness.call(x, temp((64, 16), torch.uint8), temp((2, 32), torch.float16), temp((2, 32), torch.float16), y,
                        thresholds=temp((1,), torch.float32), topk=False)
    gc.collect()
    assert all(r() is not None for r in refs)
    assert call.q == refs[0]().data_ptr() and call.M == 1 and call.K == 64 and call.N == 32 and call.ends[0] == 32
    del call
    gc.collect()
    assert all(r() is None for r in refs)


def _harness():
    lib = os.environ.get("ACTTAIL_BENCH_LIB")
    if not lib or not Path(lib).is_file():
        pytest.skip("set ACTTAIL_BENCH_LIB to libacttail_bench.so (ACTTAIL_BENCH=1 bash scripts/build_ops.sh)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from acttail_export.nbits_harness import Harness

    return Harness(lib)


# (cols_per_lane, blocks_per_sm, stream_scratch, prefetch, stage): register loads (stage 0) and rows staged in shared
# memory (stage 1), per-call and per-stream scratch, every grid the table may pick
VARIANTS = [(16, 1, 1, 0, 0), (16, 2, 0, 1, 0), (16, 4, 1, 1, 0), (32, 1, 1, 1, 0), (32, 2, 0, 0, 0), (16, 1, 1, 0, 1), (16, 3, 0, 0, 1),
            (32, 1, 1, 0, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (4160, 1056)])
def test_decode_variants_match(variant, K, N):
    """Every decode configuration the per-shape table may pick. 4096->14336 with one block per SM and 16 columns per
    lane has 28 tiles on a 132-block grid: no multiple of the tile count is near it, so ranges span two tiles."""
    harness = _harness()
    cpl, bps, scratch, prefetch, stage = variant
    for mode, keep in (("threshold", 1.0), ("topk", 0.4)):  # all rows but one kept: the longest row slices per warp
        case = llm_case(np.random.default_rng(K + N), 1, K, N, 32, np.float16, mode, keep=keep)
        y = harness.run_case(case, variant=(cpl, bps, -1, scratch, prefetch, stage))
        assert_matches(y, case)


# The cluster GEMV (one row of X, sm_90+; kernels/gemv_cluster.cuh): (cols_per_lane, blocks_per_sm, splits). Splits 1
# (no split), 5 (ranges of unequal group counts), 16 (the non-portable cluster size) and the op's choice (0).
CLUSTER_VARIANTS = [(8, 3, 0), (16, 1, 5), (8, 1, 1), (4, 1, 16)]


def _cluster(variant) -> tuple[int, ...]:
    cpl, bps, splits = variant
    return (cpl, bps, -1, -1, -1, -1, 1, splits)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", CLUSTER_VARIANTS)
@pytest.mark.parametrize("K,N,B", [(4096, 11008, 32), (11008, 4096, 64), (4100, 1056, 128), (576, 1536, 32), (40, 64, 32)])
def test_cluster_decode_matches(variant, K, N, B):
    """The cluster GEMV on LLM shapes and small / partial ones (K = 4100: a last group of 4 rows; K = 40 < 2 groups, so
    most warps and splits get no group), all rows but one kept (the longest groups) and the usual 40 %."""
    harness = _harness()
    for dtype in (np.float16, np.float32):
        for mode, keep in (("threshold", 1.0), ("topk", 0.4), ("threshold", 0.1)):
            case = llm_case(np.random.default_rng(K + N + B), 1, K, N, B, dtype, mode, keep=keep)
            assert_matches(harness.run_case(case, variant=_cluster(variant)), case)


def _check_members_scales_ramp_inf(harness, variant: tuple[int, ...], seed: int) -> None:
    """Members (boundaries inside a lane's columns: 100, 170), per-member thresholds / k, score scales, the ramp, and
    Inf / NaN scales in a quant block that no row keeps (never reaching Y), through one forced decode variant."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 512)).astype(np.float16)
    q, scales, offsets = random_weights(rng, 512, 320, 32, np.float16)
    scale = rng.uniform(0.5, 2.0, (3, 512)).astype(np.float32)
    cases = [Case(x, q, scales, offsets, 32, "threshold", [100, 170, 320], None, np.array([0.2, 0.5, 0.9], np.float32)),
             Case(x, q, scales, offsets, 32, "topk", [100, 170, 320], [10, 50, 200], ramp=0.5),
             Case(x, q, scales, offsets, 32, "threshold", [100, 170, 320], None, np.array([0.3, 0.3, 1.2], np.float32), scale=scale,
                  ramp=0.25)]
    for case in cases:
        assert_matches(harness.run_case(case, variant=variant), case)
    x2 = x.copy()
    x2[0, 64:96] = 0  # quant block 2 keeps no row in threshold mode
    s2 = scales.copy()
    s2[2] = np.inf
    o2 = offsets.copy()
    o2[2] = np.nan
    case = Case(x2, q, s2, o2, 32, "threshold", thresholds=np.array(0.1, np.float32))
    y = harness.run_case(case, variant=variant)
    assert np.isfinite(y).all()
    assert_matches(y, case)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [(8, 3, 0), (4, 1, 16), (16, 1, 3)])
def test_cluster_decode_members_scales_ramp_inf(variant):
    """The cluster GEMV: members, scales, ramp, Inf scales in an unkept block (_check_members_scales_ramp_inf)."""
    _check_members_scales_ramp_inf(_harness(), _cluster(variant), 11)


# The tensor-core row loop (kernel 2: one float16 row, sm_80+; kernels/gemv.cuh StreamRowsMma): (blocks_per_sm,
# stream_scratch). float32 and shapes without the vector layout (N % 32 != 0) take the stream-K row loop instead.
MMA_VARIANTS = [(0, -1), (1, 0), (2, 1), (3, 1)]


def _mma(variant) -> tuple[int, ...]:
    bps, scratch = variant
    return (0, bps, -1, scratch, -1, -1, 2, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", MMA_VARIANTS)
@pytest.mark.parametrize("K,N,B", [(4096, 11008, 32), (11008, 4096, 64), (4096, 14336, 32), (4100, 1056, 128), (576, 1536, 16),
                                   (40, 64, 32), (1000, 257, 16)])
def test_mma_decode_matches(variant, K, N, B):
    """The tensor-core row loop on LLM shapes and small / partial ones (K = 4100: a last quant block of 4 rows; K = 40: most
    warps get no group; N = 257: the stream-K fallback), all rows but one kept (full groups), 40 % and 10 % (groups of a
    few rows, padded), both modes."""
    harness = _harness()
    for dtype in (np.float16, np.float32):
        for mode, keep in (("threshold", 1.0), ("topk", 0.4), ("threshold", 0.1)):
            case = llm_case(np.random.default_rng(K + N + B), 1, K, N, B, dtype, mode, keep=keep)
            assert_matches(harness.run_case(case, variant=_mma(variant)), case)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", MMA_VARIANTS[:2])
def test_mma_decode_members_scales_ramp_inf(variant):
    """The tensor-core row loop: members (boundaries inside a virtual lane's 16 columns), scales, ramp, Inf scales."""
    _check_members_scales_ramp_inf(_harness(), _mma(variant), 12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_harness_paths(dtype, mode):
    """Every CUDA path through the harness (run under compute-sanitizer on the CUDA machine): decode with 1-8 rows,
    both column widths, staged and register rows, per-call scratch, prefill with and without cuBLAS."""
    harness = _harness()
    rng = np.random.default_rng(0)
    for m, K, N, B in ((1, 1024, 512, 32), (1, 1000, 257, 16), (1, 2080, 1024, 64), (3, 512, 1024, 64), (8, 300, 100, 128),
                       (12, 256, 96, 32)):
        for variant in ((0, 0, -1, -1, -1, -1), (32, 1, -1, 0, 1, 1), (16, 4, 0, -1, 0, 0), (16, 2, 1, 1, 1, 1)):
            case = llm_case(rng, m, K, N, B, dtype, mode)
            assert_matches(harness.run_case(case, variant), case)


@pytest.mark.cuda
def test_harness_members_and_inf_scales():
    """Members through the harness, and Inf scales that arm the prefill's exact kernel (which resets its flag)."""
    harness = _harness()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 256)).astype(np.float16)
    q, scales, offsets = random_weights(rng, 256, 300, 32, np.float16)
    for case in (Case(x, q, scales, offsets, 32, "threshold", [100, 170, 300], None, np.array([0.2, 0.5, 0.9], np.float32)),
                 Case(x[:1], q, scales, offsets, 32, "topk", [100, 170, 300], [10, 50, 200], ramp=0.5),
                 Case(x[:2], q, scales, offsets, 32, "topk", [100, 170, 300], [10, 50, 200], ramp=0.5)):
        assert_matches(harness.run_case(case), case)
    scales[1] = np.inf
    case = Case(x, q, scales, offsets, 32, "threshold", thresholds=np.array(0.3, np.float32))
    for _ in range(2):
        assert_matches(harness.run_case(case), case)


# The one-row loop (kernel 3: one row of X, the vector layout; kernels/gemv.cuh StreamRowsOne, sums in the reduction
# buffer) and its software-pipelined form (kernel 4, StreamRowsPipe): (cols_per_lane, blocks_per_sm, stream_scratch,
# kernel). Other shapes (N % 32 != 0) take the stream-K row loop.
ONE_VARIANTS = [(16, 0, -1, 3), (16, 3, 0, 3), (32, 1, 1, 3), (16, 1, 1, 3), (16, 0, -1, 4), (16, 2, 0, 4), (32, 1, 1, 4)]


def _one(variant) -> tuple[int, ...]:
    cpl, bps, scratch, kernel = variant
    return (cpl, bps, -1, scratch, -1, -1, kernel, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ONE_VARIANTS)
@pytest.mark.parametrize("K,N,B", [(4096, 11008, 32), (11008, 4096, 64), (4096, 14336, 32), (4100, 1056, 128), (576, 1536, 16),
                                   (40, 64, 32), (1000, 257, 16)])
def test_one_decode_matches(variant, K, N, B):
    """The one-row loops (plain and pipelined) on LLM shapes and small / partial ones (K = 4100: a last quant block of 4 rows; K = 40: most
    warps get no row; N = 257: the stream-K fallback), all rows but one kept, 40 % and 10 % (blocks of one or two kept
    rows, batches mostly predicated off), both modes, both float types."""
    harness = _harness()
    for dtype in (np.float16, np.float32):
        for mode, keep in (("threshold", 1.0), ("topk", 0.4), ("threshold", 0.1)):
            case = llm_case(np.random.default_rng(K + N + B), 1, K, N, B, dtype, mode, keep=keep)
            assert_matches(harness.run_case(case, variant=_one(variant)), case)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ONE_VARIANTS[1:3] + ONE_VARIANTS[5:7])
def test_one_decode_members_scales_ramp_inf(variant):
    """The one-row loop: members (inactive lanes past a member's end), scales, ramp, Inf / NaN scales in an unkept block."""
    _check_members_scales_ramp_inf(_harness(), _one(variant), 13)


# Prefill in chunks of W (cuda.cu ChoosePrefillChunks): (chunk KiB, columns per chunk); -2 = all of W at once.
# 1 KiB of 16 columns = 32 rows (float16) / 16 -> 32 rows (float32): many row chunks summed in float32; 1000 columns
# round up to 1008 (a last chunk of 16 columns at N = 1024); 64 KiB x 256 columns: row and column chunks.
CHUNK_VARIANTS = [(-2, 0), (1, 16), (64, 256), (16, 1000), (4096, 0)]


def _chunked(variant) -> tuple[int, ...]:
    kb, cols = variant
    return (0, 0, 1, -1, -1, -1, -1, 0, kb, cols)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", CHUNK_VARIANTS)
@pytest.mark.parametrize("M,K,N,B", [(12, 1024, 512, 32), (64, 1000, 257, 16), (9, 2080, 1024, 64), (33, 576, 1536, 128),
                                     (16, 4100, 96, 32)])
def test_prefill_chunks_match(variant, M, K, N, B):
    """Prefill with W dequantized chunk by chunk (rows and columns; partial last chunks, N % 16 != 0, a last quant block
    of 4 rows at K = 4100) against the reference, both modes and float types."""
    harness = _harness()
    for dtype in (np.float16, np.float32):
        for mode, keep in (("threshold", 0.5), ("topk", 0.3)):
            case = llm_case(np.random.default_rng(M + K + N + B), M, K, N, B, dtype, mode, keep=keep)
            assert_matches(harness.run_case(case, variant=_chunked(variant)), case)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", CHUNK_VARIANTS[1:4])
def test_prefill_chunks_members_and_inf_scales(variant):
    """Chunked prefill: members with their own rules whose column ranges cross chunk boundaries, and Inf scales in a
    later chunk, which arm the exact kernel after the GEMMs."""
    harness = _harness()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 256)).astype(np.float16)
    q, scales, offsets = random_weights(rng, 256, 300, 32, np.float16)
    for case in (Case(x, q, scales, offsets, 32, "threshold", [100, 170, 300], None, np.array([0.2, 0.5, 0.9], np.float32)),
                 Case(x, q, scales, offsets, 32, "topk", [100, 170, 300], [10, 50, 200], ramp=0.5)):
        assert_matches(harness.run_case(case, variant=_chunked(variant)), case)
    scales[6, 250:] = np.inf
    case = Case(x, q, scales, offsets, 32, "threshold", thresholds=np.array(0.3, np.float32))
    for _ in range(2):
        assert_matches(harness.run_case(case, variant=_chunked(variant)), case)


@pytest.mark.cuda
@pytest.mark.parametrize("mode,keep,density,one", [("threshold", 0.6, 0.6, True), ("threshold", 0.6, 0.3, False), ("threshold", 0.6, -1.0, False),
                                                   ("topk", 0.6, -1.0, True), ("topk", 0.3, -1.0, False)])
def test_decode_density_dispatch(mode, keep, density, one):
    """The op's plan for one row: the one-row loop, software-pipelined for float16 (the kernel instance with ONE = true
    and PIPE = true) when the expected kept fraction (top-k's k, or the density attribute in threshold mode) is at least
    0.35 (kOneRowMinDensity), else the stream-K loop; the result matches the reference either way."""
    import re

    import torch
    from torch.profiler import ProfilerActivity, profile

    harness = _harness()
    case = llm_case(np.random.default_rng(21), 1, 4096, 1024, 32, np.float16, mode, keep=keep)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        y = harness.run_case(case, density=density)
        torch.cuda.synchronize()
    assert_matches(y, case)
    names = [ev.name for ev in prof.events() if "NBitsGemvKernel" in ev.name]
    assert names, "no decode kernel ran"
    # the last three template flags: ONE, PIPE, SELF (the selection inside the GEMV blocks: off unless ACTTAIL_FUSED_SELECT=1)
    flags = {tuple(f.strip() for f in re.search(r"NBitsGemvKernel<(.*?)>\(", n).group(1).split(",")[-3:]) for n in names}
    assert flags == {("true", "true", "false") if one else ("false", "false", "false")}, names


@pytest.mark.cuda
@pytest.mark.parametrize("mode,density", [("threshold", 0.5), ("threshold", -1.0), ("topk", -1.0)])
@pytest.mark.parametrize("prefetch,pdl", [(0, "1"), (3, "1"), (2, "1"), (0, "0")])
def test_dependent_launch_chain(mode, density, prefetch, pdl, monkeypatch):
    """The decode GEMV launched as a programmatic dependent (sm_90+; ACTTAIL_PDL, on by default) with its early L2
    prefetch (variant prefetch 2: scales, 3: scales and rows; 0: neither, the default), and plainly (ACTTAIL_PDL=0): a
    copy kernel writes X, call A reads it (K -> N), call B reads A's Y (N -> K), all captured in one CUDA graph and
    replayed with new data in X. A kernel that read its X (or the shared per-stream scratch) before the previous kernel
    had finished would read the last replay's values: each link must match the reference of this replay's inputs (a
    race shows only when it happens; the inputs change by a factor per replay so that it would be far off). Density 0.5
    (and top-k at half of K) takes the pipelined one-row loop, threshold mode without density the stream-K loop."""
    import torch

    harness = _harness()
    monkeypatch.setenv("ACTTAIL_PDL", pdl)  # read when the calls are captured
    rng = np.random.default_rng(5)
    K, N = 4096, 11008
    qa, sa, oa = random_weights(rng, K, N, 32, np.float16)
    qb, sb, ob = random_weights(rng, N, K, 32, np.float16)

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).cuda()

    src = dev(rng.standard_normal((1, K)).astype(np.float16))
    x, y1, y2 = torch.empty_like(src), torch.empty((1, N), dtype=torch.float16, device="cuda"), torch.empty_like(src)
    # thresholds at about half of |x| and |y1| at the first replay (y1 ~ 16 for these weights); top-k keeps half of each input
    ta, tb = dev(np.array([0.67], np.float32)), dev(np.array([11.0], np.float32))
    kw = {"topk": mode == "topk", "density": density}
    ca = harness.call(x, dev(ref_pack(qa)), dev(sa), dev(oa), y1, thresholds=None if kw["topk"] else ta, ks=(K // 2,), **kw)
    cb = harness.call(y1, dev(ref_pack(qb)), dev(sb), dev(ob), y2, thresholds=None if kw["topk"] else tb, ks=(N // 2,), **kw)
    variant = (0, 0, -1, -1, prefetch)
    for c in (ca, cb):
        ws = harness.workspace(c, variant)
        c.workspace = ws.data_ptr()
        c._keep += (ws,)

    def chain():
        x.copy_(src)
        harness.run(ca, variant)
        harness.run(cb, variant)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()  # the per-stream scratch exists before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        chain()
    for replay in range(3):
        src.copy_(dev(rng.standard_normal((1, K)).astype(np.float16) * (1 + replay)))
        graph.replay()
        torch.cuda.synchronize()
        xs, y1s, y2s = (t.cpu().numpy() for t in (src, y1, y2))
        for xin, (q, sc, of), t, y in ((xs, (qa, sa, oa), 0.67, y1s), (y1s, (qb, sb, ob), 11.0, y2s)):
            kk = q.shape[0]
            case = (Case(xin, q, sc, of, 32, "topk", ks=[kk // 2]) if kw["topk"]
                    else Case(xin, q, sc, of, 32, "threshold", thresholds=np.array(t, np.float32)))
            assert_matches(y, case)


# The top-k selection inside the GEMV blocks (plan self_select, variant field fused_select; BlockSelectHalf in
# csrc/common/cuda/topk_select.cuh): one float16 row, no score scale, the stream-K (0) and one-row (3, 4) loops.
def _fused(kernel: int, fused: int) -> tuple[int, ...]:
    return (16, 0, -1, -1, -1, -1, kernel, 0, -1, -1, fused)


def _select_input(rng, n: int, kind: str) -> np.ndarray:
    """One float16 row of n values: normal, few distinct magnitudes (long runs of the cut key), mostly zeros (fewer
    positive keys than k), a few Inf / NaN, or float16 subnormals."""
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 4) / 4
    elif kind == "zeros":
        x[rng.random(n) < 0.7] = 0.0
    elif kind == "nonfinite":
        x[rng.integers(0, n, 5)] = [np.inf, -np.inf, np.nan, np.nan, -np.inf]
    elif kind == "tiny":
        x *= 1e-6
    return x.astype(np.float16)[None, :]


SELECT_KINDS = ("normal", "ties", "zeros", "nonfinite", "tiny")


@pytest.mark.cuda
@pytest.mark.parametrize("swiglu", [False, True])
def test_block_select_matches_selection_kernel(swiglu):
    """BlockSelectHalf, the decode GEMV's in-block selection, returns the selection kernel's (cut key, last kept tie
    index) exactly, row by row: K from 1 to 14336 (its limit; thread ranges ending inside a group of 8 and past K), k
    in {0, 1, K/3, K/2, K - 1, K, random}, normal rows, long runs of one magnitude, mostly zeros, Inf / NaN, subnormals,
    rows 16-byte aligned (vector loads) and not (element loads), and the SwiGLU input ([gate | up]; the selection
    kernel then reads the activation kernel's output). 8 rows per launch."""
    import torch

    harness = _harness()
    rng = np.random.default_rng(7 + int(swiglu))
    rows = 0
    for K in (1, 7, 8, 40, 255, 256, 257, 576, 1000, 2048, 4096, 4100, 8191, 11008, 14335, 14336):
        n = 2 * K if swiglu else K
        for kind in SELECT_KINDS:
            x = torch.from_numpy(np.concatenate([_select_input(rng, n, kind) for _ in range(8)])).cuda()
            for k in sorted({0, 1, K // 3, K // 2, max(0, K - 1), K, int(rng.integers(0, K + 1))}):
                for offset in (0, 1):  # 1: the rows start 2 bytes past a 16-byte boundary
                    buf = torch.zeros(8 * n + 8, dtype=torch.float16, device="cuda")
                    xt = buf[offset:offset + 8 * n].view(8, n)
                    xt.copy_(x)
                    got = harness.select(xt, k, swiglu=swiglu, in_block=True)
                    want = harness.select(xt, k, swiglu=swiglu)
                    np.testing.assert_array_equal(got, want, err_msg=f"K={K} k={k} {kind} offset={offset}")
                    rows += 8
    assert rows > 7000  # 16 K x 5 kinds x up to 7 k x 2 alignments x 8 rows


def _run_select_case(harness, x, q, scales, offsets, ks, ends, swiglu: bool, variant, profile: bool = False):
    import torch

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).cuda()

    N = scales.shape[1]
    y = torch.empty((1, N), dtype=torch.float16, device="cuda")
    c = harness.call(dev(x), dev(ref_pack(q)), dev(scales), dev(offsets), y, topk=True, ks=ks, ends=ends, swiglu=swiglu)
    ws = harness.workspace(c, variant)
    c.workspace = ws.data_ptr()
    c._keep += (ws,)
    names = []
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            harness.run(c, variant)
            torch.cuda.synchronize()
        names = [ev.name for ev in prof.events()]
    else:
        harness.run(c, variant)
    torch.cuda.synchronize()
    return y.cpu().numpy(), names


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", [0, 3, 4])
def test_fused_selection_decode_matches(kernel):
    """The decode GEMV with its blocks' own selection (fused_select 1) and with the selection kernel first (0) both match
    the reference: 70 random cases per decode loop over K from 40 to 14336, k in {0, 1, K/3, K/2, K - 1, K, random},
    one to three members with their own k or one shared, ties, zeros, Inf / NaN and subnormals in x, and the SwiGLU
    input ([gate | up], computed inline by the fused path; its reference input is the op's activation kernel's output,
    the values both paths select on). Y is compared with the reference's tolerance, not bit for bit: the stream-K blocks
    add their float32 partial sums with atomics in an order that varies between runs. The first case checks from the
    kernel names that the fused path ran without a selection kernel and the other one with it."""
    import torch

    harness = _harness()
    rng = np.random.default_rng(100 + kernel)
    shapes = [(40, 64), (576, 1536), (1000, 257), (4096, 1024), (4100, 1056), (11008, 512), (14336, 512), (8191, 96)]
    for i in range(70):
        K, N = shapes[i % len(shapes)]
        swiglu = bool(rng.integers(2))
        kind = SELECT_KINDS[int(rng.integers(len(SELECT_KINDS)))]
        cuts = sorted({int(v) for v in rng.integers(1, N, int(rng.integers(0, 3)))})
        ends = cuts + [N] if cuts else None
        G = len(ends) if ends else 1
        ks = [int(rng.choice([0, 1, K // 3, K // 2, K - 1, K, int(rng.integers(0, K + 1))])) for _ in range(G)]
        if rng.random() < 0.3:
            ks = [ks[0]] * G  # one selection shared by the members
        x = _select_input(rng, 2 * K if swiglu else K, kind)
        q, scales, offsets = random_weights(rng, K, N, 32, np.float16)
        check = i == 0
        y_fused, names_fused = _run_select_case(harness, x, q, scales, offsets, ks, ends, swiglu, _fused(kernel, 1), check)
        y_kernel, names_kernel = _run_select_case(harness, x, q, scales, offsets, ks, ends, swiglu, _fused(kernel, 0), check)
        if check:
            gemv = [n for n in names_fused if "NBitsGemvKernel" in n]
            assert gemv and all(n.split(">(")[0].endswith("true") for n in gemv), names_fused
            assert not any("TopKSelect" in n or "SwiGluKernel" in n for n in names_fused), names_fused
            assert any("TopKSelect" in n for n in names_kernel), names_kernel
        act = harness.swiglu(torch.from_numpy(x).cuda()).cpu().numpy() if swiglu else x
        case = Case(act, q, scales, offsets, 32, "topk", ends, ks)
        assert_matches(y_fused, case)
        assert_matches(y_kernel, case)
        # path against path, tighter: the same kept channels and float32 products, summed in another order, each rounded
        # to float16 once (EXACT_TOL fails when one kept row is lost, test_ops_nbits.py)
        _, bound = expected(case)
        a, b = y_fused.astype(np.float64), y_kernel.astype(np.float64)
        assert np.array_equal(np.isfinite(a), np.isfinite(b)), f"case {i}: Inf/NaN placement differs"
        fin = np.isfinite(b)
        tol = EXACT_TOL * bound + 2 * ROUNDING[np.float16] * np.abs(b) + 1e-7
        assert (np.abs(a - b) <= tol)[fin].all(), f"case {i}: K={K} N={N} ks={ks} ends={ends} {kind} swiglu={swiglu}"


def ref_pack(q):
    from acttail_export import reference as ref

    return ref.pack_nibbles(q)


# Blocks along N (docs/quantization.md, "Scales that travel with their row"): the harness' prototype decode GEMV --------
def _nblocks_case(rng, K: int, N: int, B: int, sparsity: float):
    """x float16 [K] with a threshold at the sparsity's quantile of |x| (NaN and a zero never kept), q / scales / offsets
    with blocks along N ([K, N/B] pairs) and an Inf scale in a row that is never kept; the float64 reference and the
    kept rows."""
    from acttail_export import reference as ref

    x = rng.standard_normal(K).astype(np.float16)
    x[3], x[5] = np.nan, 0.0
    finite = np.abs(x[np.isfinite(x)].astype(np.float32))
    t = float(np.quantile(finite, sparsity)) if sparsity > 0 else 0.0
    q, s_t, o_t = random_weights(rng, N, K, B, np.float16)  # the K-blocks generator on the transposed problem
    q, scales, offsets = q.T.copy(), s_t.T.copy(), o_t.T.copy()  # [K, N], [K, N/B]
    x[7] = 0.0
    scales[7, 0] = np.inf  # row 7 is never kept (x = 0): its Inf must not reach Y
    keep = np.isfinite(x) & (np.abs(x.astype(np.float32)) > np.float32(t)) & (x != 0)
    v = x[keep].astype(np.float64)
    y = v @ ref.dequantize_blocks(q[keep], scales[keep], offsets[keep], B, axis="N")  # kept rows only: the others add 0
    bound = np.abs(v) @ ref.dequantize_blocks(q[keep], np.abs(scales[keep]), np.abs(offsets[keep]), B, axis="N")
    return x, t, ref.pack_nibbles(q), np.stack([scales, offsets], -1), y, bound, np.flatnonzero(keep)


def test_dequantize_blocks_along_n():
    """The reference's blocks along N: W[k, n] = s[k, n // B] q[k, n] + o[k, n // B] element by element (K, N not
    multiples of B), the transpose of blocks along K on the transposed problem; an unknown axis is refused."""
    from acttail_export import reference as ref

    rng = np.random.default_rng(5)
    K, N, B = 7, 40, 16
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)
    s, o = rng.standard_normal((K, 3)).astype(np.float16), rng.standard_normal((K, 3)).astype(np.float16)
    w = ref.dequantize_blocks(q, s, o, B, axis="N")
    want = np.array([[float(s[k, n // B]) * int(q[k, n]) + float(o[k, n // B]) for n in range(N)] for k in range(K)])
    np.testing.assert_array_equal(w, want)
    np.testing.assert_array_equal(w, ref.dequantize_blocks(q.T, s.T, o.T, B).T)
    with pytest.raises(ValueError, match="axis must be"):
        ref.dequantize_blocks(q, s, o, B, axis="M")


def _nblocks_tol(ref_y: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """The prototype test's tolerance (reason in test_nblocks_decode_matches)."""
    return 2.0**-11 * np.abs(ref_y) + 2e-5 * bound + 1e-7


@pytest.mark.parametrize("K,N,B", [(4096, 11008, 32), (11008, 4096, 128)])
def test_nblocks_tolerance_catches_a_lost_row(K, N, B):
    """Positive control of test_nblocks_decode_matches' tolerance, on the CPU: a float32 emulation of the prototype's
    arithmetic (a = v·s, b = v·o per kept row, float16 Y) passes it, and the same without one kept row fails it."""
    from acttail_export import reference as ref

    rng = np.random.default_rng(K + N)
    x, t, packed, pairs, ref_y, bound, kept = _nblocks_case(rng, K, N, B, 0.5)
    q = ref.unpack_nibbles(packed, N).astype(np.float32)
    cols = np.arange(N) // B
    s, o = pairs[..., 0].astype(np.float32)[:, cols], pairs[..., 1].astype(np.float32)[:, cols]
    rows = x[kept].astype(np.float32)[:, None] * s[kept] * q[kept] + x[kept].astype(np.float32)[:, None] * o[kept]
    full = rows.sum(0, dtype=np.float32).astype(np.float16).astype(np.float64)
    lost = (rows.sum(0, dtype=np.float32) - rows[len(kept) // 2]).astype(np.float16).astype(np.float64)
    tol = _nblocks_tol(ref_y, bound)
    assert (np.abs(full - ref_y) <= tol).all()
    assert (np.abs(lost - ref_y) > tol).any()


@pytest.mark.cuda
@pytest.mark.parametrize("cpl,unroll", [(16, 4), (32, 4), (16, 8), (32, 8)])
@pytest.mark.parametrize("K,N,B", [(4096, 11008, 32), (11008, 4096, 128), (4096, 4096, 64), (576, 1536, 32), (100, 64, 32)])
def test_nblocks_decode_matches(cpl, unroll, K, N, B):
    """The prototype GEMV for blocks along N against the float64 reference at 0-95 % sparsity, with a forced grid
    (splits 1 and 7) besides its own, NaN / zero in x, an Inf scale in a row never kept; each call leaves the scratch and
    counters zero (the next call, a new x, still matches). Tolerance: Y's float16 rounding (2^-11 of |y|) plus 2e-5 of
    Σ|v|(|s|q + |o|) for the float32 sums in the kernel's order (~sqrt(n) 2^-24 typically, 6e-6 at n = 11008; a numpy
    emulation of its float32 products, summed row by row, stays within 2e-8). Unlike test_ops_nbits' TOL (2e-3 of that
    sum, for the prefill's float16 W), it fails when a kept row of typical |v| is lost (on average 1/n of the sum, n <=
    11008 kept rows here: >= 9e-5; test_nblocks_tolerance_catches_a_lost_row checks it on the CPU)."""
    import torch

    harness = _harness()
    rng = np.random.default_rng(K + N + B + cpl + unroll)
    scratch = torch.zeros(N, dtype=torch.float32, device="cuda")
    counters = torch.zeros((N + 511) // 512, dtype=torch.int32, device="cuda")
    for sparsity, splits in [(0.0, 0), (0.5, 0), (0.8, 1), (0.95, 7), (0.8, 0)]:
        x, t, packed, pairs, ref_y, bound, _ = _nblocks_case(rng, K, N, B, sparsity)
        y = torch.full((N,), float("nan"), dtype=torch.float16, device="cuda")
        harness.run_nblocks(torch.from_numpy(x).cuda(), t, torch.from_numpy(packed).cuda(), torch.from_numpy(pairs).cuda(), y, scratch,
                            counters, block=B, cols_per_lane=cpl, unroll=unroll, splits=splits)
        torch.cuda.synchronize()
        got = y.cpu().numpy().astype(np.float64)
        tol = _nblocks_tol(ref_y, bound)
        err = np.abs(got - ref_y)
        assert np.isfinite(got).all() and (err <= tol).all(), (sparsity, splits, float(err.max()), int(np.argmax(err - tol)))
        assert not scratch.any() and not counters.any(), "the call left its scratch or counters non-zero"
