"""com.acttail::SparseMatMul on the CPU execution provider against a float64 numpy reference.

The helpers here (graph builder, reference, comparison, case generator) are shared with
``test_ops_cuda.py``, which runs the same properties on the CUDA execution provider.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from acttail_export import ops
from acttail_export.errors import ActTailError

CPU = "CPUExecutionProvider"
REPO = Path(__file__).resolve().parents[1]
FP16_MAX = 65504.0
TOL = {np.float32: 1e-5, np.float16: 2e-3}  # relative to the scale sum|x_kept| |w|


# --------------------------------------------------------------------------------------------
# graph and session helpers
# --------------------------------------------------------------------------------------------
def make_model(dtype, mode: str | None, k: int | None = None, threshold_input: bool = True, threshold_type=TensorProto.FLOAT,
               w_rank: int = 2) -> bytes:
    """One SparseMatMul node; X has any rank, W is [K, N] (dims symbolic), optional threshold input."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    attrs = {}
    if mode is not None:
        attrs["mode"] = mode
    if k is not None:
        attrs["k"] = k
    names = ["X", "W"] + (["t"] if threshold_input else [])
    node = helper.make_node(ops.OP_TYPE, names, ["Y"], domain=ops.DOMAIN, name="sparse0", **attrs)
    inputs = [helper.make_tensor_value_info("X", elem, None),
              helper.make_tensor_value_info("W", elem, [f"d{i}" for i in range(w_rank)])]
    if threshold_input:
        inputs.append(helper.make_tensor_value_info("t", threshold_type, []))
    graph = helper.make_graph([node], "sparse_matmul", inputs, [helper.make_tensor_value_info("Y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    model.ir_version = 8
    return model.SerializeToString()


def make_session(model: bytes, provider: str = CPU, profile: bool = False, threads: int = 2) -> ort.InferenceSession:
    options = ops.session_options()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    if profile:
        options.enable_profiling = True
    return ort.InferenceSession(model, options, providers=[provider])


@functools.lru_cache(maxsize=None)
def cached_session(provider: str, dtype_name: str, mode: str, k: int | None) -> ort.InferenceSession:
    dtype = np.dtype(dtype_name).type
    return make_session(make_model(dtype, mode, k, threshold_input=mode == "threshold"), provider)


def run_op(provider: str, x: np.ndarray, w: np.ndarray, mode: str, threshold: float | None = None, k: int | None = None) -> np.ndarray:
    sess = cached_session(provider, x.dtype.name, mode, k)
    feeds = {"X": x, "W": w}
    if mode == "threshold":
        feeds["t"] = np.array(threshold, np.float32)
    return sess.run(None, feeds)[0]


# --------------------------------------------------------------------------------------------
# reference and comparison
# --------------------------------------------------------------------------------------------
def reference_mask(x: np.ndarray, mode: str, threshold: float | None = None, k: int | None = None) -> np.ndarray:
    """Kept entries of x [M, K] as the op defines them (see docs/kernels.md, "Semantics")."""
    mag = np.abs(x.astype(np.float64))
    if mode == "threshold":
        with np.errstate(invalid="ignore"):
            return (mag > np.float64(np.float32(threshold))) & (mag > 0)  # zeros are never multiplied
    mag = np.where(np.isnan(mag), 0.0, mag)  # NaN ranks with zeros
    mask = np.zeros(x.shape, bool)
    if k:
        cols = np.arange(x.shape[1])
        for row in range(x.shape[0]):
            order = np.lexsort((cols, -mag[row]))  # largest |x| first, ties by lowest index
            mask[row, order[:k]] = True
    return mask & (mag > 0)  # zeros and NaN are never multiplied


def reference(x: np.ndarray, w: np.ndarray, mode: str, threshold: float | None = None, k: int | None = None):
    """(Y in float64, scale = |mask(x)| @ |W|) with X flattened to [M, K] and reshaped back."""
    K = w.shape[0]
    x2 = x.reshape(int(np.prod(x.shape[:-1])), K)
    mask = reference_mask(x2, mode, threshold, k)
    xm = np.where(mask, x2.astype(np.float64), 0.0)
    wf = w.astype(np.float64)
    finite = np.isfinite(wf)
    with np.errstate(invalid="ignore", over="ignore"):
        y = xm @ np.where(finite, wf, 0.0)
        scale = np.abs(xm) @ np.abs(np.where(finite, wf, 0.0))
        for k, n in zip(*np.nonzero(~finite)):  # Inf/NaN weights count only for rows that keep channel k
            y[:, n] += np.where(mask[:, k], xm[:, k] * wf[k, n], 0.0)
            scale[:, n] += np.where(mask[:, k], np.abs(xm[:, k] * wf[k, n]), 0.0)
    shape = x.shape[:-1] + (w.shape[1],)
    return y.reshape(shape), scale.reshape(shape)


def assert_matches(y: np.ndarray, x: np.ndarray, w: np.ndarray, mode: str, threshold=None, k=None) -> None:
    ref, scale = reference(x, w, mode, threshold, k)
    assert y.dtype == x.dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    dtype = x.dtype.type
    yf = y.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = ref.astype(dtype).astype(np.float64)  # what an exact kernel returns after rounding
        bound = TOL[dtype] * (scale + np.abs(ref)) + (1e-7 if dtype == np.float16 else 1e-37)
        err = np.abs(yf - ref)
    near = np.zeros(ref.shape, bool)
    if dtype == np.float16:  # |ref| at the float16 overflow edge may round either way after fp32 accumulation
        near = np.isfinite(ref) & (np.abs(ref) > FP16_MAX * (1 - TOL[dtype])) & (np.abs(ref) < 65520 * (1 + TOL[dtype]))
        ok_near = (np.isinf(yf) & (np.sign(yf) == np.sign(ref))) | (err <= bound)
        assert ok_near[near].all(), "wrong result at the float16 overflow edge"
    regular = ~near
    assert np.array_equal(np.isnan(yf)[regular], np.isnan(expected)[regular]), "NaN placement differs"
    inf = regular & np.isinf(expected)
    assert np.array_equal(yf[inf], expected[inf]), "Inf placement differs"
    fin = regular & np.isfinite(expected)
    bad = fin & ~(err <= bound)
    assert not bad.any(), f"max error {err[bad].max():.3g} over bound {bound[bad].min():.3g} at {np.argwhere(bad)[:5].tolist()}"


# --------------------------------------------------------------------------------------------
# random cases
# --------------------------------------------------------------------------------------------
@st.composite
def cases(draw, max_m: int = 17, max_k: int = 67, max_n: int = 67):
    """A random (x, w, mode, threshold, k) including special values and degenerate sizes."""
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    m = draw(st.integers(0, max_m))
    K = draw(st.integers(0, max_k))
    N = draw(st.integers(1, max_n))
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    if rank == 1:
        m, lead = 1, ()
    elif rank == 2:
        lead = (m,)
    else:
        lead = (2, m // 2) if m % 2 == 0 and draw(st.booleans()) else (1, m)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 1e-3, 30.0]))
    flat = rng.standard_normal((m, K)) * scale
    special = draw(st.sampled_from(["none", "zeros", "nan", "inf", "huge", "ties", "mixed"]))
    if flat.size:
        pick = rng.random(flat.shape)
        if special == "zeros":
            flat[pick < 0.5] = 0.0
            flat[0] = 0.0
        elif special == "nan":
            flat[pick < 0.2] = np.nan
        elif special == "inf":
            flat[pick < 0.05] = np.inf
            flat[pick > 0.97] = -np.inf
        elif special == "huge":
            flat[pick < 0.3] *= 3e4 if dtype == np.float16 else 1e30
        elif special == "ties":
            flat[:] = np.sign(flat) * np.round(np.abs(flat) * 2) / 2  # many equal magnitudes
        elif special == "mixed":
            flat[pick < 0.1] = np.nan
            flat[pick > 0.9] = 0.0
    with np.errstate(over="ignore"):
        x = flat.reshape(lead + (K,)).astype(dtype)  # fp16 'huge' values may become Inf: intended
    w = rng.uniform(-2, 2, size=(K, N)).astype(dtype)
    mode = draw(st.sampled_from(["threshold", "topk"]))
    threshold = k = None
    if mode == "threshold":
        kind = draw(st.sampled_from(["zero", "inf", "quantile", "negative", "nan"]))
        finite = np.abs(x.astype(np.float64))[np.isfinite(x)]
        if kind == "zero":
            threshold = 0.0
        elif kind == "inf":
            threshold = float("inf")
        elif kind == "negative":
            threshold = -1.0
        elif kind == "nan":
            threshold = float("nan")
        else:
            q = draw(st.floats(0.0, 1.0))
            threshold = float(np.quantile(finite, q)) if finite.size else 0.5
            if draw(st.booleans()) and finite.size:  # exactly on a value: |x| == t is masked
                threshold = float(finite[0])
    else:
        k = draw(st.sampled_from([0, K, K // 2, min(K, 1), draw(st.integers(0, K))]))
    return x, w, mode, threshold, k


CPU_SETTINGS = settings(max_examples=1200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@CPU_SETTINGS
@given(cases())
def test_random_cases_match_numpy(case):
    x, w, mode, threshold, k = case
    y = run_op(CPU, x, w, mode, threshold, k)
    assert_matches(y, x, w, mode, threshold, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_multithreaded_larger_shapes(dtype, mode):
    """Big enough for the parallel path (rows x column chunks on ORT's thread pool)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 41, 301)).astype(dtype)
    w = rng.standard_normal((301, 517)).astype(dtype)
    threshold, k = (0.8, None) if mode == "threshold" else (None, 90)
    sess = make_session(make_model(dtype, mode, k, threshold_input=mode == "threshold"), CPU, threads=2)
    feeds = {"X": x, "W": w}
    if mode == "threshold":
        feeds["t"] = np.array(threshold, np.float32)
    assert_matches(sess.run(None, feeds)[0], x, w, mode, threshold, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m,K,N", [(1, 700, 2100), (1, 1536, 576), (3, 700, 2100), (8, 301, 517), (1, 64, 1030)])
def test_multithreaded_decode_split_k(dtype, mode, m, K, N):
    """Decode rows (M <= 8) on the thread pool: split-K over the kept channels (up to 32 partial sums), N beyond one
    2048-column chunk, the float32 M = 1 register-blocked path, kept rows of W with Inf/NaN only where no row keeps them."""
    rng = np.random.default_rng(m * 7 + K)
    x = rng.standard_normal((m, K)).astype(dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    x[:, 5] = 0.0  # never kept, so its row of W may hold anything
    w[5, : N // 2] = np.nan
    w[5, N // 2:] = np.inf
    threshold, k = (0.6, None) if mode == "threshold" else (None, K // 3)
    sess = make_session(make_model(dtype, mode, k, threshold_input=mode == "threshold"), CPU, threads=2)
    feeds = {"X": x, "W": w}
    if mode == "threshold":
        feeds["t"] = np.array(threshold, np.float32)
    y = sess.run(None, feeds)[0]
    assert np.isfinite(y).all()
    assert_matches(y, x, w, mode, threshold, k)
    if m == 1 and dtype == np.float32:  # a kept NaN row reaches the output, as in the reference
        keep = np.flatnonzero(reference_mask(x, mode, threshold, k)[0])
        w[keep[len(keep) // 2], 7] = np.nan
        y = sess.run(None, feeds)[0]
        assert np.isnan(y[0, 7]) and np.isfinite(np.delete(y[0], 7)).all()


def check_kernel_paths(seed: int = 0) -> int:
    """Every CPU path against numpy on 2 threads: decode split-K (M <= 8, with and without the float32 one-row
    path), the skip path (many rows, 2 % kept), the packed dense GEMM (many rows, a non-multiple of 8 of them,
    an odd number of 16-column strips), both dtypes and modes. Returns the number of cases checked."""
    rng = np.random.default_rng(seed)
    n = 0
    for dtype in (np.float32, np.float16):
        for mode in ("threshold", "topk"):
            sess = make_session(make_model(dtype, mode), CPU, threads=2) if mode == "threshold" else None
            for m, K, N, keep in ((1, 700, 2100, 0.4), (5, 300, 517, 0.4), (123, 301, 517, 0.4), (40, 200, 260, 0.02), (17, 64, 48, 0.6)):
                x = rng.standard_normal((m, K)).astype(dtype)
                w = rng.standard_normal((K, N)).astype(dtype)
                threshold = float(np.quantile(np.abs(x.astype(np.float32)), 1 - keep))
                k = max(1, int(keep * K))
                if mode == "threshold":
                    y = sess.run(None, {"X": x, "W": w, "t": np.array(threshold, np.float32)})[0]
                else:
                    y = make_session(make_model(dtype, mode, k, threshold_input=False), CPU, threads=2).run(None, {"X": x, "W": w})[0]
                assert_matches(y, x, w, mode, threshold, k)
                n += 1
    return n


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_simd_variant_matches_numpy(isa):
    """ACTTAIL_CPU_ISA caps the kernels' instruction set, so each variant runs here whatever the CPU picks by itself
    (a cap above what the CPU has falls back to the best it has)."""
    code = "import sys; sys.path.insert(0, 'tests'); import test_ops; print(test_ops.check_kernel_paths())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACTTAIL_CPU_ISA": isa}, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "20"


# --------------------------------------------------------------------------------------------
# semantics spelled out
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_threshold_is_strict_and_drops_nan(dtype):
    x = np.array([[0.5, -0.5, 0.75, np.nan, -2.0, 0.0]], dtype)
    eye = np.eye(6, dtype=dtype)
    y = run_op(CPU, x, eye, "threshold", threshold=0.5)
    np.testing.assert_array_equal(y, np.array([[0, 0, 0.75, 0, -2.0, 0]], dtype))
    assert not run_op(CPU, x, eye, "threshold", threshold=float("inf")).any()
    np.testing.assert_array_equal(run_op(CPU, x, eye, "threshold", threshold=-1.0), np.nan_to_num(x, nan=0.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_topk_ties_lowest_index_and_nan_never_kept(dtype):
    eye = np.eye(8, dtype=dtype)
    ones = np.ones((1, 8), dtype)
    np.testing.assert_array_equal(run_op(CPU, ones, eye, "topk", k=3), np.array([[1, 1, 1, 0, 0, 0, 0, 0]], dtype))
    x = np.array([[np.nan, 3, -1, np.nan, 0, -4, 2, 0]], dtype)
    y = run_op(CPU, x, eye, "topk", k=8)  # k = K: everything but NaN
    np.testing.assert_array_equal(y, np.nan_to_num(x, nan=0.0))
    np.testing.assert_array_equal(run_op(CPU, x, eye, "topk", k=2), np.array([[0, 3, 0, 0, 0, -4, 0, 0]], dtype))
    assert not run_op(CPU, x, eye, "topk", k=0).any()


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_masked_rows_of_w_are_skipped(mode):
    """Inf/NaN in a masked row of W, or in the row of a zero x, never reaches Y (the row is not read)."""
    x = np.array([[1.0, 0.01, -2.0, 0.0]], np.float32)
    w = np.array([[1.0, 2.0], [np.nan, np.inf], [3.0, 4.0], [np.inf, np.nan]], np.float32)
    y = run_op(CPU, x, w, mode, threshold=-1.0 if mode == "threshold" else None, k=2)
    if mode == "threshold":  # t < 0 keeps every non-NaN entry: row 1 (NaN, Inf) is multiplied, the zero row 3 is not
        assert np.isnan(y[0, 0]) and y[0, 1] == np.inf
        y = run_op(CPU, x, w, mode, threshold=0.1)
    np.testing.assert_allclose(y, [[1.0 - 6.0, 2.0 - 8.0]], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_prefill_rows_skip_nonfinite_w_rows(dtype):
    """Many rows (the blocked prefill path) with Inf/NaN in rows of W that no row keeps."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 24)).astype(dtype)
    x[:, 3] = 0.01  # below the threshold everywhere
    x[:, 7] = 0.0   # zero everywhere
    w = rng.standard_normal((24, 33)).astype(dtype)
    w[3, ::2], w[3, 1::2], w[7] = np.inf, np.nan, -np.inf
    y = run_op(CPU, x, w, "threshold", threshold=0.1)
    assert np.isfinite(y).all()
    assert_matches(y, x, w, "threshold", 0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_prefill_dense_path_falls_back_when_its_result_is_not_finite(dtype):
    """The blocked dense prefill product multiplies masked zeros too, so its result is only kept when it is
    finite: an Inf weight in a skipped row (in one column tile of many) or a kept Inf in X must still give
    the row-skipping result, with the thread pool running the tiles."""
    rng = np.random.default_rng(9)
    M, K, N = 300, 256, 700  # 2 x 6 dense tiles of 256 rows x 128 columns
    x = rng.standard_normal((M, K)).astype(dtype)
    x[:, 5] = 0.01  # below the threshold in every row
    w = rng.standard_normal((K, N)).astype(dtype)
    w[5, 650] = np.inf  # a skipped row, last column tile only
    y = run_op(CPU, x, w, "threshold", threshold=0.1)
    assert np.isfinite(y).all()
    assert_matches(y, x, w, "threshold", 0.1)
    x[7, 9] = np.inf  # kept: Inf / NaN in row 7 only
    y = run_op(CPU, x, w, "threshold", threshold=0.1)
    assert not np.isfinite(y[7]).any() and np.isfinite(np.delete(y, 7, axis=0)).all()
    assert_matches(y, x, w, "threshold", 0.1)


def test_fp16_accumulates_in_fp32():
    """2048 products of 1*1 plus a tiny term: an fp16 accumulator would stall at 2048."""
    K = 4097
    x = np.ones((1, K), np.float16)
    w = np.ones((K, 1), np.float16)
    y = run_op(CPU, x, w, "threshold", threshold=0.0)
    assert float(y[0, 0]) == 4096.0  # 4097 rounds to 4096 in fp16 only at the end


# --------------------------------------------------------------------------------------------
# errors: ORT error statuses with clear messages, never a crash
# --------------------------------------------------------------------------------------------
def _run(sess, **feeds):
    return sess.run(None, feeds)


def test_error_k_mismatch():
    x = np.ones((2, 5), np.float32)
    with pytest.raises(Exception, match=r"last dimension of X \(5\) must equal the first dimension of W \(4\)"):
        run_op(CPU, x, np.ones((4, 3), np.float32), "threshold", threshold=0.0)


def test_error_wrong_rank():
    sess = make_session(make_model(np.float32, "topk", k=1, threshold_input=False, w_rank=3))
    with pytest.raises(Exception, match=r"W must be 2-D \[K, N\].*got rank 3"):
        _run(sess, X=np.ones((2, 5), np.float32), W=np.ones((5, 3, 1), np.float32))
    with pytest.raises(Exception, match=r"X must have rank >= 1"):
        run_op(CPU, np.array(1.0, np.float32), np.ones((1, 3), np.float32), "topk", k=1)


def test_error_k_exceeds_K():
    with pytest.raises(Exception, match=r"attribute k=6 exceeds K=5"):
        run_op(CPU, np.ones((2, 5), np.float32), np.ones((5, 3), np.float32), "topk", k=6)


def test_error_threshold_dtype_and_size():
    with pytest.raises(Exception, match=r"(?i)type.*(double|tensor\(double\))"):
        make_session(make_model(np.float32, "threshold", threshold_type=TensorProto.DOUBLE))
    sess = cached_session(CPU, "float32", "threshold", None)
    with pytest.raises(Exception, match=r"threshold must hold exactly one float32 value, got 2"):
        _run(sess, X=np.ones((1, 2), np.float32), W=np.ones((2, 2), np.float32), t=np.zeros(2, np.float32))


@pytest.mark.parametrize(
    "mode,k,threshold_input,message",
    [
        ("threshold", None, False, r"threshold mode needs a 3rd input"),
        ("topk", None, False, r"topk mode needs the int attribute 'k'"),
        ("topk", -1, False, r"attribute k must be >= 0, got -1"),
        ("median", None, True, r'attribute mode must be "threshold" or "topk", got "median"'),
        (None, None, True, r"attribute 'mode' is required"),
    ],
)
def test_error_bad_attributes_at_session_creation(mode, k, threshold_input, message):
    with pytest.raises(Exception, match=message):
        make_session(make_model(np.float32, mode, k, threshold_input=threshold_input))


def test_fp16_fp32_mismatch_is_a_type_error():
    sess = cached_session(CPU, "float16", "topk", 1)
    with pytest.raises(Exception, match=r"(?i)type"):
        _run(sess, X=np.ones((1, 2), np.float32), W=np.ones((2, 2), np.float16))


# --------------------------------------------------------------------------------------------
# ops.py and the built library
# --------------------------------------------------------------------------------------------
def test_library_exports_only_register_custom_ops():
    nm = shutil.which("nm")
    assert nm is not None, "binutils' nm is needed (it comes with the compiler that builds the library)"
    out = subprocess.run([nm, "-D", "--defined-only", ops.get_library_path()], check=True, capture_output=True, text=True).stdout
    symbols = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert symbols == {"RegisterCustomOps"}, symbols


def test_get_library_path_env_and_missing(monkeypatch, tmp_path):
    real = ops.get_library_path()
    monkeypatch.setattr(ops, "_PACKAGE_LIB", tmp_path / "absent.so")
    monkeypatch.delenv(ops.ENV_LIBRARY, raising=False)
    with pytest.raises(ActTailError, match=r"make ops"):
        ops.get_library_path()
    monkeypatch.setenv(ops.ENV_LIBRARY, str(tmp_path / "nope.so"))
    with pytest.raises(ActTailError, match=r"does not exist.*make ops"):
        ops.get_library_path()
    monkeypatch.setenv(ops.ENV_LIBRARY, real)
    assert ops.get_library_path() == real
    bad = tmp_path / "libbad.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setenv(ops.ENV_LIBRARY, str(bad))
    with pytest.raises(ActTailError, match=r"could not load .*libbad.so.*make ops"):
        ops.session_options()


def test_cuda_available_matches_providers():
    """False without the CUDA execution provider; with it, True exactly when a CUDA session places a node on CUDA."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert ops.cuda_available() is False
        return
    try:
        sess = make_session(make_model(np.float32, "topk", 1, threshold_input=False), "CUDAExecutionProvider")
        placed = sess.get_providers()[0] == "CUDAExecutionProvider"
    except Exception:  # onnxruntime-gpu without a usable device
        placed = False
    assert ops.cuda_available() is placed
