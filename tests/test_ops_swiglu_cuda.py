"""``activation="swiglu"`` on the CUDA execution provider, both ops: X = [gate | up] against the numpy reference of
the op on ``silu(gate) * up`` (:func:`acttail_export.reference.swiglu`), on every CUDA path: the decode GEMVs that
compute the activation as they read x (threshold mode, 1-8 rows), and the paths that get it written into the
workspace first (top-k selection, prefill through cuBLAS and the op's own kernels).

Numerics: the device's ``expf`` and numpy's float32 ``exp`` may differ by an ulp, which can move an activated value
by one ulp of T after rounding. Such a value only changes which channels are kept if it sits at the cut, so every
case puts the cut inside a gap of at least 4 ulps of T (threshold: the midpoint of such a gap; top-k: rows that are
permutations of one row, whose k-th and (k+1)-th scores are that far apart). Off the cut, one ulp of one input is far
inside the tolerance of the existing op tests (TOL of the |v||W| bound, test_ops.py / test_ops_nbits.py).

Skipped unless onnxruntime-gpu is installed and a CUDA device is usable (``ops.cuda_available``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import test_ops
import test_ops_nbits
from onnx import helper

from acttail_export import ops
from acttail_export import reference as ref

CUDA = "CUDAExecutionProvider"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ops.cuda_available(), reason="needs onnxruntime-gpu and a usable CUDA device"),
]
GAP = {np.float32: 4 * 2.0**-23, np.float16: 4 * 2.0**-10}  # relative width of the gap the cut sits in: 4 ulps


def _with_activation(model: bytes) -> bytes:
    m = onnx.load_from_string(model)
    m.graph.node[0].attribute.append(helper.make_attribute("activation", "swiglu"))
    return m.SerializeToString()


def _gated(rng, m: int, K: int, dtype, permuted: bool = False) -> np.ndarray:
    """[gate | up] [m, 2K]; with ``permuted`` every row is a channel permutation of the first one (same scores)."""
    gate, up = rng.standard_normal((m, K)) * 2.5, rng.standard_normal((m, K))
    if permuted:
        order = [rng.permutation(K) for _ in range(m)]
        gate, up = np.stack([gate[0][o] for o in order]), np.stack([up[0][o] for o in order])
    return np.concatenate([gate, up], axis=-1).astype(dtype)


def _scores(xa: np.ndarray) -> np.ndarray:
    return np.abs(xa.astype(np.float32)).astype(np.float64)


def _gap_threshold(xa: np.ndarray, keep: float, dtype) -> np.float32:
    """A threshold keeping about ``keep`` of the activated values, in the middle of a gap of >= GAP relative width."""
    s = np.unique(_scores(xa)[np.isfinite(_scores(xa))])
    start = int(len(s) * (1 - keep))
    for i in [*range(start, len(s) - 1), *range(start - 1, 0, -1)]:
        if s[i] > 0 and s[i + 1] - s[i] > GAP[dtype] * s[i + 1]:
            return np.float32((s[i] + s[i + 1]) / 2)
    raise AssertionError("no gap wide enough for the cut")


def _gap_k(xa: np.ndarray, keep: float, dtype) -> int:
    """k near ``keep * K`` whose k-th and (k+1)-th largest scores (the same in every row) are >= GAP apart."""
    s = np.sort(_scores(xa[0]))[::-1]
    K, start = len(s), max(1, int(keep * len(s)))
    for k in [*range(start, K - 1), *range(start - 1, 0, -1)]:
        if s[k] > 0 and s[k - 1] - s[k] > GAP[dtype] * s[k - 1]:
            return k
    raise AssertionError("no gap wide enough for the cut")


# --------------------------------------------------------------------------------------------
# SparseMatMul
# --------------------------------------------------------------------------------------------
def _run_dense(c: test_ops.Case, xg: np.ndarray) -> np.ndarray:
    model = test_ops.make_model(c.x.dtype.type, c.mode, c.k, threshold_input=c.mode == "threshold", ks=c.ks,
                                segments=c.segments, ramp=c.ramp or None, scale_input=c.scale is not None)
    sess = test_ops.make_session(_with_activation(model), CUDA)
    feeds = {"X": xg, "W": c.w}
    if c.mode == "threshold":
        feeds["t"] = np.asarray(c.threshold, np.float32)
    if c.scale is not None:
        feeds["scale"] = c.scale
    return sess.run(None, feeds)[0]


@pytest.fixture(params=["cublas", "own-kernels"])
def prefill_path(request, monkeypatch):
    """The prefill (M > 8) through cuBLAS and through the op's own GEMM kernels (ACTTAIL_CUBLAS=0, read per call)."""
    if request.param == "own-kernels":
        monkeypatch.setenv("ACTTAIL_CUBLAS", "0")
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("K,N", [(4096, 1024), (1536, 576), (300, 136)])
def test_sparse_matmul_swiglu_matches_reference(dtype, mode, m, K, N, prefill_path):
    if m <= 8 and prefill_path == "own-kernels":
        pytest.skip("decode does not use the prefill kernels")
    rng = np.random.default_rng(K + N + m)
    xg = _gated(rng, m, K, dtype, permuted=mode == "topk")
    xa = ref.swiglu(xg)
    w = (rng.standard_normal((K, N)) * 0.05).astype(dtype)
    if mode == "threshold":
        c = test_ops.Case(xa, w, mode, threshold=_gap_threshold(xa, 0.35, dtype))
    else:
        c = test_ops.Case(xa, w, mode, k=_gap_k(xa, 0.35, dtype))
    test_ops.assert_close(_run_dense(c, xg), c)  # the reference of the op on the activated input


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("m", [1, 4, 40])
def test_sparse_matmul_swiglu_members_scale_ramp(dtype, m):
    """Members with their own thresholds, a [G, K] score scale and the ramp, on the activated input."""
    rng = np.random.default_rng(7 + m)
    K, widths = 1030, (512, 300)
    xg = _gated(rng, m, K, dtype)
    xa = ref.swiglu(xg)
    w = (rng.standard_normal((K, sum(widths))) * 0.05).astype(dtype)
    scale = rng.uniform(0.5, 2.0, (2, K)).astype(np.float32)
    t = np.array([_gap_threshold(xa * s, q, dtype) for s, q in zip(scale, (0.3, 0.6))], np.float32)
    c = test_ops.Case(xa, w, "threshold", threshold=t, segments=tuple(np.cumsum(widths).tolist()), ramp=0.5, scale=scale)
    test_ops.assert_close(_run_dense(c, xg), c)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("m", [1, 12])
def test_sparse_matmul_swiglu_nonfinite_gate_and_up(dtype, m):
    """NaN / Inf in gate or up give what silu(gate) * up gives (NaN never kept; silu(-Inf) = NaN, silu(+Inf) * u = Inf)."""
    rng = np.random.default_rng(11)
    K, N = 256, 136
    xg = _gated(rng, m, K, dtype)
    xg[:, 3], xg[:, 5], xg[:, K + 7], xg[:, 9] = np.nan, -np.inf, np.nan, np.inf
    xg[:, 11], xg[:, K + 11] = -200.0, 3.0  # exp(200) overflows: silu = -0
    xa = ref.swiglu(xg)
    w = (rng.standard_normal((K, N)) * 0.05).astype(dtype)
    c = test_ops.Case(xa, w, "threshold", threshold=_gap_threshold(np.where(np.isfinite(xa), xa, 0), 0.5, dtype))
    test_ops.assert_close(_run_dense(c, xg), c)


# --------------------------------------------------------------------------------------------
# SparseMatMulNBits
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m,K,N,block", [(1, 4096, 4096, 32), (1, 11008, 4096, 128), (3, 1536, 576, 64), (8, 300, 517, 16),
                                         (40, 1536, 576, 32)])
def test_nbits_swiglu_matches_reference(dtype, mode, m, K, N, block, prefill_path):
    if m <= 8 and prefill_path == "own-kernels":
        pytest.skip("decode does not use the prefill kernels")
    rng = np.random.default_rng(K + N + m + block)
    xg = _gated(rng, m, K, dtype, permuted=mode == "topk")
    xa = ref.swiglu(xg)
    q, scales, offsets = test_ops_nbits.random_weights(rng, K, N, block, dtype)
    if mode == "threshold":
        case = test_ops_nbits.Case(xa, q, scales, offsets, block, mode, thresholds=np.asarray(_gap_threshold(xa, 0.35, dtype)))
    else:
        case = test_ops_nbits.Case(xa, q, scales, offsets, block, mode, ks=[_gap_k(xa, 0.35, dtype)])
    model = test_ops_nbits.make_model(dtype, K, N, block, mode, ks=case.ks, thresholds=mode == "threshold",
                                      extra={"activation": "swiglu"})
    feeds = case.feeds() | {"X": xg}
    y = test_ops_nbits.make_session(model, CUDA).run(None, feeds)[0]
    test_ops_nbits.assert_matches(y, case)  # the reference of the op on the activated input


def test_wrong_last_dimension_is_an_ort_error_on_cuda():
    model = test_ops.make_model(np.float16, "threshold")
    sess = test_ops.make_session(_with_activation(model), CUDA)
    x, w = np.zeros((1, 65), np.float16), np.zeros((32, 8), np.float16)
    with pytest.raises(Exception, match=r"with activation=\"swiglu\" the last dimension of X must be 2\*K=64"):
        sess.run(None, {"X": x, "W": w, "t": np.array(0.5, np.float32)})


# --------------------------------------------------------------------------------------------
# Prefill of a constant, finite W in threshold mode: silu(gate) * up computed in the mask pass
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=["fused", "apart"])
def prefill_fuse(request, monkeypatch):
    """The cuBLAS prefill with the creation-time weight check; "fused": ACTTAIL_PREFILL_FUSE unset (the default; read per
    call), "apart": ACTTAIL_PREFILL_FUSE=0, the activation kernel before the mask pass."""
    test_ops.set_prefill_guard_env(monkeypatch, weight_check=True)
    test_ops.set_env(monkeypatch, "ACTTAIL_PREFILL_FUSE", None if request.param == "fused" else "0")
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("widths", [(576,), (320, 256), (288, 288)])  # (288, 288): equal widths, one batched GEMM
def test_sparse_matmul_swiglu_prefill_in_mask_pass(dtype, widths, prefill_fuse):
    """W an initializer (constant, checked finite), threshold mode, 40 rows: the mask pass reads [gate | up] itself
    (no SwiGluKernel launched; the default) and the result is the reference's on silu(gate) * up, as with the
    activation kernel apart (ACTTAIL_PREFILL_FUSE=0). Members with their own thresholds and a ramp: every member's mask in that pass."""
    members = len(widths)
    rng = np.random.default_rng(31 + sum(widths))
    K = 1536
    xg = _gated(rng, 40, K, dtype)
    xg[:, 3], xg[:, K + 7] = np.nan, np.inf  # NaN never kept; silu(g) * Inf: Inf where kept
    xa = ref.swiglu(xg)
    w = (rng.standard_normal((K, sum(widths))) * 0.05).astype(dtype)
    finite = np.where(np.isfinite(xa), xa, 0)
    t = np.array([_gap_threshold(finite, q, dtype) for q in (0.4, 0.6)[:members]], np.float32)
    segments = tuple(np.cumsum(widths).tolist()) if members > 1 else None
    c = test_ops.Case(xa, w, "threshold", threshold=t if members > 1 else t[0], segments=segments, ramp=0.5 if members > 1 else 0.0)
    model = test_ops.make_model(dtype, "threshold", None, threshold_input=True, segments=segments, ramp=c.ramp or None)
    sess = test_ops.make_session(test_ops.with_initializers(_with_activation(model), {"W": w}), CUDA)
    y, names = test_ops.run_profiled(lambda: sess.run(None, {"X": xg, "t": np.asarray(c.threshold, np.float32)})[0])
    test_ops.assert_close(y, c)
    assert any("MaskGroups" in n or "MaskRows" in n for n in names), names  # the profiler saw the prefill
    assert any("SwiGluKernel" in n for n in names) == (prefill_fuse == "apart"), names


@pytest.mark.parametrize("case", ["weight-check-off", "topk"])
def test_sparse_matmul_swiglu_prefill_keeps_activation_kernel(case, monkeypatch):
    """The fused prefill (the default) where something after the mask pass reads x: a W not checked (ACTTAIL_WEIGHT_CHECK=0: the
    exact kernel may run) or top-k mode (the selection reads x first): the activation kernel still writes
    silu(gate) * up, and the result is the reference's."""
    test_ops.set_prefill_guard_env(monkeypatch, weight_check=case != "weight-check-off")
    test_ops.set_env(monkeypatch, "ACTTAIL_PREFILL_FUSE", None)
    rng = np.random.default_rng(41 + len(case))
    K, N = 1536, 576
    mode = "topk" if case == "topk" else "threshold"
    xg = _gated(rng, 40, K, np.float16, permuted=mode == "topk")
    xa = ref.swiglu(xg)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float16)
    if mode == "threshold":
        c = test_ops.Case(xa, w, mode, threshold=_gap_threshold(xa, 0.4, np.float16))
    else:
        c = test_ops.Case(xa, w, mode, k=_gap_k(xa, 0.4, np.float16))
    model = test_ops.make_model(np.float16, mode, c.k, threshold_input=mode == "threshold")
    sess = test_ops.make_session(test_ops.with_initializers(_with_activation(model), {"W": w}), CUDA)
    feeds = {"X": xg} | ({"t": np.asarray(c.threshold, np.float32)} if mode == "threshold" else {})
    y, names = test_ops.run_profiled(lambda: sess.run(None, feeds)[0])
    test_ops.assert_close(y, c)
    assert any("SwiGluKernel" in n for n in names), names


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("K,N,block", [(1536, 576, 32), (300, 136, 16)])
def test_nbits_swiglu_prefill_in_mask_pass(dtype, K, N, block, prefill_fuse):
    """Q / scales / offsets as initializers (the dequantized W checked finite), threshold mode, 40 rows: the prefill's
    mask items read [gate | up] themselves (no SwiGluKernel; K = 300: the element-wise items), matching the reference
    on silu(gate) * up, as with the activation kernel apart."""
    rng = np.random.default_rng(K + N + block)
    xg = _gated(rng, 40, K, dtype)
    xg[:, 5] = -np.inf  # silu(-Inf) = NaN: never kept
    xa = ref.swiglu(xg)
    q, scales, offsets = test_ops_nbits.random_weights(rng, K, N, block, dtype)
    thr = np.asarray(_gap_threshold(np.where(np.isfinite(xa), xa, 0), 0.35, dtype))
    case = test_ops_nbits.Case(xa, q, scales, offsets, block, "threshold", thresholds=thr)
    constants = {"Q": case.packed(), "scales": case.scales, "offsets": case.offsets}
    model = test_ops_nbits.make_model(dtype, K, N, block, "threshold", thresholds=True, extra={"activation": "swiglu"})
    sess = test_ops_nbits.make_session(test_ops.with_initializers(model, constants), CUDA)
    y, names = test_ops.run_profiled(lambda: sess.run(None, {"X": xg, "thresholds": thr})[0])
    test_ops_nbits.assert_matches(y, case)
    assert any("PrefillPrepKernel" in n for n in names), names  # the profiler saw the prefill
    assert any("SwiGluKernel" in n for n in names) == (prefill_fuse == "apart"), names
