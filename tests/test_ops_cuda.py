"""com.acttail::SparseMatMul on the CUDA execution provider: the CPU suite's properties, on CUDA.

Skipped cleanly unless onnxruntime-gpu is installed and a CUDA device is usable (``ops.cuda_available``).
``ACTTAIL_CUDA_CASES`` sets the number of random cases (default 300, segments / ks / per-member thresholds /
ramp / scale included; the sanitizer runs use fewer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from test_ops import (
    CPU_SETTINGS,
    CUDA_DECODE_ROWS,
    Case,
    cached_session,
    cases,
    make_model,
    make_session,
    run_case,
    run_op,
    run_profiled,
    set_env,
    set_prefill_guard_env,
    with_initializers,
)
from test_ops import assert_close as ops_assert_close

from acttail_export import ops

CUDA = "CUDAExecutionProvider"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ops.cuda_available(), reason="needs onnxruntime-gpu and a usable CUDA device"),
]


def assert_close(y: np.ndarray, c: Case) -> None:
    """test_ops.assert_close, with the exact tolerance (test_ops.EXACT_TOL: a lost kept row fails it) where the CUDA
    path keeps W and the kept values exact and sums in float32: the decode GEMV (at most 8 rows). The prefill paths
    (cuBLAS and the op's own GEMM) write the masked values to a workspace in T, rounding ramp and scale products, and
    keep the loose one."""
    ops_assert_close(y, c, exact_w=int(np.prod(c.x.shape[:-1])) <= CUDA_DECODE_ROWS)


def assert_matches(y: np.ndarray, x: np.ndarray, w: np.ndarray, mode: str, threshold=None, k=None) -> None:
    assert_close(y, Case(x, w, mode, threshold, k))


N_CASES = int(os.environ.get("ACTTAIL_CUDA_CASES", "300"))


@settings(CPU_SETTINGS, max_examples=N_CASES)
@given(cases())
def test_random_cases_match_reference_cuda(case):
    assert_close(run_case(CUDA, case), case)


@settings(CPU_SETTINGS, max_examples=max(20, N_CASES // 6))
@given(cases(max_m=40, max_k=300, max_n=300))
def test_random_larger_cases_match_reference_cuda(case):
    """Up to 40 rows (prefill paths), several vectors per row and tiles per member."""
    assert_close(run_case(CUDA, case), case)


def _packed_case(rng, dtype, mode: str, m: int, K: int, widths: tuple[int, ...], ramp: float = 0.0, scale_rows: int | None = None) -> Case:
    """q | k | v-like members with their own budgets (thresholds / ks at different quantiles), optional scale."""
    x = rng.standard_normal((m, K)).astype(dtype)
    x[:, ::7] = np.round(x[:, ::7])  # ties around the cut
    w = (rng.standard_normal((K, sum(widths))) * 0.05).astype(dtype)
    segments = tuple(np.cumsum(widths).tolist())
    scale = None
    if scale_rows is not None:
        scale = rng.uniform(0.25, 4.0, (scale_rows, K) if scale_rows else (K,)).astype(np.float32)
    G = len(widths)
    quantiles = np.linspace(0.3, 0.8, G)
    if mode == "threshold":
        t = np.quantile(np.abs(x.astype(np.float32)), quantiles).astype(np.float32)
        return Case(x, w, mode, t, None, None, segments, ramp, scale)
    return Case(x, w, mode, None, None, tuple(int(K * (1 - q)) for q in quantiles), segments, ramp, scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("widths,ramp,scale_rows", [
    ((4096, 1024, 1024), 0.0, None),   # LLaMA q | k | v: one decode launch, tiles per member
    ((2048, 2048), 0.5, 2),            # gate | up with ramp and [G, K] scales
    ((100, 57, 100), 0.25, 0),         # member starts off the 16-byte vector grid, [K] scale
])
def test_packed_members_cuda(dtype, mode, m, widths, ramp, scale_rows):
    c = _packed_case(np.random.default_rng(m + sum(widths)), dtype, mode, m, 1030, widths, ramp, scale_rows)
    assert_close(run_case(CUDA, c), c)


@pytest.mark.parametrize("K", [8192, 8193, 16384, 16385])
def test_topk_selection_with_scale_and_members(K):
    """Float32 score keys (4 radix passes) on float16 x, per-member k on both selection kernels."""
    c = _packed_case(np.random.default_rng(K), np.float16, "topk", 2, K, (24, 40), 0.0, 2)
    assert_close(run_case(CUDA, c), c)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 40])  # decode GEMV (M <= 8) and masked GEMM paths
def test_llm_like_shapes(dtype, mode, m):
    """K beyond one 4096-channel chunk, odd N, ties spanning several scan tiles of the top-k kernel."""
    rng = np.random.default_rng(m)
    K, N = 5003, 257
    x = rng.standard_normal((m, K)).astype(dtype)
    x[:, ::7] = np.round(x[:, ::7])  # many equal magnitudes around the k-th
    w = rng.uniform(-1, 1, size=(K, N)).astype(dtype)
    threshold, k = (0.7, None) if mode == "threshold" else (None, 2001)
    assert_matches(run_op(CUDA, x, w, mode, threshold, k), x, w, mode, threshold, k)


@pytest.mark.parametrize("K", [8192, 8193, 16384, 16385])  # both sides of each top-k selection kernel boundary
def test_topk_selection_kernels_at_their_boundary(K):
    rng = np.random.default_rng(K)
    x = rng.standard_normal((2, K)).astype(np.float16)
    x[:, ::5] = np.round(x[:, ::5])
    w = rng.uniform(-1, 1, size=(K, 24)).astype(np.float16)
    for k in (1, 999, K // 3, K):
        assert_matches(run_op(CUDA, x, w, "topk", k=k), x, w, "topk", None, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_semantics_cuda(dtype):
    eye = np.eye(8, dtype=dtype)
    ones = np.ones((1, 8), dtype)
    np.testing.assert_array_equal(run_op(CUDA, ones, eye, "topk", k=3), np.array([[1, 1, 1, 0, 0, 0, 0, 0]], dtype))
    x = np.array([[np.nan, 3, -1, np.nan, 0, -4, 2, 0]], dtype)
    np.testing.assert_array_equal(run_op(CUDA, x, eye, "topk", k=8), np.nan_to_num(x, nan=0.0))
    np.testing.assert_array_equal(run_op(CUDA, x, eye, "topk", k=2), np.array([[0, 3, 0, 0, 0, -4, 0, 0]], dtype))
    x = np.array([[0.5, -0.5, 0.75, np.nan, -2.0, 0.0, 1.0, 0.25]], dtype)
    np.testing.assert_array_equal(run_op(CUDA, x, eye, "threshold", threshold=0.5), np.array([[0, 0, 0.75, 0, -2.0, 0, 1.0, 0]], dtype))
    assert not run_op(CUDA, x, eye, "threshold", threshold=float("inf")).any()


@pytest.mark.parametrize("m", [1, 12])
def test_masked_rows_of_w_are_skipped_cuda(m):
    x = np.tile(np.array([[1.0, 0.01, -2.0, 0.0]], np.float32), (m, 1))
    w = np.array([[1.0, 2.0], [np.nan, np.inf], [3.0, 4.0], [np.inf, np.nan]], np.float32)
    for mode in ("threshold", "topk"):
        y = run_op(CUDA, x, w, mode, threshold=0.1, k=2)
        np.testing.assert_allclose(y, np.tile([[1.0 - 6.0, 2.0 - 8.0]], (m, 1)), rtol=1e-6)


def test_fp16_accumulates_in_fp32_cuda():
    K = 4097  # also crosses the 4096-channel chunk of the decode kernel
    y = run_op(CUDA, np.ones((1, K), np.float16), np.ones((K, 3), np.float16), "threshold", threshold=0.0)
    assert (y == 4096.0).all()


def test_errors_cuda():
    with pytest.raises(Exception, match=r"attribute k=6 exceeds K=5"):
        run_op(CUDA, np.ones((2, 5), np.float32), np.ones((5, 3), np.float32), "topk", k=6)
    with pytest.raises(Exception, match=r"last dimension of X \(5\) must equal the first dimension of W \(4\)"):
        run_op(CUDA, np.ones((2, 5), np.float16), np.ones((4, 3), np.float16), "threshold", threshold=0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_node_runs_on_cuda_provider(dtype, mode, tmp_path):
    """ORT's profile must show the SparseMatMul node executed by the CUDA execution provider."""
    options = ops.session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "prof")
    import onnxruntime as ort

    sess = ort.InferenceSession(make_model(dtype, mode, 3 if mode == "topk" else None, threshold_input=mode == "threshold"),
                                options, providers=[CUDA, "CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(dtype)
    w = np.random.default_rng(1).standard_normal((16, 8)).astype(dtype)
    feeds = {"X": x, "W": w} | ({"t": np.array(0.5, np.float32)} if mode == "threshold" else {})
    y = sess.run(None, feeds)[0]
    assert_matches(y, x, w, mode, 0.5, 3)
    events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "SparseMatMul"]
    assert nodes, "no SparseMatMul node event in the profile"
    assert {e["args"]["provider"] for e in nodes} == {CUDA}


def test_session_reuse_many_shapes_cuda():
    """One session, alternating shapes and M across the decode/prefill boundary, no stale state."""
    sess = cached_session(CUDA, "float16", "topk", 4)
    rng = np.random.default_rng(3)
    for m, K, N in [(1, 64, 80), (9, 64, 80), (1, 4100, 16), (8, 33, 7), (0, 10, 5), (17, 9, 200)]:
        x = rng.standard_normal((m, K)).astype(np.float16)
        w = rng.standard_normal((K, N)).astype(np.float16)
        assert_matches(sess.run(None, {"X": x, "W": w})[0], x, w, "topk", None, 4)


def test_make_session_on_cuda_keeps_provider():
    sess = make_session(make_model(np.float32, "topk", 2, threshold_input=False), CUDA)
    assert sess.get_providers()[0] == CUDA


# ---- prefill (M > 8): X masked into the workspace and cuBLAS, or (ACTTAIL_CUBLAS=0, or no libcublas) the
# float16 tensor-core GEMM (csrc/sparse_matmul/kernels/masked_gemm_tc.cuh); both with the exact kernel as fallback for Inf/NaN ----
@pytest.fixture(params=["cublas", "own-kernels"])
def prefill_path(request, monkeypatch):
    """Runs a prefill test on both GEMM paths (the op reads ACTTAIL_CUBLAS at every call)."""
    set_env(monkeypatch, "ACTTAIL_CUBLAS", "0" if request.param == "own-kernels" else None)
    return request.param


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m,K,N", [
    (9, 4096, 4096), (17, 4104, 264), (64, 4096, 4096), (512, 4096, 1024), (512, 1024, 4096),  # LLM-like, tensor cores
    (130, 200, 136),                                                                              # partial row, K and column tiles
    (40, 1000, 257), (33, 1001, 64),                                                              # N or K not a multiple of 8: exact kernel
])
def test_prefill_llm_like_fp16(mode, m, K, N, prefill_path):
    rng = np.random.default_rng(m * 7 + K + N)
    x = rng.standard_normal((m, K)).astype(np.float16)
    x[:, ::7] = np.round(x[:, ::7])  # ties around the k-th magnitude
    x[::5, ::11] = 0.0
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float16)
    threshold, k = (0.7, None) if mode == "threshold" else (None, (2 * K) // 5)
    assert_matches(run_op(CUDA, x, w, mode, threshold, k), x, w, mode, threshold, k)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m,K,N", [(40, 256, 136), (512, 1024, 512)])
def test_prefill_skips_nonfinite_w_rows_fp16(mode, m, K, N, prefill_path):
    """Inf/NaN rows of W that no row keeps never reach Y (cuBLAS and tensor-core paths: exact fallback)."""
    rng = np.random.default_rng(m + K)
    x = rng.standard_normal((m, K)).astype(np.float16)
    x[:, 3] = 0.01  # below the threshold and outside the top half for every row
    x[:, 7] = 0.0   # zero everywhere
    w = rng.standard_normal((K, N)).astype(np.float16)
    w[3, ::2], w[3, 1::2], w[7] = np.inf, np.nan, -np.inf
    threshold, k = (0.1, None) if mode == "threshold" else (None, K // 2)
    y = run_op(CUDA, x, w, mode, threshold, k)
    assert np.isfinite(y).all()
    assert_matches(y, x, w, mode, threshold, k)
    # one row keeps channel 3: NaN/Inf in that row of Y only, exact elsewhere
    x[5, 3] = 2.0
    y = run_op(CUDA, x, w, mode, threshold, k)
    assert not np.isfinite(y[5]).all() and np.isfinite(np.delete(y, 5, axis=0)).all()
    assert_matches(y, x, w, mode, threshold, k)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_prefill_fp32(mode, prefill_path):
    """float32 prefill: cuBLAS with float32 compute (TF32 would miss the 1e-5 tolerance), or the exact kernel."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((48, 520)).astype(np.float32)
    x[::3, ::5] = 0.0
    w = rng.standard_normal((520, 264)).astype(np.float32)
    threshold, k = (0.6, None) if mode == "threshold" else (None, 200)
    assert_matches(run_op(CUDA, x, w, mode, threshold, k), x, w, mode, threshold, k)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("widths", [(512, 256, 256), (264, 136), (100, 37)])  # tensor-core eligible or not
def test_prefill_packed_members_skip_nonfinite_rows(mode, widths, prefill_path):
    """Per-member mask + GEMM into each column slice; Inf/NaN rows of W that no member keeps never reach Y,
    also with a ramp (the exact fallback keeps the hard mask's zero set)."""
    c = _packed_case(np.random.default_rng(sum(widths)), np.float16, mode, 48, 520, widths, 0.5, 0)
    c.x[:, 3] = 0.0
    c.w[3] = np.inf
    y = run_case(CUDA, c)
    assert np.isfinite(y).all()
    assert_close(y, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("widths", [(256, 256, 256), (1024, 1024), (512, 128, 128)])  # equal widths: one batched GEMM
@pytest.mark.parametrize("fuse", [True, False])
def test_prefill_members_one_mask_pass(dtype, mode, widths, fuse, monkeypatch):
    """cuBLAS prefill of packed members: unset (the default) or ACTTAIL_PREFILL_FUSE=1 (read per call), every member's
    mask in one pass over X (one MaskGroups launch) and, for equally wide members, one strided-batched GEMM; with
    ACTTAIL_PREFILL_FUSE=0, a mask pass and a GEMM per member. Both match the reference, with [G, K] scales and a ramp."""
    set_env(monkeypatch, "ACTTAIL_CUBLAS", None)
    set_env(monkeypatch, "ACTTAIL_PREFILL_FUSE", None if fuse else "0")
    c = _packed_case(np.random.default_rng(len(widths) + widths[-1]), dtype, mode, 40, 1032, widths, 0.5, len(widths))
    y, names = run_profiled(lambda: run_case(CUDA, c))
    assert_close(y, c)
    masks = [n for n in names if "MaskGroups" in n or "MaskRows" in n]
    assert len(masks) == (1 if fuse else len(widths)), names
    assert all(("MaskGroups" in n) == fuse for n in masks), names


@pytest.mark.parametrize("K,widths", [(1030, (256, 256)), (1032, (64, 64, 64, 64, 64))])
def test_prefill_one_mask_pass_falls_back(K, widths, monkeypatch):
    """The fused prefill (the default) where the one-pass mask does not apply: K not a multiple of the vector width, or more than
    four members: a mask pass and a GEMM per member, as without it; the result is the reference's."""
    set_env(monkeypatch, "ACTTAIL_CUBLAS", None)
    set_env(monkeypatch, "ACTTAIL_PREFILL_FUSE", None)
    c = _packed_case(np.random.default_rng(K + len(widths)), np.float16, "threshold", 40, K, widths, 0.0, None)
    y, names = run_profiled(lambda: run_case(CUDA, c))
    assert_close(y, c)
    assert sum("MaskRows" in n for n in names) == len(widths) and not any("MaskGroups" in n for n in names), names


def test_prefill_fp16_accumulates_in_fp32_cuda(prefill_path):
    """Both GEMM paths: 4097 ones (K = 4104, the rest zero) give 4096 after one final rounding."""
    x = np.zeros((16, 4104), np.float16)
    x[:, :4097] = 1
    y = run_op(CUDA, x, np.ones((4104, 8), np.float16), "threshold", threshold=0.0)
    assert (y == 4096.0).all()


# W as a constant input (an initializer): checked for Inf/NaN once, when the kernel is created -----------------------
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("weights", ["finite", "nonfinite", "finite-check-off"])
def test_prefill_constant_w_guard(mode, weights, monkeypatch):
    """A constant W without Inf/NaN lets the cuBLAS prefill skip its guard (the Inf/NaN scan of Y and the exact kernel
    it arms); with Inf/NaN rows, or with the check turned off (ACTTAIL_WEIGHT_CHECK=0, read when the kernel is
    created), the guard runs as for a W fed at run time. Every variant matches the reference."""
    set_prefill_guard_env(monkeypatch, weight_check=weights != "finite-check-off")
    rng = np.random.default_rng(len(weights) + len(mode))
    m, K, N = 64, 512, 264
    x = rng.standard_normal((m, K)).astype(np.float16)
    x[:, 3], x[:, 7] = 0.01, 0.0  # never kept
    w = rng.standard_normal((K, N)).astype(np.float16)
    if weights == "nonfinite":
        w[3, ::2], w[3, 1::2], w[7] = np.inf, np.nan, -np.inf
    threshold, k = (0.1, None) if mode == "threshold" else (None, K // 2)
    model = make_model(w.dtype.type, mode, k, threshold_input=mode == "threshold")
    sess = make_session(with_initializers(model, {"W": w}), CUDA)
    feeds = {"X": x} | ({"t": np.asarray(threshold, np.float32)} if mode == "threshold" else {})
    y, names = run_profiled(lambda: sess.run(None, feeds)[0])
    assert np.isfinite(y).all()
    assert_matches(y, x, w, mode, threshold, k)
    guarded = weights != "finite"
    assert any("MaskRows" in n or "MaskGroups" in n for n in names), names  # the profiler saw the prefill (none under a sanitizer)
    assert any("FlagNonFiniteKernel" in n for n in names) == guarded, names
    assert any("MaskedGemmKernel" in n for n in names) == guarded, names
    if weights == "nonfinite":  # a row keeping channel 3: non-finite in that row only, through the guard
        x[5, 3] = 2.0
        y = sess.run(None, feeds)[0]
        assert not np.isfinite(y[5]).all() and np.isfinite(np.delete(y, 5, axis=0)).all()
        assert_matches(y, x, w, mode, threshold, k)
