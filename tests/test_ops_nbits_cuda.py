"""com.acttail::SparseMatMulNBits on the CUDA execution provider: the CPU suite's properties, on CUDA.

Skipped cleanly unless onnxruntime-gpu is installed and a CUDA device is usable (``ops.cuda_available``).
``ACTTAIL_CUDA_CASES`` sets the number of random cases (default 300). The forced kernel variants run through the
benchmark harness in ``test_ops_nbits_harness.py``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from test_ops import CUDA_DECODE_ROWS, run_profiled, set_env, set_prefill_guard_env, with_initializers
from test_ops_nbits import (
    CPU_SETTINGS,
    Case,
    cached_session,
    cases,
    llm_case,
    make_model,
    make_session,
    random_weights,
    run_case,
)
from test_ops_nbits import assert_matches as nbits_assert_matches

from acttail_export import ops

CUDA = "CUDAExecutionProvider"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ops.cuda_available(), reason="needs onnxruntime-gpu and a usable CUDA device"),
]
N_CASES = int(os.environ.get("ACTTAIL_CUDA_CASES", "300"))


def assert_matches(y: np.ndarray, case: Case) -> None:
    """The CPU suite's check, with the exact tolerance (test_ops_nbits.EXACT_TOL: a lost kept row fails it) where the
    CUDA path keeps W and the sums in float32: the decode GEMV (at most 8 rows) and the exact kernel (ACTTAIL_CUBLAS=0,
    read at the call). The cuBLAS prefill multiplies W dequantized to T (float16: rounded) and keeps the loose one.
    Measured on an H100 (ACTTAIL_TOL_SPREAD, docs/results/h100_2026-12-05/cuda_tol_spread.jsonl): the error beyond Y's
    rounding is at most 8.1e-8 of the term sum in float32 and 4.7e-9 in float16 over the 176 exact comparisons of this
    file (EXACT_TOL is 2e-5: a margin of 240x)."""
    rows = int(np.prod(case.x.shape[:-1]))
    nbits_assert_matches(y, case, exact_w=rows <= CUDA_DECODE_ROWS or os.environ.get("ACTTAIL_CUBLAS") == "0")


@settings(CPU_SETTINGS, max_examples=N_CASES)
@given(cases())
def test_random_cases_match_reference_cuda(case):
    assert_matches(run_case(case, CUDA), case)


DECODE_SHAPES = [(K, N, B, m) for K, N, B in ((4096, 4096, 32), (4096, 11008, 32), (11008, 4096, 128)) for m in (1, 3, 8)]
DECODE_SHAPES += [(K, N, B, m) for K, N, B in ((300, 257, 16), (4100, 2100, 64)) for m in (1, 2, 4, 5, 8)]


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("K,N,block,m", DECODE_SHAPES)
def test_decode_llm_shapes(K, N, block, m, mode):
    """The stream-K GEMV for 1-8 rows: vector loads (N % 32 == 0), the byte path (odd N, K % B != 0), ranges that
    start and end inside a quant block and span two tiles."""
    case = llm_case(np.random.default_rng(K + N + m), m, K, N, block, np.float16, mode)
    assert_matches(run_case(case, CUDA), case)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("m", [1, 4, 40])
def test_packed_members_cuda(dtype, m):
    """Members whose boundaries fall inside a lane's window (shared windows), per-member thresholds and scales, ks
    per member with a ramp, decode and prefill."""
    rng = np.random.default_rng(m)
    K, N, segments = 1000, 2100, [1000, 1500, 2100]
    x = rng.standard_normal((m, K)).astype(dtype)
    q, scales, offsets = random_weights(rng, K, N, 32, dtype)
    scale = rng.uniform(0.5, 2.0, (3, K)).astype(np.float32)
    for case in (Case(x, q, scales, offsets, 32, "threshold", segments, None, np.array([0.3, 0.9, 1.5], np.float32), scale),
                 Case(x, q, scales, offsets, 32, "topk", segments, [100, 400, 900], None, None, ramp=0.5),
                 Case(x, q, scales, offsets, 32, "topk", segments, [300, 300, 300], None, scale[0])):
        assert_matches(run_case(case, CUDA), case)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("segments", [[512, 1024, 1536], [1024, 1280, 1536]])  # equal widths: one batched GEMM
@pytest.mark.parametrize("fuse", [True, False])
def test_prefill_members_batched_gemm(dtype, mode, segments, fuse, monkeypatch):
    """cuBLAS prefill of members with their own rules: unset (the default) or ACTTAIL_PREFILL_FUSE=1 (read per call),
    equally wide adjacent members share one strided-batched GEMM over W dequantized once; with ACTTAIL_PREFILL_FUSE=0 a
    GEMM per member; both match the reference."""
    set_env(monkeypatch, "ACTTAIL_CUBLAS", None)
    set_env(monkeypatch, "ACTTAIL_PREFILL_FUSE", None if fuse else "0")
    rng = np.random.default_rng(segments[0] + len(mode))
    K, N, B = 1024, segments[-1], 32
    x = rng.standard_normal((40, K)).astype(dtype)
    q, scales, offsets = random_weights(rng, K, N, B, dtype)
    if mode == "threshold":
        case = Case(x, q, scales, offsets, B, mode, segments, None, np.array([0.3, 0.9, 1.5], np.float32))
    else:
        case = Case(x, q, scales, offsets, B, mode, segments, [100, 400, 900], None, None, ramp=0.5)
    y, names = run_profiled(lambda: run_case(case, CUDA))
    assert_matches(y, case)
    # cuBLAS' GEMM launches (its split-K reductions, copies and the op's own kernels aside): one strided-batched GEMM
    # when fused and every member equally wide, else one per member. A float32 GEMM split along K launches a second
    # kernel named "..._execute_split_k_kernel..." (measured on the H100 with cuBLAS 13): part of the same GEMM.
    gemms = [n for n in names if "acttail" not in n and any(s in n.lower() for s in ("gemm", "nvjet", "gemv"))
             and not any(s in n.lower() for s in ("split_k", "splitk"))]
    batched = fuse and len(set(np.diff([0, *segments]).tolist())) == 1
    assert len(gemms) == (1 if batched else len(segments)), gemms


@pytest.fixture(params=["cublas", "exact"])
def prefill_path(request, monkeypatch):
    """Runs a prefill test on both paths (the op reads ACTTAIL_CUBLAS at every call)."""
    set_env(monkeypatch, "ACTTAIL_CUBLAS", "0" if request.param == "exact" else None)
    return request.param


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m,K,N,block", [(9, 4096, 1024, 32), (64, 1024, 4096, 128), (512, 1024, 512, 32), (33, 1001, 257, 16)])
def test_prefill(dtype, mode, m, K, N, block, prefill_path):
    """M > 8: mask + dequantize + cuBLAS (vectorized and scalar preparation), or the exact kernel alone."""
    case = llm_case(np.random.default_rng(m + K + N), m, K, N, block, dtype, mode)
    case.x[::5, ::11] = 0
    assert_matches(run_case(case, CUDA), case)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 5, 40, 300])
def test_skipped_blocks_never_reach_y_cuda(mode, m, prefill_path):
    """Inf/NaN scales of a block no row keeps: decode skips it; prefill's dequantized W holds Inf/NaN, which arms the
    exact kernel after cuBLAS. One row keeping a channel there: only that row becomes non-finite."""
    rng = np.random.default_rng(m)
    K, N, B = 256, 96, 32
    x = rng.standard_normal((m, K)).astype(np.float16)
    x[:, 32:64] = 0.0
    q, scales, offsets = random_weights(rng, K, N, B, np.float16)
    scales[1, ::2], scales[1, 1::2], offsets[1, ::3] = np.inf, np.nan, -np.inf
    case = Case(x, q, scales, offsets, B, mode, None, [100] if mode == "topk" else None,
                np.array(0.3, np.float32) if mode == "threshold" else None)
    y = run_case(case, CUDA)
    assert np.isfinite(y).all()
    assert_matches(y, case)
    x[0, 40] = 4.0
    y = run_case(case, CUDA)
    assert not np.isfinite(y[0]).any() and np.isfinite(y[1:]).all()
    assert_matches(y, case)
    y2 = run_case(case, CUDA)  # the exact kernel reset its flag: a second call gives the same result
    np.testing.assert_array_equal(np.isfinite(y2), np.isfinite(y))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_semantics_cuda(dtype):
    K = N = 8
    q = np.eye(K, dtype=np.uint8)
    ones, zeros = np.ones((1, N), dtype), np.zeros((1, N), dtype)
    x = np.array([[0.5, -0.5, 0.75, np.nan, -2.0, 0.0, 1.0, 0.25]], dtype)
    thr = Case(x, q, ones, zeros, 16, "threshold", thresholds=np.array(0.5, np.float32))
    np.testing.assert_array_equal(run_case(thr, CUDA), np.array([[0, 0, 0.75, 0, -2.0, 0, 1.0, 0]], dtype))
    topk = Case(x, q, ones, zeros, 16, "topk", ks=[8])
    np.testing.assert_array_equal(run_case(topk, CUDA), np.nan_to_num(x, nan=0.0))
    topk.x = np.ones((1, K), dtype)
    topk.ks = [3]
    np.testing.assert_array_equal(run_case(topk, CUDA), np.array([[1, 1, 1, 0, 0, 0, 0, 0]], dtype))


@pytest.mark.parametrize("m", [1, 16])
def test_fp16_accumulates_in_fp32_cuda(m, prefill_path):
    K = 4097
    nb = (K + 31) // 32
    case = Case(np.ones((m, K), np.float16), np.ones((K, 64), np.uint8), np.ones((nb, 64), np.float16), np.zeros((nb, 64), np.float16),
                32, "threshold", thresholds=np.array(0.0, np.float32))
    assert (run_case(case, CUDA) == 4096.0).all()


def test_zero_sizes_cuda():
    rng = np.random.default_rng(0)
    q, scales, offsets = random_weights(rng, 20, 6, 16, np.float16)
    assert run_case(Case(np.zeros((0, 20), np.float16), q, scales, offsets, 16, "topk", ks=[3]), CUDA).shape == (0, 6)
    q0, s0, o0 = random_weights(rng, 0, 6, 16, np.float16)
    y = run_case(Case(np.zeros((3, 0), np.float16), q0, s0, o0, 16, "topk", ks=[0]), CUDA)
    assert y.shape == (3, 6) and not y.any()


def test_scratch_left_zero_across_calls_and_shapes():
    """Repeats of one call agree to one float16 ulp (atomics reorder the sums) in between calls of other shapes that
    share and grow the per-stream scratch; a scratch left non-zero would add a whole earlier output."""
    rng = np.random.default_rng(7)
    first = llm_case(rng, 1, 4096, 4096, 32, np.float16, "threshold")
    sess = cached_session(CUDA, first.key())
    outputs = []
    for m, K, N in [(1, 4096, 4096), (3, 4096, 11008), (8, 1024, 30016), (2, 64, 96)]:
        other = llm_case(rng, m, K, N, 32, np.float16, "threshold")
        other.thresholds = first.thresholds
        assert_matches(cached_session(CUDA, other.key()).run(None, other.feeds())[0], other)
        outputs.append(sess.run(None, first.feeds())[0])
    assert_matches(outputs[0], first)
    ulp = np.spacing(np.abs(outputs[0])).astype(np.float32)
    for y in outputs[1:]:
        assert (np.abs(y.astype(np.float32) - outputs[0].astype(np.float32)) <= ulp).all()


def test_concurrent_sessions_on_their_own_streams():
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            for i in range(6):
                case = llm_case(rng, 1 + (seed + i) % 3, 2048 + 256 * seed, 1024 + 512 * i, 32, np.float16, "threshold")
                sess = make_session(make_model(np.float16, case.K, case.N, 32, "threshold"), CUDA)
                assert_matches(sess.run(None, case.feeds())[0], case)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_graph_replay_with_new_inputs(mode, m):
    """enable_cuda_graph: ORT captures the node once and replays it; outputs follow the bound inputs."""
    import onnxruntime as ort

    K, N = 4096, 4096
    rng = np.random.default_rng(11)
    case = llm_case(rng, m, K, N, 32, np.float16, mode)
    sess = make_session(make_model(np.float16, K, N, 32, mode, k=case.ks[0] if mode == "topk" else None,
                                   thresholds=mode == "threshold"), CUDA, provider_options={"enable_cuda_graph": "1"})
    values = {name: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for name, v in case.feeds().items()}
    y = ort.OrtValue.ortvalue_from_shape_and_type([m, N], np.float16, "cuda", 0)
    binding = sess.io_binding()
    for name, v in values.items():
        binding.bind_ortvalue_input(name, v)
    binding.bind_ortvalue_output("Y", y)
    for _ in range(5):
        case.x = rng.standard_normal((m, K)).astype(np.float16)
        values["X"].update_inplace(case.x)
        sess.run_with_iobinding(binding)
        assert_matches(y.numpy(), case)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("m", [1, 12])
def test_node_runs_on_cuda_provider(dtype, m, tmp_path):
    """ORT's profile shows the SparseMatMulNBits node executed by the CUDA execution provider."""
    import onnxruntime as ort

    case = llm_case(np.random.default_rng(m), m, 64, 48, 16, dtype, "threshold")
    options = ops.session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "prof")
    sess = ort.InferenceSession(make_model(dtype, 64, 48, 16, "threshold"), options, providers=[CUDA, "CPUExecutionProvider"])
    assert_matches(sess.run(None, case.feeds())[0], case)
    events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "SparseMatMulNBits"]
    assert nodes, "no SparseMatMulNBits node event in the profile"
    assert {e["args"]["provider"] for e in nodes} == {CUDA}


def test_errors_cuda():
    with pytest.raises(Exception, match=r"attribute k=21 exceeds K=20"):
        make_session(make_model(np.float16, 20, 6, 16, "topk", k=21, thresholds=False), CUDA)
    rng = np.random.default_rng(1)
    case = llm_case(rng, 2, 20, 6, 16, np.float16, "threshold")
    with pytest.raises(Exception, match=r"scales must be \[2, 6\]"):
        cached_session(CUDA, case.key()).run(None, case.feeds() | {"scales": case.scales[:1]})


# Q / scales / offsets as constant inputs (initializers): the dequantized W checked for Inf/NaN once, at creation ------
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("weights", ["finite", "nan-scale", "overflow", "finite-check-off"])
def test_prefill_constant_weights_guard(mode, weights, monkeypatch):
    """Constant scales / offsets whose dequantized W has no Inf/NaN let the cuBLAS prefill leave out the exact kernel
    its Inf/NaN flag arms. A NaN scale, or a finite scale whose s * 15 + o overflows float16 (W rounds to Inf in the
    prefill's float16 W, not in the reference), or the check turned off (ACTTAIL_WEIGHT_CHECK=0) keep it; every
    variant matches the reference (blocks holding the bad values are never kept)."""
    set_prefill_guard_env(monkeypatch, weight_check=weights != "finite-check-off")
    rng = np.random.default_rng(len(weights) + len(mode))
    m, K, N, B = 48, 256, 96, 32
    x = rng.standard_normal((m, K)).astype(np.float16)
    x[:, 32:64] = 0.0  # block 1 is never kept
    q, scales, offsets = random_weights(rng, K, N, B, np.float16)
    if weights == "nan-scale":
        scales[1, 5] = np.nan
    elif weights == "overflow":
        q[32:64, 7], scales[1, 7], offsets[1, 7] = 15, 5000.0, 0.0  # 75000 > 65504
    case = Case(x, q, scales, offsets, B, mode, None, [100] if mode == "topk" else None,
                np.array(0.3, np.float32) if mode == "threshold" else None)
    constants = {"Q": case.packed(), "scales": case.scales, "offsets": case.offsets}
    model = make_model(case.x.dtype.type, case.K, case.N, case.block, case.mode, ks=case.ks, thresholds=case.mode == "threshold")
    sess = make_session(with_initializers(model, constants), CUDA)
    feeds = {k: v for k, v in case.feeds().items() if k not in constants}
    y, names = run_profiled(lambda: sess.run(None, feeds)[0])
    assert np.isfinite(y).all()
    assert_matches(y, case)
    assert any("PrefillPrepKernel" in n for n in names), names  # the profiler saw the prefill (none under a sanitizer)
    assert any("NBitsGemvKernel" in n for n in names) == (weights != "finite"), names
