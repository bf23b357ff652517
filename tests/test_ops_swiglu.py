"""``activation="swiglu"`` of ``com.acttail::SparseMatMul`` and ``SparseMatMulNBits`` on the CPU execution provider,
against :func:`acttail_export.reference.sparse_matmul` / :func:`~acttail_export.reference.sparse_matmul_nbits` called
with ``activation="swiglu"``.

X holds ``[gate | up]`` (last dimension 2K); the op's input is ``silu(gate) * up``, computed per element in float32 and
rounded once to T (:func:`acttail_export.reference.swiglu`), then the usual rule (threshold / top-k, members, score
scale, ramp) and product.

Numerics: the kernel's float32 ``exp`` (libm's ``expf``) and numpy's float32 ``exp`` differ by an ulp on a good part of
the inputs (numpy's vectorized float32 exp is not correctly rounded), which moves an activated value by an ulp of T
now and then. That changes which channels are kept only for a value at the cut, so every case here cuts inside a wide
gap: a threshold at the midpoint of two sorted scores more than ``GAP`` apart (relative), a top-k ``k`` where the k-th
and (k+1)-th largest keys of every row are more than ``GAP`` apart. Off the cut, an ulp of one input is far inside the
existing op tests' tolerances, copied below with their reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import test_ops
import test_ops_nbits
from onnx import helper

from acttail_export import reference as ref

CPU = "CPUExecutionProvider"
FP16_MAX = 65504.0
# SparseMatMul (tests/test_ops.py): relative to the bound sum |v_kept| |w| + |y|: float32 accumulation of up to 67 (CPU)
# / 20000 (CUDA) products, measured well under these (float32 ~1e-6, float16 ~5e-4: one rounding of the output and, on
# the cuBLAS prefill path, of each masked value).
TOL = {np.float32: 1e-5, np.float16: 2e-3}
# SparseMatMulNBits (tests/test_ops_nbits.py): relative to sum_k |v_k| (|s_bn| q_kn + |o_bn|), the magnitude of the terms
# the kernels add: float32: sums of <= a few thousand float32 products (relative error <= n * 2^-24 worst case,
# ~sqrt(n) * 2^-24 typically) and the ramp factor's few-ulp error; float16: the output's rounding (2^-11 of |y|) plus,
# on the CUDA prefill path, W and mask(X) rounded to float16 before the float32-accumulating GEMM (2 x 2^-11 of the bound).
TOL_NBITS = {np.float32: 2e-5, np.float16: 2e-3}
#: relative width of the gap every cut sits in: > 1e-3, and > 4 ulps of T (an fp16 activated value may move by one ulp)
GAP = {np.float32: 1e-3, np.float16: 4 * 2.0**-10}


# --------------------------------------------------------------------------------------------
# rules, inputs and cuts
# --------------------------------------------------------------------------------------------
@dataclass
class Rule:
    """Mode and the contract's optional parts: per-member thresholds / ks over ``segments``, ``ramp``, ``scale``."""

    mode: str
    thresholds: np.ndarray | None = None  # float32 [] or [G]
    ks: tuple[int, ...] | None = None
    segments: tuple[int, ...] | None = None
    ramp: float = 0.0
    scale: np.ndarray | None = None  # float32 [K] or [G, K]

    @property
    def members(self) -> int:
        return len(self.segments) if self.segments else 1

    def member_scale(self, g: int) -> np.ndarray | None:
        return None if self.scale is None else self.scale if self.scale.ndim == 1 else self.scale[g]

    def reference_members(self) -> list[ref.Member]:
        t = None if self.thresholds is None else np.asarray(self.thresholds, np.float32).reshape(-1)
        return [ref.Member(threshold=None if t is None else float(t[g] if t.size > 1 else t[0]),
                           k=None if self.ks is None else self.ks[g], scale=self.member_scale(g)) for g in range(self.members)]


def gated(rng, lead: tuple[int, ...], K: int, dtype) -> np.ndarray:
    """[gate | up] [..., 2K]: gate ~ N(0, 2.5^2) (silu from ~-0.28 to large), up ~ N(0, 1)."""
    return np.concatenate([rng.standard_normal(lead + (K,)) * 2.5, rng.standard_normal(lead + (K,))], axis=-1).astype(dtype)


def cut_threshold(scores: np.ndarray, keep: float, gap: float) -> float:
    """A float32 threshold keeping about ``keep`` of ``scores``, at the midpoint of a gap wider than ``gap`` (relative)
    between two sorted finite positive scores (0.5 when there are no scores to cut)."""
    s = np.unique(scores[np.isfinite(scores)].astype(np.float64))
    s = s[s > 0]
    if len(s) < 2:
        return 0.5
    start = min(max(int(len(s) * (1 - keep)), 0), len(s) - 2)
    for i in sorted(range(len(s) - 1), key=lambda j: abs(j - start)):
        if s[i + 1] - s[i] > gap * s[i + 1]:
            return float(np.float32((s[i] + s[i + 1]) / 2))
    raise AssertionError("no gap wide enough for the cut")


def cut_k(scores: np.ndarray, keep: float, gap: float) -> int:
    """k near ``keep * K`` such that in every row of ``scores`` [R, K] the k-th and (k+1)-th largest ranking keys (NaN
    ranks as 0) are more than ``gap`` apart, or the k-th is 0 (fewer than k positive keys: all of them kept)."""
    keys = np.nan_to_num(scores.reshape(-1, scores.shape[-1]).astype(np.float64), nan=0.0, posinf=np.inf)
    K = keys.shape[-1]
    if keys.shape[0] == 0:
        return max(1, int(keep * K))
    srt = -np.sort(-keys, axis=-1)
    start = min(max(int(round(keep * K)), 1), K - 1)
    for k in sorted(range(1, K), key=lambda j: abs(j - start)):
        a, b = srt[:, k - 1], srt[:, k]
        if ((a == 0) | (b < a * (1 - gap))).all():
            return k
    raise AssertionError("no gap wide enough for the cut")


def rule_for(xg: np.ndarray, mode: str, dtype, keeps: tuple[float, ...], segments: tuple[int, ...] | None = None,
             ramp: float = 0.0, scale: np.ndarray | None = None) -> Rule:
    """The rule of each member cut in a wide gap of its own scores (``keeps``: fraction to keep per member)."""
    xa = ref.swiglu(xg)
    rule = Rule(mode, segments=segments, ramp=ramp, scale=scale)
    scores = [ref.scores(xa, rule.member_scale(g)) for g in range(len(keeps))]
    if mode == "threshold":
        t = [cut_threshold(s, keep, GAP[dtype]) for s, keep in zip(scores, keeps)]
        rule.thresholds = np.array(t, np.float32) if len(t) > 1 else np.array(t[0], np.float32)
    else:
        rule.ks = tuple(cut_k(s, keep, GAP[dtype]) for s, keep in zip(scores, keeps))
    return rule


# --------------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------------
def with_activation(model: bytes, activation: str = "swiglu") -> bytes:
    m = onnx.load_from_string(model)
    m.graph.node[0].attribute.append(helper.make_attribute("activation", activation))
    return m.SerializeToString()


def dense_session(dtype, rule: Rule, activation: str | None = "swiglu"):
    single = rule.ks is not None and rule.segments is None
    model = test_ops.make_model(dtype, rule.mode, rule.ks[0] if single else None, threshold_input=rule.mode == "threshold",
                                ks=None if single else rule.ks, segments=rule.segments, ramp=rule.ramp or None,
                                scale_input=rule.scale is not None)
    return test_ops.make_session(with_activation(model, activation) if activation is not None else model)


def run_dense(xg: np.ndarray, w: np.ndarray, rule: Rule) -> np.ndarray:
    feeds = {"X": xg, "W": w}
    if rule.mode == "threshold":
        feeds["t"] = rule.thresholds
    if rule.scale is not None:
        feeds["scale"] = rule.scale
    return dense_session(xg.dtype.type, rule).run(None, feeds)[0]


def nbits_session(dtype, K: int, N: int, block: int, rule: Rule, activation: str | None = "swiglu"):
    single = rule.ks is not None and rule.segments is None
    model = test_ops_nbits.make_model(dtype, K, N, block, rule.mode, k=rule.ks[0] if single else None,
                                      ks=None if single or rule.ks is None else list(rule.ks),
                                      segments=list(rule.segments) if rule.segments else None, ramp=rule.ramp,
                                      thresholds=rule.mode == "threshold", scale=rule.scale is not None,
                                      extra={"activation": activation} if activation is not None else None)
    return test_ops_nbits.make_session(model)


def run_nbits(xg: np.ndarray, q: np.ndarray, scales: np.ndarray, offsets: np.ndarray, block: int, rule: Rule) -> np.ndarray:
    K, N = q.shape
    feeds = {"X": xg, "Q": ref.pack_nibbles(q), "scales": scales, "offsets": offsets}
    if rule.mode == "threshold":
        feeds["thresholds"] = rule.thresholds
    if rule.scale is not None:
        feeds["scale"] = rule.scale
    return nbits_session(xg.dtype.type, K, N, block, rule).run(None, feeds)[0]


# --------------------------------------------------------------------------------------------
# expected values and comparison
# --------------------------------------------------------------------------------------------
def expected_dense(xg: np.ndarray, w: np.ndarray, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """(Y, bound) in float64: reference.sparse_matmul on [gate | up] with activation="swiglu"."""
    K, N = w.shape
    lead = xg.shape[:-1]
    y, bound = ref.sparse_matmul(xg.reshape(-1, 2 * K), w, rule.mode, rule.reference_members(), rule.segments, rule.ramp,
                                 activation="swiglu")
    return y.reshape(lead + (N,)), bound.reshape(lead + (N,))


def expected_nbits(xg: np.ndarray, q: np.ndarray, scales: np.ndarray, offsets: np.ndarray, block: int,
                   rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """(Y, error scale) in float64: reference.sparse_matmul_nbits with activation="swiglu"; the error scale is
    sum_k |v_k| (|s| q + |o|) over the kept channels (tests/test_ops_nbits.py)."""
    K, N = q.shape
    lead = xg.shape[:-1]
    x2 = xg.reshape(-1, 2 * K)
    members = rule.reference_members()
    y, _ = ref.sparse_matmul_nbits(x2, ref.pack_nibbles(q), scales, offsets, N, block, rule.mode, members, rule.segments,
                                   rule.ramp, activation="swiglu")
    rows = np.arange(K) // block
    with np.errstate(invalid="ignore", over="ignore"):
        mag = np.abs(scales.astype(np.float64))[rows] * q + np.abs(offsets.astype(np.float64))[rows]
        bound = np.zeros_like(y)
        start = 0
        for member, end in zip(members, rule.segments or (N,)):
            values, _ = ref.member_values(ref.swiglu(x2), rule.mode, member, rule.ramp)
            bound[:, start:end] = np.abs(values) @ mag[:, start:end]
            start = end
    return y.reshape(lead + (N,)), bound.reshape(lead + (N,))


def assert_close(y: np.ndarray, want: np.ndarray, bound_sum: np.ndarray, dtype, tol: dict, exact_nonfinite: bool) -> None:
    """The op tests' rule: finite outputs within ``tol`` of the bound (+ |y|); Inf/NaN where the reference has them
    (``exact_nonfinite``: NaN and Inf exactly, SparseMatMul; else finite vs not, SparseMatMulNBits, whose block sums may
    give NaN where the dequantized product gives Inf). Values at the float16 overflow edge may round either way."""
    assert y.dtype == dtype and y.shape == want.shape, (y.dtype, y.shape, want.shape)
    yf = y.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = want.astype(dtype).astype(np.float64)  # what an exact kernel returns after rounding to T
        bound = tol[dtype] * (bound_sum + np.abs(want)) + (1e-7 if dtype == np.float16 else 1e-30)
        err = np.abs(yf - want)
    near = np.zeros(want.shape, bool)
    if dtype == np.float16:
        near = np.isfinite(want) & (np.abs(want) > FP16_MAX * (1 - tol[dtype])) & (np.abs(want) < 65520 * (1 + tol[dtype]))
        ok_near = (np.isinf(yf) & (np.sign(yf) == np.sign(want))) | (err <= bound)
        assert ok_near[near].all(), "wrong result at the float16 overflow edge"
    regular = ~near
    if exact_nonfinite:
        assert np.array_equal(np.isnan(yf)[regular], np.isnan(rounded)[regular]), "NaN placement differs"
        inf = regular & np.isinf(rounded)
        assert np.array_equal(yf[inf], rounded[inf]), "Inf placement differs"
    else:
        assert np.array_equal(np.isfinite(yf)[regular], np.isfinite(rounded)[regular]), "Inf/NaN placement differs"
    fin = regular & np.isfinite(rounded)
    bad = fin & ~(err <= bound)
    assert not bad.any(), f"max error {err[bad].max():.3g} over bound {bound[bad].min():.3g} at {np.argwhere(bad)[:5].tolist()}"


def check_dense(xg: np.ndarray, w: np.ndarray, rule: Rule) -> np.ndarray:
    y = run_dense(xg, w, rule)
    want, bound = expected_dense(xg, w, rule)
    assert_close(y, want, bound, xg.dtype.type, TOL, exact_nonfinite=True)
    return y


def check_nbits(xg: np.ndarray, q, scales, offsets, block: int, rule: Rule) -> np.ndarray:
    y = run_nbits(xg, q, scales, offsets, block, rule)
    want, bound = expected_nbits(xg, q, scales, offsets, block, rule)
    assert_close(y, want, bound, xg.dtype.type, TOL_NBITS, exact_nonfinite=False)
    return y


# --------------------------------------------------------------------------------------------
# the contract on small shapes: modes, members, scale, ramp, both types, M in {0, 1, 3, 17}
# --------------------------------------------------------------------------------------------
VARIANTS = ("plain", "members", "scale", "ramp", "all")
LEADS = {0: (0,), 1: (1,), 3: (1, 3), 17: (17,)}  # M = 3 as a rank-3 X


def _rule(rng, xg: np.ndarray, mode: str, dtype, variant: str, K: int, N: int) -> Rule:
    segments = (N // 3, N - N // 5, N) if variant in ("members", "all") else None
    keeps = (0.3, 0.5, 0.7) if segments else (0.4,)
    scale = None
    if variant == "scale":
        scale = rng.uniform(0.25, 4.0, K).astype(np.float32)
    elif variant == "all":
        scale = rng.uniform(0.25, 4.0, (3, K)).astype(np.float32)
    return rule_for(xg, mode, dtype, keeps, segments, 0.5 if variant in ("ramp", "all") else 0.0, scale)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", list(LEADS))
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sparse_matmul_swiglu_matches_reference(dtype, mode, m, variant):
    rng = np.random.default_rng(100 * m + VARIANTS.index(variant) + (mode == "topk") * 7)
    K, N = 64, 48
    xg = gated(rng, LEADS[m], K, dtype)
    w = rng.uniform(-2, 2, (K, N)).astype(dtype)
    rule = _rule(rng, xg, mode, dtype, variant, K, N)
    y = check_dense(xg, w, rule)
    assert y.shape == LEADS[m] + (N,)
    if m:  # every member's cut keeps some channels and drops others: the masks matter
        xa = ref.swiglu(xg.reshape(-1, 2 * K))
        kept = [ref.member_values(xa, mode, member, rule.ramp)[1].mean() for member in rule.reference_members()]
        assert all(0 < f < 1 for f in kept), kept


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", list(LEADS))
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nbits_swiglu_matches_reference(dtype, mode, m, variant):
    rng = np.random.default_rng(200 * m + VARIANTS.index(variant) + (mode == "topk") * 7)
    K, N, block = 80, 51, 32  # a partial last block, an odd N
    xg = gated(rng, LEADS[m], K, dtype)
    q, scales, offsets = test_ops_nbits.random_weights(rng, K, N, block, dtype)
    y = check_nbits(xg, q, scales, offsets, block, _rule(rng, xg, mode, dtype, variant, K, N))
    assert y.shape == LEADS[m] + (N,)


def test_the_activation_changes_the_result():
    """The op really activates: [gate | up] through the op equals the plain op on the activated input, and differs
    from the plain op on the gate half alone."""
    rng = np.random.default_rng(5)
    K, N = 64, 40
    xg = gated(rng, (6,), K, np.float32)
    w = rng.uniform(-2, 2, (K, N)).astype(np.float32)
    rule = rule_for(xg, "threshold", np.float32, (0.4,))
    y = check_dense(xg, w, rule)
    plain = dense_session(np.float32, rule, activation=None)
    on_activated = plain.run(None, {"X": ref.swiglu(xg), "W": w, "t": rule.thresholds})[0]
    np.testing.assert_allclose(y, on_activated, rtol=0, atol=TOL[np.float32] * np.abs(y).max())
    assert np.abs(plain.run(None, {"X": xg[:, :K], "W": w, "t": rule.thresholds})[0] - y).max() > 0.1 * np.abs(y).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rank_one_x(dtype):
    rng = np.random.default_rng(6)
    K, N = 33, 20
    xg = gated(rng, (), K, dtype)
    w = rng.uniform(-2, 2, (K, N)).astype(dtype)
    for mode in ("threshold", "topk"):
        assert check_dense(xg, w, rule_for(xg, mode, dtype, (0.5,))).shape == (N,)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_topk_keep_nothing_or_everything(dtype):
    """k = 0 zeroes the output; k = K keeps every activated value that is not zero or NaN (no cut to place)."""
    rng = np.random.default_rng(7)
    K, N = 24, 16
    xg = gated(rng, (5,), K, dtype)
    xg[:, 2] = 0.0  # silu(0) * u = 0: never kept
    xg[1, K + 4] = np.nan  # NaN up: never kept
    w = rng.uniform(-2, 2, (K, N)).astype(dtype)
    assert not check_dense(xg, w, Rule("topk", ks=(0,))).any()
    y = check_dense(xg, w, Rule("topk", ks=(K,)))
    want = np.nan_to_num(ref.swiglu(xg), nan=0.0).astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=0, atol=TOL[dtype] * 4 * np.abs(want).max())


# --------------------------------------------------------------------------------------------
# larger shapes: the decode split-K, row-block and dense prefill paths on 2 threads
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m,K,N", [(1, 1536, 576), (5, 700, 300), (40, 301, 517)])
def test_sparse_matmul_swiglu_kernel_paths(dtype, mode, m, K, N):
    rng = np.random.default_rng(m + K)
    xg = gated(rng, (m,), K, dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    check_dense(xg, w, rule_for(xg, mode, dtype, (0.4,)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m,K,N,block", [(1, 2048, 1000, 32), (5, 300, 517, 16), (40, 301, 130, 64)])
def test_nbits_swiglu_kernel_paths(dtype, mode, m, K, N, block):
    rng = np.random.default_rng(m + K + block)
    xg = gated(rng, (m,), K, dtype)
    q, scales, offsets = test_ops_nbits.random_weights(rng, K, N, block, dtype)
    check_nbits(xg, q, scales, offsets, block, rule_for(xg, mode, dtype, (0.4,)))


# --------------------------------------------------------------------------------------------
# NaN / Inf in gate or up
# --------------------------------------------------------------------------------------------
def _special(xg: np.ndarray, dtype) -> np.ndarray:
    """Columns of [gate | up] set to NaN / Inf / overflowing values: silu(NaN) and silu(g) * NaN are NaN (never kept),
    silu(-Inf) = NaN, silu(+Inf) * u = +-Inf, exp(200) overflows (silu(-200) = -0: never kept), 0 * Inf = NaN,
    and a finite product beyond T's range rounds to Inf (kept: its row of Y becomes non-finite)."""
    K = xg.shape[-1] // 2
    xg = xg.copy()
    big = 300.0 if dtype == np.float16 else 1e20
    xg[..., 3] = np.nan
    xg[..., K + 5] = np.nan
    xg[..., 6] = -np.inf
    xg[..., 9] = -200.0
    xg[..., 11], xg[..., K + 11] = 0.0, np.inf
    xg[:1, 13] = np.inf  # +Inf gate in the first row only
    xg[-1:, 15], xg[-1:, K + 15] = big, big  # overflow to Inf in the last row only
    return xg


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_nonfinite_gate_and_up(dtype, mode, m):
    rng = np.random.default_rng(m + 11)
    K, N, block = 64, 40, 16
    xg = _special(gated(rng, (m,), K, dtype), dtype)
    xa = ref.swiglu(xg)
    assert np.isnan(xa[..., [3, 5, 6, 11]]).all() and (xa[..., 9] == 0).all() and np.isinf(xa[0, 13])
    w = rng.uniform(-2, 2, (K, N)).astype(dtype)
    rule = rule_for(xg, mode, dtype, (0.5,))
    y = check_dense(xg, w, rule)
    assert not np.isfinite(y[0]).all() and not np.isfinite(y[-1]).all()  # the Inf values are kept
    if m > 2:
        assert np.isfinite(y[1:-1]).all()  # NaN and -0 are never kept: the other rows stay finite
    q, scales, offsets = test_ops_nbits.random_weights(rng, K, N, block, dtype)
    check_nbits(xg, q, scales, offsets, block, rule)


# --------------------------------------------------------------------------------------------
# errors and the default
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [20, 41, 80])
def test_sparse_matmul_wrong_last_dimension_is_an_error(width):
    """X must hold [gate | up], 2K wide (K = rows of W)."""
    sess = dense_session(np.float32, Rule("threshold"))
    with pytest.raises(Exception, match=r'activation="swiglu".*last dimension of X must be 2\*K=40.*got ' + str(width)):
        sess.run(None, {"X": np.ones((2, width), np.float32), "W": np.ones((20, 3), np.float32), "t": np.array(0.5, np.float32)})


@pytest.mark.parametrize("width", [20, 39])
def test_nbits_wrong_last_dimension_is_an_error(width):
    K, N, block = 20, 6, 16
    sess = nbits_session(np.float32, K, N, block, Rule("topk", ks=(3,)))
    q, scales, offsets = test_ops_nbits.random_weights(np.random.default_rng(0), K, N, block, np.float32)
    with pytest.raises(Exception, match=r'activation="swiglu".*last dimension of X must be 2\*K=40.*got ' + str(width)):
        sess.run(None, {"X": np.ones((1, width), np.float32), "Q": ref.pack_nibbles(q), "scales": scales, "offsets": offsets})


def test_unknown_activation_is_refused_at_session_creation():
    with pytest.raises(Exception, match=r'attribute activation must be "swiglu".*got "gelu"'):
        dense_session(np.float32, Rule("threshold"), activation="gelu")
    with pytest.raises(Exception, match=r'attribute activation must be "swiglu".*got "relu"'):
        nbits_session(np.float32, 20, 6, 16, Rule("topk", ks=(3,)), activation="relu")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_empty_activation_is_none(dtype):
    """activation="" is the default: X [..., K] as before, bit for bit."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 30)).astype(dtype)
    w = rng.standard_normal((30, 12)).astype(dtype)
    rule = Rule("topk", ks=(11,))
    got = dense_session(dtype, rule, activation="").run(None, {"X": x, "W": w})[0]
    np.testing.assert_array_equal(got, dense_session(dtype, rule, activation=None).run(None, {"X": x, "W": w})[0])
    q, scales, offsets = test_ops_nbits.random_weights(rng, 30, 12, 16, dtype)
    feeds = {"X": x, "Q": ref.pack_nibbles(q), "scales": scales, "offsets": offsets}
    got = nbits_session(dtype, 30, 12, 16, rule, activation="").run(None, feeds)[0]
    np.testing.assert_array_equal(got, nbits_session(dtype, 30, 12, 16, rule, activation=None).run(None, feeds)[0])
