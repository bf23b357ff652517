"""com.acttail::SparseMatMul on the CPU execution provider against the float64 reference of the op contract
(:func:`acttail_export.reference.sparse_matmul`).

The helpers here (graph builder, reference adapter, comparison, case generator) are shared with
``test_ops_cuda.py``, ``test_ops_cuda_decode.py`` and ``test_ops_harness.py``, which run the same properties on CUDA.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from acttail_export import ops
from acttail_export import reference as ref
from acttail_export.errors import ActTailError

CPU = "CPUExecutionProvider"
REPO = Path(__file__).resolve().parents[1]
FP16_MAX = 65504.0
# Relative to the bound sum |v_kept| |w| + |y|: float32 accumulation of up to 67 (CPU) / 20000 (CUDA) products,
# measured well under these (float32 ~1e-6, float16 ~5e-4: one rounding of the output and, on the cuBLAS prefill
# path, of each masked value).
TOL = {np.float32: 1e-5, np.float16: 2e-3}
# The CPU kernels keep W and the kept values exact in float32 (exact_w=True): only the float32 sums (1e-5 of the bound
# sum) and, in float16, Y's rounding (2^-11 of |y|; in float32 the |y| term stays TOL's). Every CPU test passes with it
# (every SIMD path included). Measured spread (ACTTAIL_TOL_SPREAD, log_spread below: the error beyond Y's rounding as a
# fraction of the bound sum), over the 681 exact_w comparisons of this file, the ACTTAIL_CPU_ISA=avx2 (the path of
# AVX2-only CPUs) and scalar subprocesses included: at most 2.9e-7 in float32 (float32 x times float32 w is rounded
# once per product; the dense prefill's fallback test) and 3.6e-8 in float16, so 1e-5 leaves a factor of 35. TOL's
# float16 2e-3 of the bound sum is for the cuBLAS prefill's float16 values and would let a lost kept row pass at K in
# the thousands (test_exact_tolerance_catches_a_lost_row).
EXACT_TOL, ROUNDING = 1e-5, {np.float32: 1e-5, np.float16: 2.0**-11}
# Calls of at most this many rows take the CUDA ops' decode GEMV (float32 sums of exact products: the exact tolerance
# holds there); more rows take the prefill paths (csrc/*/cuda.cu)
CUDA_DECODE_ROWS = 8


def log_spread(err: np.ndarray, want: np.ndarray, bound_sum: np.ndarray, dtype, where: np.ndarray, floor: float) -> None:
    """With ACTTAIL_TOL_SPREAD=FILE, append the largest error beyond Y's rounding (2^-24 |y| in float32; in float16 2^-11 |y| and
    the tolerance's absolute floor, which covers subnormal outputs), as a fraction of the bound sum, of one exact_w comparison:
    the measured spread the tolerance comments cite (off by default)."""
    path = os.environ.get("ACTTAIL_TOL_SPREAD")
    sel = where & (bound_sum > 0)
    if not path or not sel.any():
        return
    rounding = ROUNDING[dtype] * np.abs(want[sel]) + floor if dtype == np.float16 else 2.0**-24 * np.abs(want[sel])
    beyond = np.maximum(err[sel] - rounding, 0.0) / bound_sum[sel]
    with open(path, "a") as f:
        f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "dtype": np.dtype(dtype).name,
                            "spread": float(beyond.max())}) + "\n")


@dataclass(frozen=True)
class Case:
    """One call of the op: inputs, mode and the optional contract parts (segments, ks, per-member thresholds,
    ramp, scale)."""

    x: np.ndarray
    w: np.ndarray
    mode: str
    threshold: float | np.ndarray | None = None  # scalar or one float32 per member
    k: int | None = None
    ks: tuple[int, ...] | None = None
    segments: tuple[int, ...] | None = None
    ramp: float = 0.0
    scale: np.ndarray | None = field(default=None, compare=False)

    @property
    def members(self) -> int:
        return len(self.segments) if self.segments else 1


# --------------------------------------------------------------------------------------------
# graph and session helpers
# --------------------------------------------------------------------------------------------
def make_model(dtype, mode: str | None, k: int | None = None, threshold_input: bool = True, threshold_type=TensorProto.FLOAT,
               w_rank: int = 2, *, ks=None, segments=None, ramp: float | None = None, scale_input: bool = False) -> bytes:
    """One SparseMatMul node; X has any rank, W is [K, N] (dims symbolic); optional thresholds and scale inputs."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    attrs = {}
    if mode is not None:
        attrs["mode"] = mode
    if k is not None:
        attrs["k"] = k
    if ks is not None:
        attrs["ks"] = list(ks)
    if segments is not None:
        attrs["segments"] = list(segments)
    if ramp is not None:
        attrs["ramp"] = float(ramp)
    names = ["X", "W"] + (["t"] if threshold_input else [""] if scale_input else []) + (["scale"] if scale_input else [])
    node = helper.make_node(ops.OP_TYPE, names, ["Y"], domain=ops.DOMAIN, name="sparse0", **attrs)
    inputs = [helper.make_tensor_value_info("X", elem, None),
              helper.make_tensor_value_info("W", elem, [f"d{i}" for i in range(w_rank)])]
    if threshold_input:
        inputs.append(helper.make_tensor_value_info("t", threshold_type, None))
    if scale_input:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, None))
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


def set_env(monkeypatch, name: str, value: str | None) -> None:
    """Set the environment variable `name` to `value` for the test, or remove it (None)."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


def set_prefill_guard_env(monkeypatch, weight_check: bool) -> None:
    """The cuBLAS prefill path, with the creation-time check of constant weights on or off (ACTTAIL_WEIGHT_CHECK=0)."""
    set_env(monkeypatch, "ACTTAIL_CUBLAS", None)
    set_env(monkeypatch, "ACTTAIL_WEIGHT_CHECK", None if weight_check else "0")


def with_initializers(model: bytes, constants: dict[str, np.ndarray]) -> bytes:
    """`model` with the graph inputs named in `constants` turned into initializers (constant inputs, as exported
    models hold their weights)."""
    proto = onnx.load_from_string(model)
    kept = [i for i in proto.graph.input if i.name not in constants]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in constants.items())
    return proto.SerializeToString()


def run_profiled(run):
    """(`run()`, the names of the CUDA kernels it launched): CUPTI through torch.profiler, ONNX Runtime's kernels
    included; a compute-sanitizer run records none."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        value = run()
        torch.cuda.synchronize()
    return value, [ev.name for ev in prof.events()]


@functools.lru_cache(maxsize=256)
def cached_session(provider: str, dtype_name: str, mode: str, k: int | None, ks=None, segments=None, ramp: float = 0.0,
                   scale_input: bool = False) -> ort.InferenceSession:
    dtype = np.dtype(dtype_name).type
    model = make_model(dtype, mode, k, threshold_input=mode == "threshold", ks=ks, segments=segments, ramp=ramp or None,
                       scale_input=scale_input)
    return make_session(model, provider)


def run_case(provider: str, c: Case) -> np.ndarray:
    sess = cached_session(provider, c.x.dtype.name, c.mode, c.k, c.ks, c.segments, c.ramp, c.scale is not None)
    feeds = {"X": c.x, "W": c.w}
    if c.mode == "threshold":
        feeds["t"] = np.asarray(c.threshold, np.float32)
    if c.scale is not None:
        feeds["scale"] = c.scale
    return sess.run(None, feeds)[0]


def run_op(provider: str, x: np.ndarray, w: np.ndarray, mode: str, threshold: float | None = None, k: int | None = None) -> np.ndarray:
    return run_case(provider, Case(x, w, mode, threshold, k))


# --------------------------------------------------------------------------------------------
# reference and comparison
# --------------------------------------------------------------------------------------------
def reference(c: Case) -> tuple[np.ndarray, np.ndarray]:
    """(Y, bound) in float64 of :func:`acttail_export.reference.sparse_matmul` for this case.

    In top-k mode the op never keeps a channel whose score is NaN, zero or negative (its ranking key is 0): such x
    are zeroed, member by member, before the reference sees them, which leaves every rank and the largest dropped
    score unchanged.
    """
    G, (K, N) = c.members, c.w.shape
    lead = c.x.shape[:-1]
    x2 = c.x.reshape(int(np.prod(lead)), K)
    if x2.size == 0:  # nothing is multiplied (the reference's reshape(-1, K) cannot take K == 0)
        return np.zeros(lead + (N,)), np.zeros(lead + (N,))
    scale = None if c.scale is None else np.broadcast_to(c.scale, (G, K))
    thresholds = np.broadcast_to(np.asarray(0.0 if c.threshold is None else c.threshold, np.float32).reshape(-1), (G,))
    ks = c.ks if c.ks is not None else (c.k,) * G
    members = [ref.Member(threshold=float(thresholds[g]), k=ks[g], scale=None if scale is None else scale[g]) for g in range(G)]
    if c.mode == "threshold":
        y, bound = ref.sparse_matmul(x2, c.w, c.mode, members, c.segments, c.ramp)
    else:
        ys, bounds = [], []
        ends = list(c.segments or (N,))
        for member, start, end in zip(members, [0, *ends[:-1]], ends):
            x = np.where(ref.scores(x2, member.scale) > 0, x2, np.zeros((), x2.dtype))
            y, b = ref.sparse_matmul(x, c.w[:, start:end], "topk", [member], None, c.ramp)
            ys.append(y)
            bounds.append(b)
        y, bound = np.concatenate(ys, axis=-1), np.concatenate(bounds, axis=-1)
    return y.reshape(lead + (N,)), bound.reshape(lead + (N,))


def assert_close(y: np.ndarray, c: Case, exact_w: bool = False) -> None:
    """y (the op's output) equals the reference up to TOL of the bound (exact_w: EXACT_TOL / ROUNDING, for paths that
    keep W in float32); Inf/NaN exactly where the reference has them."""
    want, bound_sum = reference(c)
    assert y.dtype == c.x.dtype and y.shape == want.shape, (y.dtype, y.shape, want.shape)
    dtype = c.x.dtype.type
    yf = y.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = want.astype(dtype).astype(np.float64)  # what an exact kernel returns after rounding
        scaled = EXACT_TOL * bound_sum + ROUNDING[dtype] * np.abs(want) if exact_w else TOL[dtype] * (bound_sum + np.abs(want))
        bound = scaled + (1e-7 if dtype == np.float16 else 1e-37)
        err = np.abs(yf - want)
    near = np.zeros(want.shape, bool)
    if dtype == np.float16:  # |y| at the float16 overflow edge may round either way after fp32 accumulation
        near = np.isfinite(want) & (np.abs(want) > FP16_MAX * (1 - TOL[dtype])) & (np.abs(want) < 65520 * (1 + TOL[dtype]))
        ok_near = (np.isinf(yf) & (np.sign(yf) == np.sign(want))) | (err <= bound)
        assert ok_near[near].all(), "wrong result at the float16 overflow edge"
    regular = ~near
    assert np.array_equal(np.isnan(yf)[regular], np.isnan(expected)[regular]), "NaN placement differs"
    inf = regular & np.isinf(expected)
    assert np.array_equal(yf[inf], expected[inf]), "Inf placement differs"
    fin = regular & np.isfinite(expected)
    bad = fin & ~(err <= bound)
    assert not bad.any(), f"max error {err[bad].max():.3g} over bound {bound[bad].min():.3g} at {np.argwhere(bad)[:5].tolist()}"
    if exact_w:  # passing comparisons only (the positive controls' failing ones are not a spread)
        log_spread(err, want, bound_sum, dtype, fin, 1e-7)


def assert_matches(y: np.ndarray, x: np.ndarray, w: np.ndarray, mode: str, threshold=None, k=None, exact_w: bool = False) -> None:
    assert_close(y, Case(x, w, mode, threshold, k), exact_w=exact_w)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_tolerance_catches_a_lost_row(dtype):
    """Positive control of the CPU tests' tolerance: the op's decode result at K = 4096 (half the rows kept) passes it,
    and the same result without one kept row's contribution (a kernel that skipped it) fails it."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((1, 4096)).astype(dtype)
    w = (rng.standard_normal((4096, 256)) * 0.05).astype(dtype)
    t = float(np.median(np.abs(x.astype(np.float32))))
    y = run_op(CPU, x, w, "threshold", threshold=t)
    assert_matches(y, x, w, "threshold", t, exact_w=True)
    k = int(np.flatnonzero(np.abs(x[0].astype(np.float32)) > t)[100])
    lost = (y.astype(np.float64) - float(x[0, k]) * w[k].astype(np.float64)).astype(dtype)
    with pytest.raises(AssertionError, match="over bound"):
        assert_matches(lost, x, w, "threshold", t, exact_w=True)


def kept_mask(x: np.ndarray, mode: str, threshold=None, k=None) -> np.ndarray:
    """Channels the op keeps (one member, no scale): the reference's rule."""
    if mode == "threshold":
        return ref.threshold_keep(x, threshold) & (x != 0)
    keep, _ = ref.topk_keep(x, k)
    return keep & (np.abs(x.astype(np.float32)) > 0)


# --------------------------------------------------------------------------------------------
# random cases
# --------------------------------------------------------------------------------------------
def _special_values(draw, rng, flat: np.ndarray, dtype) -> None:
    special = draw(st.sampled_from(["none", "zeros", "nan", "inf", "huge", "ties", "mixed"]))
    if not flat.size:
        return
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


def _threshold(draw, x: np.ndarray, scale) -> float:
    kind = draw(st.sampled_from(["zero", "inf", "quantile", "quantile", "negative", "nan"]))
    if kind in ("zero", "inf", "negative", "nan"):
        return {"zero": 0.0, "inf": float("inf"), "negative": -1.0, "nan": float("nan")}[kind]
    s = ref.scores(x, scale).astype(np.float64)
    finite = s[np.isfinite(s)]
    if not finite.size:
        return 0.5
    if draw(st.booleans()):  # exactly on a score: s == t is dropped
        return float(finite.flat[0])
    return float(np.quantile(finite, draw(st.floats(0.0, 1.0))))


def _segments(draw, N: int) -> tuple[int, ...] | None:
    G = draw(st.sampled_from([1, 1, 1, 1, 1, 2, 3]))  # packed nodes in ~30 % of the cases: each needs its own session
    if G == 1 or N < G:
        return None if draw(st.booleans()) or N < 1 else (N,)
    cuts = sorted(draw(st.lists(st.integers(1, N - 1), min_size=G - 1, max_size=G - 1, unique=True)))
    return (*cuts, N)


@st.composite
def cases(draw, max_m: int = 17, max_k: int = 67, max_n: int = 67, contract: bool = True):
    """A random Case including special values, degenerate sizes and (contract=True) segments, per-member
    thresholds / ks, ramp and scale."""
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
    flat = rng.standard_normal((m, K)) * draw(st.sampled_from([1.0, 1e-3, 30.0]))
    _special_values(draw, rng, flat, dtype)
    with np.errstate(over="ignore"):
        x = flat.reshape(lead + (K,)).astype(dtype)  # fp16 'huge' values may become Inf: intended
    w = rng.uniform(-2, 2, size=(K, N)).astype(dtype)
    mode = draw(st.sampled_from(["threshold", "topk"]))
    segments = _segments(draw, N) if contract else None
    G = len(segments) if segments else 1
    ramp = draw(st.sampled_from([0.0, 0.0, 0.25, 1.0, 3.0])) if contract else 0.0
    scale = None
    if contract and draw(st.sampled_from([False, False, True])):
        rows = draw(st.sampled_from([0, G]))  # 0: [K]
        scale = rng.uniform(0.25, 4.0, (rows, K) if rows else (K,)).astype(np.float32)
        if scale.size and draw(st.booleans()):
            scale.flat[rng.integers(0, scale.size)] = 0.0  # a zero score: never kept in top-k
    member_scale = [None if scale is None else (scale if scale.ndim == 1 else scale[g]) for g in range(G)]
    threshold = k = ks = None
    if mode == "threshold":
        per_member = G > 1 and draw(st.booleans())
        values = [_threshold(draw, x, member_scale[g]) for g in range(G if per_member else 1)]
        threshold = np.array(values, np.float32) if per_member else values[0]
    else:
        pick = st.sampled_from([0, K, K // 2, min(K, 1), draw(st.integers(0, K))])
        if G > 1 and draw(st.booleans()):
            ks = tuple(draw(pick) for _ in range(G))
        else:
            k = draw(pick)
    return Case(x, w, mode, threshold, k, ks, segments, ramp, scale)


CPU_SETTINGS = settings(max_examples=1200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@CPU_SETTINGS
@given(cases())
def test_random_cases_match_reference(case):
    assert_close(run_case(CPU, case), case, exact_w=True)


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
    assert_matches(sess.run(None, feeds)[0], x, w, mode, threshold, k, exact_w=True)


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
    assert_matches(y, x, w, mode, threshold, k, exact_w=True)
    if m == 1 and dtype == np.float32:  # a kept NaN row reaches the output, as in the reference
        keep = np.flatnonzero(kept_mask(x, mode, threshold, k)[0])
        w[keep[len(keep) // 2], 7] = np.nan
        y = sess.run(None, feeds)[0]
        assert np.isnan(y[0, 7]) and np.isfinite(np.delete(y[0], 7)).all()


def check_kernel_paths(seed: int = 0) -> int:
    """Every CPU path against the reference on 2 threads: decode split-K (M <= 8, with and without the float32
    one-row path), the skip path (many rows, 2 % kept), the packed dense GEMM (many rows, a non-multiple of 8 of
    them, an odd number of 16-column strips), both dtypes and modes, each once plain and once packed (3 members
    with their own thresholds / ks and [G, K] scales, ramp 0.5). Returns the number of cases checked."""
    rng = np.random.default_rng(seed)
    n = 0
    for dtype in (np.float32, np.float16):
        for mode in ("threshold", "topk"):
            for m, K, N, keep in ((1, 700, 2100, 0.4), (5, 300, 517, 0.4), (123, 301, 517, 0.4), (40, 200, 260, 0.02), (17, 64, 48, 0.6)):
                x = rng.standard_normal((m, K)).astype(dtype)
                w = rng.standard_normal((K, N)).astype(dtype)
                threshold = float(np.quantile(np.abs(x.astype(np.float32)), 1 - keep))
                k = max(1, int(keep * K))
                assert_close(run_case(CPU, Case(x, w, mode, threshold, k)), Case(x, w, mode, threshold, k), exact_w=True)
                segments = (N // 2, N // 2 + N // 4, N)
                scale = rng.uniform(0.5, 2.0, (3, K)).astype(np.float32)
                packed = Case(x, w, mode, np.array([threshold, 2 * threshold, threshold / 2], np.float32) if mode == "threshold" else None,
                              None, (k, max(1, k // 2), min(K, 2 * k)) if mode == "topk" else None, segments, 0.5, scale)
                assert_close(run_case(CPU, packed), packed, exact_w=True)
                n += 2
    return n


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_simd_variant_matches_numpy(isa):
    """ACTTAIL_CPU_ISA caps the kernels' instruction set, so each variant runs here whatever the CPU picks by itself
    (a cap above what the CPU has falls back to the best it has)."""
    code = "import sys; sys.path.insert(0, 'tests'); import test_ops; print(test_ops.check_kernel_paths())"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACTTAIL_CPU_ISA": isa}, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "40"


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
    assert_matches(y, x, w, "threshold", 0.1, exact_w=True)


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
    assert_matches(y, x, w, "threshold", 0.1, exact_w=True)
    x[7, 9] = np.inf  # kept: Inf / NaN in row 7 only
    y = run_op(CPU, x, w, "threshold", threshold=0.1)
    assert not np.isfinite(y[7]).any() and np.isfinite(np.delete(y, 7, axis=0)).all()
    assert_matches(y, x, w, "threshold", 0.1, exact_w=True)


def test_fp16_accumulates_in_fp32():
    """2048 products of 1*1 plus a tiny term: an fp16 accumulator would stall at 2048."""
    K = 4097
    x = np.ones((1, K), np.float16)
    w = np.ones((K, 1), np.float16)
    y = run_op(CPU, x, w, "threshold", threshold=0.0)
    assert float(y[0, 0]) == 4096.0  # 4097 rounds to 4096 in fp16 only at the end


# --------------------------------------------------------------------------------------------
# the contract's newer parts: segments (packed members), ks / per-member thresholds, ramp, scale
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_packed_members_equal_separate_ops(dtype, mode, m):
    """q | k | v in one op with their own budgets give exactly the three separate ops' outputs."""
    rng = np.random.default_rng(m)
    K, widths = 96, (64, 16, 16)
    x = rng.standard_normal((m, K)).astype(dtype)
    ws = [rng.standard_normal((K, n)).astype(dtype) for n in widths]
    thresholds, ks = [0.3, 0.9, 1.4], [60, 20, 5]
    segments = tuple(np.cumsum(widths).tolist())
    packed = Case(x, np.concatenate(ws, axis=1), mode, np.array(thresholds, np.float32) if mode == "threshold" else None,
                  None, tuple(ks) if mode == "topk" else None, segments)
    y = run_case(CPU, packed)
    assert_close(y, packed, exact_w=True)
    parts = [run_op(CPU, x, w, mode, t, k) for w, t, k in zip(ws, thresholds, ks)]
    np.testing.assert_array_equal(y, np.concatenate(parts, axis=1))


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_ramp_keeps_the_zero_set_and_is_continuous(mode):
    """Same skipped channels as the hard mask (Inf rows of W stay out of Y), values scaled by the ramp factor."""
    K = 64
    x = np.linspace(-2.0, 2.0, K, dtype=np.float32)[None]
    w = np.eye(K, dtype=np.float32)
    w[np.abs(x[0]) <= 1.0, 0] = np.inf  # rows of dropped channels: must never be read
    hard = Case(x, w, mode, 1.0, 32 if mode == "topk" else None)
    soft = Case(x, w, mode, 1.0, 32 if mode == "topk" else None, ramp=0.5)
    y_hard, y_soft = run_case(CPU, hard), run_case(CPU, soft)
    assert_close(y_hard, hard, exact_w=True)
    assert_close(y_soft, soft, exact_w=True)
    assert np.isfinite(y_soft[0, 1:]).all() and np.array_equal(y_hard[0, 1:] != 0, y_soft[0, 1:] != 0)
    assert (np.abs(y_soft[0, 1:]) <= np.abs(y_hard[0, 1:])).all()


def test_ramp_factor_values():
    """threshold t = 1, ramp 0.5: f = min(1, (|x| - 1) / 0.5)."""
    x = np.array([[1.0, 1.25, 1.5, 2.0, -1.1, 0.9]], np.float32)
    y = run_case(CPU, Case(x, np.eye(6, dtype=np.float32), "threshold", 1.0, ramp=0.5))
    np.testing.assert_allclose(y, [[0.0, 1.25 * 0.5, 1.5, 2.0, -1.1 * 0.2, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_scale_ranks_by_weighted_scores(dtype):
    """Scores |x| * scale: a small x with a large scale wins; per-member scale rows ([G, K]) rank differently."""
    x = np.array([[4.0, 1.0, 2.0, 0.5]], dtype)
    w = np.concatenate([np.eye(4), np.eye(4)], axis=1).astype(dtype)
    scale = np.array([[1.0, 8.0, 1.0, 1.0], [1.0, 1.0, 1.0, 16.0]], np.float32)
    c = Case(x, w, "topk", None, 2, segments=(4, 8), scale=scale)
    y = run_case(CPU, c)
    assert_close(y, c, exact_w=True)
    np.testing.assert_array_equal(y, np.array([[4, 1, 0, 0, 4, 0, 0, 0.5]], dtype))
    t = Case(x, w, "threshold", np.array([3.0, 5.0], np.float32), segments=(4, 8), scale=scale)
    np.testing.assert_array_equal(run_case(CPU, t), np.array([[4, 1, 0, 0, 0, 0, 0, 0.5]], dtype))


def test_zero_scale_is_never_kept_in_topk():
    x = np.array([[3.0, 2.0, 1.0]], np.float32)
    c = Case(x, np.eye(3, dtype=np.float32), "topk", None, 3, scale=np.array([0.0, 1.0, 1.0], np.float32))
    np.testing.assert_array_equal(run_case(CPU, c), [[0.0, 2.0, 1.0]])


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


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "topk", "k": 1, "ks": [1]}, r"give either attribute k or ks, not both"),
        ({"mode": "topk", "ks": [1, 2], "segments": [2, 4, 6]}, r"attribute ks has 2 values but the node has 3 member"),
        ({"mode": "topk", "ks": [1, -2], "segments": [2, 4]}, r"attribute ks\[1\] must be >= 0, got -2"),
        ({"mode": "topk", "k": 1, "segments": [4, 4]}, r"segments must be strictly increasing positive column ends, got \[4, 4\]"),
        ({"mode": "topk", "k": 1, "segments": list(range(1, 18))}, r"segments has 17 members; at most 16"),
        ({"mode": "topk", "k": 1, "ramp": -1.0}, r"attribute ramp must be a finite number >= 0"),
        ({"mode": "topk", "k": 1, "ramp": float("inf")}, r"attribute ramp must be a finite number >= 0"),
    ],
)
def test_error_bad_contract_attributes_at_session_creation(kwargs, message):
    mode = kwargs.pop("mode")
    with pytest.raises(Exception, match=message):
        make_session(make_model(np.float32, mode, threshold_input=False, **kwargs))


def test_error_contract_inputs_at_run_time():
    x, w = np.ones((2, 5), np.float32), np.ones((5, 6), np.float32)
    sess = make_session(make_model(np.float32, "topk", ks=[1, 2], segments=[2, 5], threshold_input=False))
    with pytest.raises(Exception, match=r"attribute segments ends at 5 but W has N=6 columns; the last end must equal N"):
        _run(sess, X=x, W=w)
    sess = make_session(make_model(np.float32, "topk", ks=[1, 9], segments=[2, 6], threshold_input=False))
    with pytest.raises(Exception, match=r"attribute ks\[1\]=9 exceeds K=5"):
        _run(sess, X=x, W=w)
    sess = make_session(make_model(np.float32, "threshold", segments=[2, 4, 6]))
    with pytest.raises(Exception, match=r"thresholds must hold 1 or 3 float32 values \(one per member\), got 2"):
        _run(sess, X=x, W=w, t=np.zeros(2, np.float32))
    sess = make_session(make_model(np.float32, "topk", k=1, segments=[2, 6], threshold_input=False, scale_input=True))
    with pytest.raises(Exception, match=r"scale must be float32 \[K\] or \[G, K\] = \[2, 5\] \(G members\), got \[3, 5\]"):
        _run(sess, X=x, W=w, scale=np.ones((3, 5), np.float32))
    with pytest.raises(Exception, match=r"got \[4\]"):
        _run(sess, X=x, W=w, scale=np.ones(4, np.float32))


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


def test_library_json_describes_the_build():
    info = json.loads((Path(ops.get_library_path()).parent / "libacttail_ops.json").read_text())
    assert info["ops"][0] == "SparseMatMul" and info["cpu_isa"] == ["avx512", "avx2", "scalar"]
    assert isinstance(info["cuda"], bool) and (info["cuda_archs"] != []) == info["cuda"]
    assert info["version"] == __import__("acttail_export").__version__


def test_unknown_cpu_isa_fails_registration():
    code = "from acttail_export import ops; ops.session_options()"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ACTTAIL_CPU_ISA": "sse9"}, cwd=str(REPO))
    assert proc.returncode != 0 and "ACTTAIL_CPU_ISA must be avx512, avx2 or scalar, got 'sse9'" in proc.stderr


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
    except Exception:  # noqa: BLE001 (onnxruntime-gpu without a usable device)
        placed = False
    assert ops.cuda_available() is placed
