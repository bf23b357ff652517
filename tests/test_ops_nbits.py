"""com.acttail::SparseMatMulNBits (4-bit weights) on the CPU execution provider against acttail_export.reference.

The helpers here (graph builder, expected values, comparison, case generator) are shared with
``test_ops_nbits_cuda.py`` (the same properties on the CUDA execution provider) and ``test_ops_nbits_harness.py``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from test_ops import log_spread

from acttail_export import ops
from acttail_export import reference as ref

CPU = "CPUExecutionProvider"
OP = "SparseMatMulNBits"
FP16_MAX = 65504.0
# Error allowed relative to sum_k |v_k| (|s_bn| q_kn + |o_bn|), the magnitude of the terms the kernels add:
# float32: the sums of <= a few thousand float32 products (relative error <= n * 2^-24 in the worst case,
# ~sqrt(n) * 2^-24 typically) and the ramp factor's few-ulp error; float16: the output's rounding
# (2^-11 = 4.9e-4 of |y|, the |ref| term) plus, on the CUDA prefill path, W and mask(X) rounded to float16
# before the float32-accumulating GEMM (2 x 2^-11 of the bound).
TOL = {np.float32: 2e-5, np.float16: 2e-3}
# Paths that keep W and the kept values exact in float32 (the CPU kernel; exact_w=True): only the float32 sums (2e-5 of
# the same scale) and, in float16, Y's rounding (2^-11 of |y|; float32 stays TOL). Every CPU test passes with it on AVX-512, AVX2 and scalar
# paths (ACTTAIL_CPU_ISA subprocesses below); measured (ACTTAIL_TOL_SPREAD, test_ops.log_spread), the error beyond Y's
# rounding is at most 9.7e-8 of the term sum in float32 and 1.5e-8 in float16 over the 641 exact comparisons of this
# file, ACTTAIL_CPU_ISA unset / avx2 / scalar (the margin is 200x), and unlike TOL it fails when one kept row is lost
# (test_exact_tolerance_catches_a_lost_row).
EXACT_TOL, ROUNDING = 2e-5, {np.float32: 2e-5, np.float16: 2.0**-11}


# --------------------------------------------------------------------------------------------
# one problem, its graph and session
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """Inputs and attributes of one SparseMatMulNBits call."""

    x: np.ndarray
    q: np.ndarray  # unpacked uint8 [K, N], values 0..15
    scales: np.ndarray
    offsets: np.ndarray
    block: int
    mode: str
    segments: list[int] | None = None
    ks: list[int] | None = None
    thresholds: np.ndarray | None = None  # float32 [], [1] or [G]
    scale: np.ndarray | None = None  # float32 [K] or [G, K]
    ramp: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return self.q.shape[0]

    @property
    def N(self) -> int:
        return self.q.shape[1]

    @property
    def members(self) -> int:
        return len(self.segments) if self.segments else 1

    def packed(self) -> np.ndarray:
        return ref.pack_nibbles(self.q) if self.K else np.zeros((0, (self.N + 1) // 2), np.uint8)

    def feeds(self) -> dict:
        f = {"X": self.x, "Q": self.packed(), "scales": self.scales, "offsets": self.offsets}
        if self.mode == "threshold":
            f["thresholds"] = self.thresholds
        if self.scale is not None:
            f["scale"] = self.scale
        return f

    def key(self) -> tuple:
        """Everything the graph depends on (attributes, which optional inputs exist, dtype)."""
        return (self.x.dtype.name, self.K, self.N, self.block, self.mode, tuple(self.segments or ()), tuple(self.ks or ()),
                self.ramp, self.mode == "threshold", self.scale is not None)


def make_model(dtype, K: int, N: int, block: int, mode: str | None, *, k: int | None = None, ks=None, segments=None, ramp: float = 0.0,
               thresholds: bool = True, scale: bool = False, bits: int | None = None, extra: dict | None = None) -> bytes:
    """One SparseMatMulNBits node; X has any rank; optional thresholds / scale inputs (omitted ones are empty names)."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    attrs = {"K": K, "N": N, "block_size": block} | ({"bits": bits} if bits is not None else {}) | (extra or {})
    for name, value in (("mode", mode), ("k", k), ("ks", ks), ("segments", segments)):
        if value is not None:
            attrs[name] = value
    if ramp:
        attrs["ramp"] = ramp
    names = ["X", "Q", "scales", "offsets", "thresholds" if thresholds else "", "scale" if scale else ""]
    while names[-1] == "":
        names.pop()
    node = helper.make_node(OP, names, ["Y"], domain=ops.DOMAIN, name="nbits0", **attrs)
    inputs = [helper.make_tensor_value_info("X", elem, None), helper.make_tensor_value_info("Q", TensorProto.UINT8, None),
              helper.make_tensor_value_info("scales", elem, None), helper.make_tensor_value_info("offsets", elem, None)]
    if thresholds:
        inputs.append(helper.make_tensor_value_info("thresholds", TensorProto.FLOAT, None))
    if scale:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, None))
    graph = helper.make_graph([node], "nbits", inputs, [helper.make_tensor_value_info("Y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    model.ir_version = 8
    return model.SerializeToString()


def make_session(model: bytes, provider: str = CPU, threads: int = 2, provider_options: dict | None = None) -> ort.InferenceSession:
    options = ops.session_options()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    providers = [(provider, provider_options)] if provider_options else [provider]
    return ort.InferenceSession(model, options, providers=providers)


@functools.lru_cache(maxsize=256)
def cached_session(provider: str, key: tuple) -> ort.InferenceSession:
    dtype_name, K, N, block, mode, segments, ks, ramp, thresholds, scale = key
    model = make_model(np.dtype(dtype_name).type, K, N, block, mode, ks=list(ks) or None, segments=list(segments) or None, ramp=ramp,
                       thresholds=thresholds, scale=scale)
    return make_session(model, provider)


def run_case(case: Case, provider: str = CPU) -> np.ndarray:
    return cached_session(provider, case.key()).run(None, case.feeds())[0]


# --------------------------------------------------------------------------------------------
# expected values and comparison
# --------------------------------------------------------------------------------------------
def members(case: Case) -> list[ref.Member]:
    out = []
    for g in range(case.members):
        thr = None
        if case.mode == "threshold":
            t = np.asarray(case.thresholds, np.float32).reshape(-1)
            thr = float(t[g] if t.size > 1 else t[0])
        scale = None if case.scale is None else (case.scale if case.scale.ndim == 1 else case.scale[g])
        out.append(ref.Member(threshold=thr, k=None if case.ks is None else case.ks[g], scale=scale))
    return out


def expected(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(Y, error scale) in float64, member by member from reference.sparse_matmul on the dequantized W; the error
    scale is sum_k |v_k| (|s| q + |o|) per output over the kept channels."""
    lead = case.x.shape[:-1]
    if case.K == 0:  # nothing to keep (the reference cannot reshape an empty last axis)
        return np.zeros(lead + (case.N,)), np.zeros(lead + (case.N,))
    x2 = case.x.reshape(-1, case.K)
    y = np.zeros((x2.shape[0], case.N))
    bound = np.zeros_like(y)
    start = 0
    with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN scales of the tests that put them there
        w = ref.dequantize_blocks(case.q, case.scales, case.offsets, case.block)
        rows = np.arange(case.K) // case.block
        mag = np.abs(case.scales.astype(np.float64))[rows] * case.q + np.abs(case.offsets.astype(np.float64))[rows]
        for member, end in zip(members(case), case.segments or [case.N]):
            y[:, start:end], _ = ref.sparse_matmul(x2, w[:, start:end], case.mode, [member], ramp=case.ramp)
            values, _ = ref.member_values(x2, case.mode, member, case.ramp)
            part = mag[:, start:end]
            bound[:, start:end] = np.abs(values) @ np.where(np.isfinite(part), part, 0.0)
            start = end
    return y.reshape(lead + (case.N,)), bound.reshape(lead + (case.N,))


def assert_matches(y: np.ndarray, case: Case, exact_w: bool = False) -> None:
    """Finite outputs within the tolerance (TOL; exact_w: EXACT_TOL / ROUNDING, for paths that keep W in float32);
    non-finite exactly where the reference is non-finite (Inf or NaN: the kernels sum s * sum(v q) + o * sum(v) per
    block, which may give NaN where the dequantized product gives Inf)."""
    ref_y, bound = expected(case)
    dtype = case.x.dtype.type
    assert y.dtype == case.x.dtype and y.shape == ref_y.shape, (y.dtype, y.shape, ref_y.shape)
    yf = y.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ref_y.astype(dtype).astype(np.float64)  # an exact kernel's result after rounding to T
        scaled = EXACT_TOL * bound + ROUNDING[dtype] * np.abs(ref_y) if exact_w else TOL[dtype] * (bound + np.abs(ref_y))
        tol = scaled + (1e-7 if dtype == np.float16 else 1e-30)
        err = np.abs(yf - ref_y)
    near = np.zeros(ref_y.shape, bool)
    if dtype == np.float16:  # |ref| at the float16 overflow edge may round either way after float32 accumulation
        near = np.isfinite(ref_y) & (np.abs(ref_y) > FP16_MAX * (1 - TOL[dtype])) & (np.abs(ref_y) < 65520 * (1 + TOL[dtype]))
        ok = (np.isinf(yf) & (np.sign(yf) == np.sign(ref_y))) | (err <= tol)
        assert ok[near].all(), "wrong result at the float16 overflow edge"
    regular = ~near
    finite_want = np.isfinite(want)
    assert np.array_equal(np.isfinite(yf)[regular], finite_want[regular]), (
        f"Inf/NaN placement differs at {np.argwhere(np.isfinite(yf) != finite_want)[:5].tolist()}")
    fin = regular & finite_want
    bad = fin & ~(err <= tol)
    assert not bad.any(), f"max error {err[bad].max():.3g} over tolerance {tol[bad].min():.3g} at {np.argwhere(bad)[:5].tolist()}"
    if exact_w:  # passing comparisons only
        log_spread(err, ref_y, bound, dtype, fin, 1e-7)


# --------------------------------------------------------------------------------------------
# random cases
# --------------------------------------------------------------------------------------------
def random_weights(rng, K: int, N: int, block: int, dtype, kind: str = "asym"):
    """q, scales, offsets like a quantizer's output: W = s q + o spans [min, max] of each block and column."""
    q = rng.integers(0, 16, size=(K, N)).astype(np.uint8)
    nb = (K + block - 1) // block
    lo = rng.uniform(-0.6, 0.0, size=(nb, N))
    hi = rng.uniform(0.0, 0.6, size=(nb, N))
    scales = (hi - lo) / 15
    offsets = lo
    if kind == "symmetric":
        offsets = -8 * scales
    elif kind == "signed":  # negative scales: a quantizer never writes them, the op must not care
        scales = scales * rng.choice([-1.0, 1.0], size=scales.shape)
    return q, scales.astype(dtype), offsets.astype(dtype)


@st.composite
def cases(draw, max_m: int = 17, max_k: int = 140, max_n: int = 70):
    """A random Case: shapes (K < B, K % B != 0, odd N, 0-size), blocks 16..128, modes, members, per-member rules,
    score scales, ramp, special values in x."""
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    block = draw(st.sampled_from([16, 32, 64, 128]))
    m = draw(st.integers(0, max_m))
    K = draw(st.sampled_from([0, 1, 7, block - 1, block, block + 3, draw(st.integers(1, max_k))]))
    N = draw(st.integers(1, max_n))
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    if rank == 1:
        m, lead = 1, ()
    elif rank == 2:
        lead = (m,)
    else:
        lead = (2, m // 2) if m % 2 == 0 and draw(st.booleans()) else (1, m)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mag = draw(st.sampled_from([1.0, 1e-3, 30.0]))
    flat = rng.standard_normal((m, K)) * mag
    special = draw(st.sampled_from(["none", "none", "zeros", "nan", "inf", "huge", "ties", "mixed"]))
    if flat.size:
        pick = rng.random(flat.shape)
        if special == "zeros":
            flat[pick < 0.5] = 0.0
            flat[0] = 0.0
        elif special == "nan":
            flat[pick < 0.2] = np.nan
        elif special == "inf":
            flat[pick < 0.03] = np.inf
            flat[pick > 0.98] = -np.inf
        elif special == "huge":
            flat[pick < 0.3] *= 3e4 if dtype == np.float16 else 1e30
        elif special == "ties":
            flat[:] = np.sign(flat) * np.round(np.abs(flat) * 2) / 2
        elif special == "mixed":
            flat[pick < 0.1] = np.nan
            flat[pick > 0.9] = 0.0
    with np.errstate(over="ignore"):
        x = flat.reshape(lead + (K,)).astype(dtype)
    q, scales, offsets = random_weights(rng, K, N, block, dtype, draw(st.sampled_from(["asym", "asym", "symmetric", "signed"])))
    G = draw(st.sampled_from([1, 1, 2, 3])) if N >= 3 else 1
    segments = sorted(rng.choice(np.arange(1, N), size=G - 1, replace=False).tolist()) + [N] if G > 1 else None
    if segments is None and draw(st.booleans()):
        segments = [N]  # the explicit one-member form
    G = len(segments) if segments else 1
    mode = draw(st.sampled_from(["threshold", "topk"]))
    ramp = draw(st.sampled_from([0.0, 0.0, 0.25, 1.0]))
    scale_kind = draw(st.sampled_from(["none", "none", "shared", "member"]))
    scale = None
    if scale_kind != "none":
        scale = rng.uniform(0.5, 2.0, size=(K,) if scale_kind == "shared" else (G, K)).astype(np.float32)
        if scale.size and draw(st.booleans()):
            scale[..., : max(1, K // 5)] = 0.0  # zero scores with x != 0: ranked with zeros, kept only by the tie rule
    thresholds = ks = None
    if mode == "threshold":
        finite = np.abs(x.astype(np.float64))[np.isfinite(x)]
        per = G if G > 1 and draw(st.booleans()) else 1
        values = []
        for _ in range(per):
            kind = draw(st.sampled_from(["zero", "inf", "quantile", "quantile", "negative", "nan", "exact"]))
            if kind == "quantile" and finite.size:
                values.append(float(np.quantile(finite, draw(st.floats(0.0, 1.0)))))
            elif kind == "exact" and finite.size:
                values.append(float(finite[0]))  # |x| == t is dropped
            else:
                values.append({"zero": 0.0, "inf": np.inf, "negative": -1.0, "nan": np.nan}.get(kind, 0.5))
        shape = draw(st.sampled_from([(), (1,)])) if per == 1 else (G,)
        thresholds = np.array(values, np.float32).reshape(shape)
    else:
        ks = [int(draw(st.sampled_from([0, K, K // 2, min(K, 1), draw(st.integers(0, K))]))) for _ in range(G)]
        if draw(st.booleans()):
            ks = [ks[0]] * G
    return Case(x, q, scales, offsets, block, mode, segments, ks, thresholds, scale, ramp)


CPU_SETTINGS = settings(max_examples=1200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@CPU_SETTINGS
@given(cases())
def test_random_cases_match_reference(case):
    assert_matches(run_case(case), case, exact_w=True)


# --------------------------------------------------------------------------------------------
# paths and shapes spelled out
# --------------------------------------------------------------------------------------------
def llm_case(rng, m: int, K: int, N: int, block: int, dtype, mode: str, keep: float = 0.4, segments=None) -> Case:
    x = rng.standard_normal((m, K)).astype(dtype)
    q, scales, offsets = random_weights(rng, K, N, block, dtype)
    G = len(segments) if segments else 1
    if mode == "threshold":
        t = np.array(np.quantile(np.abs(x.astype(np.float32)), 1 - keep), np.float32)
        return Case(x, q, scales, offsets, block, mode, segments, None, t)
    return Case(x, q, scales, offsets, block, mode, segments, [max(1, int(keep * K))] * G)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("K", [576, 4096])
def test_exact_tolerance_catches_a_lost_row(dtype, K):
    """Positive control of the CPU tests' tolerance: the op's decode result passes it, and the same result with one
    kept input row's contribution taken away (a kernel that skipped a kept row) fails it, at SmolLM2's and LLaMA's
    widths with half the rows kept."""
    rng = np.random.default_rng(K)
    case = llm_case(rng, 1, K, 512, 32, dtype, "threshold", keep=0.5)
    y = run_case(case)
    assert_matches(y, case, exact_w=True)
    kept = np.flatnonzero(np.abs(case.x[0].astype(np.float32)) > case.thresholds)
    k = kept[len(kept) // 2]
    w_k = ref.dequantize_blocks(case.q, case.scales, case.offsets, case.block)[k]
    lost = (y.astype(np.float64) - float(case.x[0, k]) * w_k).astype(dtype)
    with pytest.raises(AssertionError, match="over tolerance"):
        assert_matches(lost, case, exact_w=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m,K,N,block", [(1, 2048, 1000, 32), (1, 1536, 576, 64), (3, 700, 2100, 128), (8, 300, 517, 16),
                                         (40, 301, 517, 32), (130, 200, 136, 64), (300, 70, 40, 16)])
def test_multithreaded_paths(dtype, mode, m, K, N, block):
    """Decode split-K (M <= 8: up to 16 K-parts, partial sums added) and the row-block path, on 2 threads; 40 rows and
    more through the dense prefill (300: two tiles of rows)."""
    case = llm_case(np.random.default_rng(m * 7 + K), m, K, N, block, dtype, mode)
    assert_matches(run_case(case), case, exact_w=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("segments", [[77, 207, 302], [64, 160, 302], [2, 302], [1, 1301]])
def test_one_row_tiles_at_any_member_start(dtype, segments):
    """One row of X on AVX2 takes 64- and 32-column register tiles from a member's first column when it is even (a byte
    of Q; an odd first column alone before them) and column-by-column code for the last columns: members starting at
    odd and even columns, widths that are and are not multiples of 32, one wider than a 1024-column chunk."""
    case = llm_case(np.random.default_rng(sum(segments)), 1, 300, segments[-1], 32, dtype, "threshold", segments=segments)
    assert_matches(run_case(case), case, exact_w=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("segments", [[77, 207, 302], [64, 160, 302], [1, 300]])
def test_dense_prefill_strips_at_any_member_start(dtype, segments):
    """40 rows take the dense prefill, whose panels are dequantized 16 columns at a time: strips of a member starting
    at an even column in vectors (8 bytes of Q), at an odd one or shorter than 16 column by column."""
    case = llm_case(np.random.default_rng(sum(segments) + 1), 40, 300, segments[-1], 32, dtype, "threshold", keep=0.6,
                    segments=segments)
    assert_matches(run_case(case), case, exact_w=True)


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_dense_prefill_vector_and_scalar_strips_agree_to_the_bit(scale_dtype):
    """The same weights as one member (every strip from an even column: dequantized in vectors on AVX2) and as a first
    column plus a member from column 1 (odd starts: column by column), one shared rule: the panel GEMM sums each column
    alike wherever it sits in a strip, so Y is the same to the bit only if both dequantizations round alike (a multiply
    and an add, never an FMA)."""
    rng = np.random.default_rng(11)
    N = 300
    case = llm_case(rng, 40, 256, N, 32, np.float32, "threshold", keep=0.6)
    case.scales, case.offsets = case.scales.astype(scale_dtype), case.offsets.astype(scale_dtype)
    if scale_dtype == np.float16:  # float16 X with these weights: the op's float16 instance
        case.x = case.x.astype(np.float16)
    one = run_case(case)
    split = Case(case.x, case.q, case.scales, case.offsets, case.block, case.mode, [1, N], None, case.thresholds)
    np.testing.assert_array_equal(run_case(split), one)


def check_paths(seed: int = 0) -> int:
    """Decode split-K, row blocks, members, both dtypes and modes on 2 threads; returns the number of cases."""
    rng = np.random.default_rng(seed)
    n = 0
    for dtype in (np.float32, np.float16):
        for mode in ("threshold", "topk"):
            for m, K, N, block in ((1, 2048, 1000, 32), (5, 300, 517, 16), (40, 301, 130, 64)):
                case = llm_case(rng, m, K, N, block, dtype, mode, segments=[N // 3, N] if m == 5 else None)
                assert_matches(run_case(case), case, exact_w=True)
                n += 1
    return n


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_every_simd_variant_matches_reference(isa):
    """ACTTAIL_CPU_ISA caps the kernels' instruction set (read once per process), so each variant runs here."""
    code = "import sys; sys.path.insert(0, 'tests'); import test_ops_nbits; print(test_ops_nbits.check_paths())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "ACTTAIL_CPU_ISA": isa}, cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "12"


def test_per_row_path_matches_reference(monkeypatch):
    """ACTTAIL_CPU_ROW_TILES=0 (read per call) sends one row of X to the per-row path that more rows take; it stays
    exact too (it is the A/B baseline of docs/benchmarks.md's CPU 4-bit rows)."""
    monkeypatch.setenv("ACTTAIL_CPU_ROW_TILES", "0")
    assert check_paths(seed=1) == 12


def test_exact_prefill_path_matches_reference(monkeypatch):
    """ACTTAIL_CPU_DENSE_PREFILL=0 (read per call) keeps calls of 16 rows or more on the exact row-block path, which the
    dense prefill would otherwise take whenever enough entries are kept."""
    monkeypatch.setenv("ACTTAIL_CPU_DENSE_PREFILL", "0")
    assert check_paths(seed=2) == 12


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_packed_members_keep_their_own_rule(dtype):
    """Three members (q/k/v-like), thresholds [G] and per-member score scales [G, K]; also ks per member, ramp."""
    rng = np.random.default_rng(3)
    K, N, segments = 96, 80, [32, 56, 80]
    x = rng.standard_normal((5, K)).astype(dtype)
    q, scales, offsets = random_weights(rng, K, N, 32, dtype)
    scale = rng.uniform(0.5, 2.0, (3, K)).astype(np.float32)
    for case in (Case(x, q, scales, offsets, 32, "threshold", segments, None, np.array([0.2, 0.9, 1.5], np.float32), scale),
                 Case(x, q, scales, offsets, 32, "topk", segments, [10, 40, 90], None, scale, ramp=0.5),
                 Case(x, q, scales, offsets, 32, "topk", segments, [10, 40, 90])):
        y = run_case(case)
        assert_matches(y, case, exact_w=True)
    # each member alone gives the same columns as the packed node
    for g, (lo, hi) in enumerate(zip([0, 32, 56], segments)):
        single = Case(x, q[:, lo:hi], scales[:, lo:hi], offsets[:, lo:hi], 32, "topk", None, [[10, 40, 90][g]])
        np.testing.assert_array_equal(run_case(single), y[:, lo:hi])


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 3, 12, 40])
def test_skipped_blocks_never_reach_y(mode, m):
    """Inf/NaN scales and offsets of a block whose channels no row keeps (zeros there) never reach Y, nor do its rows
    (at 40 rows through the dense prefill, whose non-finite result sends the call to the exact path)."""
    rng = np.random.default_rng(m)
    K, N, B = 96, 40, 16
    x = rng.standard_normal((m, K)).astype(np.float32)
    x[:, 16:32] = 0.0  # block 1: no row keeps a channel
    q, scales, offsets = random_weights(rng, K, N, B, np.float32)
    scales[1, ::2], scales[1, 1::2], offsets[1, ::3] = np.inf, np.nan, -np.inf
    case = Case(x, q, scales, offsets, B, mode, None, [50] if mode == "topk" else None,
                np.array(0.1, np.float32) if mode == "threshold" else None)
    y = run_case(case)
    assert np.isfinite(y).all()
    assert_matches(y, case, exact_w=True)
    x[0, 20] = 3.0  # now row 0 keeps a channel of block 1: its columns become non-finite, the other rows stay exact
    y = run_case(case)
    assert not np.isfinite(y[0]).any() and np.isfinite(y[1:]).all()
    assert_matches(y, case, exact_w=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_semantics_spelled_out(dtype):
    """threshold is strict, NaN never kept (also when k = K), zeros never multiplied, ties: lower index first."""
    K = N = 8
    q = np.eye(K, dtype=np.uint8)  # W = s q + o = identity with s = 1, o = 0
    ones, zeros = np.ones((1, N), dtype), np.zeros((1, N), dtype)
    x = np.array([[0.5, -0.5, 0.75, np.nan, -2.0, 0.0, 1.0, 0.25]], dtype)
    thr = Case(x, q, ones, zeros, 16, "threshold", thresholds=np.array(0.5, np.float32))
    np.testing.assert_array_equal(run_case(thr), np.array([[0, 0, 0.75, 0, -2.0, 0, 1.0, 0]], dtype))
    thr.thresholds = np.array(-1.0, np.float32)
    np.testing.assert_array_equal(run_case(thr), np.nan_to_num(x, nan=0.0))
    topk = Case(x, q, ones, zeros, 16, "topk", ks=[8])
    np.testing.assert_array_equal(run_case(topk), np.nan_to_num(x, nan=0.0))  # the NaN is ranked but never kept
    topk.x = np.ones((1, K), dtype)
    topk.ks = [3]
    np.testing.assert_array_equal(run_case(topk), np.array([[1, 1, 1, 0, 0, 0, 0, 0]], dtype))


def test_fp16_accumulates_in_fp32():
    """4097 products of 1 * 1: a float16 accumulator would stall at 2048; float32 gives 4097, rounded once to 4096."""
    K = 4097
    x = np.ones((1, K), np.float16)
    q = np.ones((K, 2), np.uint8)
    nb = (K + 31) // 32
    case = Case(x, q, np.ones((nb, 2), np.float16), np.zeros((nb, 2), np.float16), 32, "threshold",
                thresholds=np.array(0.0, np.float32))
    assert (run_case(case) == 4096.0).all()


def test_zero_sizes():
    rng = np.random.default_rng(0)
    q, scales, offsets = random_weights(rng, 20, 6, 16, np.float32)
    empty = Case(np.zeros((0, 20), np.float32), q, scales, offsets, 16, "topk", ks=[3])
    assert run_case(empty).shape == (0, 6)
    q0, s0, o0 = random_weights(rng, 0, 6, 16, np.float32)
    for mode in ("threshold", "topk"):
        case = Case(np.zeros((3, 0), np.float32), q0, s0, o0, 16, mode, ks=[0] if mode == "topk" else None,
                    thresholds=np.array(0.0, np.float32) if mode == "threshold" else None)
        y = run_case(case)
        assert y.shape == (3, 6) and not y.any()


@pytest.mark.parametrize("m", [4, 40])
def test_kept_inf_in_x_makes_its_row_nonfinite(m):
    """Only the row that keeps an Inf is non-finite (at 40 rows the dense prefill's result is, and the exact path reruns)."""
    rng = np.random.default_rng(4)
    case = llm_case(rng, m, 64, 24, 16, np.float32, "threshold", keep=0.5)
    case.x[2, 5] = np.inf
    y = run_case(case)
    assert not np.isfinite(y[2]).any() and np.isfinite(np.delete(y, 2, axis=0)).all()
    assert_matches(y, case, exact_w=True)


# --------------------------------------------------------------------------------------------
# errors: one-line ORT statuses naming the node and the fix
# --------------------------------------------------------------------------------------------
def _session(**kw):
    base = {"dtype": np.float32, "K": 20, "N": 6, "block": 16, "mode": "topk", "k": 3, "thresholds": False}
    base.update(kw)
    dtype, K, N, block, mode = (base.pop(n) for n in ("dtype", "K", "N", "block", "mode"))
    return make_session(make_model(dtype, K, N, block, mode, **base))


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": None}, r"SparseMatMulNBits node 'nbits0': attribute 'mode' is required"),
    ({"mode": "median"}, r'attribute mode must be "threshold" or "topk", got "median"'),
    ({"block": 24}, r"block_size must be a power of two >= 16, got 24"),
    ({"block": 8}, r"block_size must be a power of two >= 16, got 8"),
    ({"bits": 8}, r"attribute bits must be 4 .*got 8"),
    ({"k": None}, r"topk mode needs the int attribute 'k' \(channels kept per row\) or 'ks'"),
    ({"k": 21}, r"attribute k=21 exceeds K=20"),
    ({"k": -1}, r"attribute k must be >= 0, got -1"),
    ({"k": None, "ks": [2, 3], "segments": [2, 4, 6]}, r"attribute ks has 2 values but the node has 3 member\(s\)"),
    ({"ks": [2]}, r"give either attribute k or ks, not both"),
    ({"segments": [4, 3, 6]}, r"segments must be strictly increasing positive column ends, got \[4, 3, 6\]"),
    ({"segments": [2, 5]}, r"attribute segments ends at 5 but W has N=6 columns"),
    ({"ramp": -0.5}, r"ramp must be a finite number >= 0"),
    ({"mode": "threshold", "k": None}, r"threshold mode needs a 5th input \(float32 thresholds"),
    ({"extra": {"density": 1.5}}, r"attribute density \(the expected fraction of input channels kept\) must be in \[0, 1\], got 1\.5"),
    ({"extra": {"density": -0.1}}, r"attribute density .* must be in \[0, 1\], got -0\.1"),
])
def test_bad_attributes_fail_at_session_creation(kwargs, message):
    with pytest.raises(Exception, match=message):
        _session(**kwargs)


def test_density_attribute_does_not_change_results():
    """density (the expected kept fraction) only picks a CUDA decode loop: on CPU the outputs are bit for bit those of the
    same node without it."""
    rng = np.random.default_rng(9)
    for dtype in (np.float32, np.float16):
        case = llm_case(rng, 3, 96, 40, 32, dtype, "threshold", keep=0.6)
        feeds = case.feeds()
        want = run_case(case)
        with_density = make_session(make_model(dtype, 96, 40, 32, "threshold", extra={"density": 0.6}))
        np.testing.assert_array_equal(with_density.run(None, feeds)[0], want)


def test_missing_required_int_attributes():
    model = make_model(np.float32, 20, 6, 16, "topk", k=3, thresholds=False)
    import onnx

    proto = onnx.load_from_string(model)
    del proto.graph.node[0].attribute[:]
    proto.graph.node[0].attribute.extend([helper.make_attribute("mode", "topk"), helper.make_attribute("k", 3)])
    with pytest.raises(Exception, match=r"the int attribute 'K' \(input features\) is required"):
        make_session(proto.SerializeToString())


def test_bad_shapes_fail_at_run():
    rng = np.random.default_rng(1)
    q, scales, offsets = random_weights(rng, 20, 6, 16, np.float32)
    good = Case(rng.standard_normal((2, 20)).astype(np.float32), q, scales, offsets, 16, "threshold", thresholds=np.array(0.5, np.float32))
    sess = cached_session(CPU, good.key())

    def run(**over):
        return sess.run(None, good.feeds() | over)

    with pytest.raises(Exception, match=r"last dimension of X \(19\) must equal the attribute K=20"):
        run(X=np.zeros((2, 19), np.float32))
    with pytest.raises(Exception, match=r"X must have rank >= 1"):
        run(X=np.array(1.0, np.float32))
    with pytest.raises(Exception, match=r"Q must be uint8 \[20, 3\] \(\[K, ceil\(N/2\)\].*got \[20, 6\]"):
        run(Q=np.zeros((20, 6), np.uint8))
    with pytest.raises(Exception, match=r"scales must be \[2, 6\] \(\[ceil\(K/block_size\), N\]\), got \[1, 6\]"):
        run(scales=np.zeros((1, 6), np.float32))
    with pytest.raises(Exception, match=r"offsets must be \[2, 6\]"):
        run(offsets=np.zeros((2, 5), np.float32))
    with pytest.raises(Exception, match=r"threshold must hold exactly one float32 value, got 2"):
        run(thresholds=np.zeros(2, np.float32))
    with pytest.raises(Exception, match=r"(?i)type"):
        run(Q=np.zeros((20, 3), np.int8))
    scaled = Case(good.x, q, scales, offsets, 16, "topk", ks=[4], scale=np.ones(20, np.float32))
    with pytest.raises(Exception, match=r"scale must be float32 \[K\] or \[G, K\] = \[1, 20\] \(G members\), got \[19\]"):
        cached_session(CPU, scaled.key()).run(None, scaled.feeds() | {"scale": np.ones(19, np.float32)})


def test_fp16_fp32_mismatch_is_a_type_error():
    rng = np.random.default_rng(2)
    q, scales, offsets = random_weights(rng, 20, 6, 16, np.float16)
    case = Case(rng.standard_normal((1, 20)).astype(np.float16), q, scales, offsets, 16, "topk", ks=[3])
    with pytest.raises(Exception, match=r"(?i)type"):
        cached_session(CPU, case.key()).run(None, case.feeds() | {"scales": scales.astype(np.float32)})


def test_registered_next_to_the_dense_op():
    """One library, one domain: both ops run in one session."""
    rng = np.random.default_rng(5)
    case = llm_case(rng, 2, 40, 12, 16, np.float32, "topk")
    dense_node = helper.make_node("SparseMatMul", ["X", "W"], ["Y2"], domain=ops.DOMAIN, mode="topk", k=case.ks[0])
    model = make_model(np.float32, 40, 12, 16, "topk", k=case.ks[0], thresholds=False)
    import onnx

    proto = onnx.load_from_string(model)
    proto.graph.node.append(dense_node)
    proto.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, None))
    proto.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None))
    w = ref.dequantize_blocks(case.q, case.scales, case.offsets, 16).astype(np.float32)
    y, y2 = make_session(proto.SerializeToString()).run(None, case.feeds() | {"W": w})
    np.testing.assert_allclose(y, y2, rtol=1e-4, atol=1e-5)
