"""The mask rule of :mod:`acttail_export.reference`: numpy and torch agree, the ramp is continuous, packing inverts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acttail_export import reference as ref


def _loop_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Independent top-k: per row, repeatedly take the largest |x| (lowest index on ties, NaN as 0)."""
    keep = np.zeros(x.shape, bool)
    for r, row in enumerate(np.nan_to_num(np.abs(x.astype(np.float32)), nan=0.0)):
        left = list(range(len(row)))
        for _ in range(min(k, len(row))):
            best = max(left, key=lambda i: (row[i], -i))
            keep[r, best] = row[best] > 0  # zero (and NaN) scores are never kept
            left.remove(best)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_topk_matches_a_plain_loop_with_ties_and_nan(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(6, 13)).astype(np.float32)  # many ties
    x[0, 3] = np.nan
    for k in (0, 1, 5, 13):
        keep, _ = ref.topk_keep(x, k)
        assert np.array_equal(keep, _loop_topk(x, k)), k


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("ramp", [0.0, 0.5])
def test_torch_mask_equals_numpy(mode, ramp):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 7, 33)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 33).astype(np.float32)
    member = ref.Member(threshold=0.7, k=11, scale=scale)
    want, _ = ref.member_values(x, mode, member, ramp)
    got = ref.torch_mask(torch.from_numpy(x), mode, threshold=0.7, k=11, scale=torch.from_numpy(scale), ramp=ramp)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)  # float32 vs float64 ramp arithmetic


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_soft_threshold_torch_equals_numpy_and_shrinks_by_t(mode):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 7, 33)).astype(np.float32)
    member = ref.Member(threshold=0.7, k=11)
    want, keep = ref.member_values(x, mode, member, soft=True)
    hard, _ = ref.member_values(x, mode, member)
    got = ref.torch_mask(torch.from_numpy(x), mode, threshold=0.7, k=11, soft=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)  # float32 vs float64: (s - t) / s, x * f
    # independent check: sign(x) (|x| - t) on kept entries, t the threshold or per row the largest dropped |x|
    if mode == "threshold":
        t = np.float64(np.float32(0.7))
    else:
        t = np.sort(np.abs(x.astype(np.float64)), axis=-1)[..., -12:-11]
    np.testing.assert_allclose(want, np.where(keep, np.sign(x) * (np.abs(x) - t), 0.0), rtol=1e-12, atol=1e-12)
    assert np.array_equal(want != 0, hard != 0)  # same zero set as the hard mask (no ties in random data)


def test_soft_threshold_is_one_lipschitz():
    x = np.linspace(-2, 2, 4001, dtype=np.float32)[None]
    values, _ = ref.member_values(x, "threshold", ref.Member(threshold=1.0), soft=True)
    slope = np.abs(np.diff(values[0])) / np.diff(x[0].astype(np.float64))
    assert slope.max() <= 1.0 + 1e-5  # never steeper than the identity: no gain at |x| = t
    assert values[0][-1] == pytest.approx(1.0, abs=1e-6)  # 2 - t


def test_ramp_is_continuous_and_keeps_the_zero_set():
    x = np.linspace(-2, 2, 4001, dtype=np.float32)[None]
    hard, keep_hard = ref.member_values(x, "threshold", ref.Member(threshold=1.0))
    soft, keep_soft = ref.member_values(x, "threshold", ref.Member(threshold=1.0), ramp=0.25)
    assert np.array_equal(keep_hard, keep_soft)
    assert np.abs(np.diff(soft[0])).max() < 0.01 < np.abs(np.diff(hard[0])).max()  # no jump at |x| = t
    assert np.array_equal(soft[0][np.abs(x[0]) >= 1.25], hard[0][np.abs(x[0]) >= 1.25])


def test_sparse_matmul_segments_use_each_members_rule():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 16))
    w = rng.standard_normal((16, 10))
    members = [ref.Member(threshold=0.2), ref.Member(threshold=1.0)]
    y, _ = ref.sparse_matmul(x, w, "threshold", members, segments=[4, 10])
    for member, cols in zip(members, (slice(0, 4), slice(4, 10))):
        xm = np.where(np.abs(x).astype(np.float32) > np.float32(member.threshold), x, 0.0)
        np.testing.assert_allclose(y[:, cols], xm @ w[:, cols], rtol=1e-12)


def test_nonfinite_weight_rows_of_dropped_channels_never_reach_y():
    x = np.array([[0.0, 2.0, 0.1]])
    w = np.array([[np.nan, 1.0], [1.0, 1.0], [np.inf, 1.0]])
    y, _ = ref.sparse_matmul(x, w, "threshold", [ref.Member(threshold=0.5)])
    np.testing.assert_array_equal(y, [[2.0, 2.0]])


def test_nibble_packing_round_trip_and_dequantization():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, size=(37, 9), dtype=np.uint8)
    packed = ref.pack_nibbles(q)
    assert packed.shape == (37, 5)
    assert np.array_equal(ref.unpack_nibbles(packed, 9), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)
    scales, offsets = rng.random((2, 9)), rng.standard_normal((2, 9))
    w = ref.dequantize_blocks(q, scales, offsets, block_size=32)
    np.testing.assert_allclose(w[33], scales[1] * q[33] + offsets[1])
    np.testing.assert_allclose(w[31], scales[0] * q[31] + offsets[0])


def test_topk_never_keeps_zero_or_nan_scores_and_k_zero_width():
    x = np.array([[np.nan, 3.0, 0.0, 1.0]], dtype=np.float32)
    scale = np.array([1.0, 1.0, 1.0, 0.0], dtype=np.float32)
    keep, _ = ref.topk_keep(x, 4, scale)
    assert keep.tolist() == [[False, True, False, False]]
    got = ref.torch_mask(torch.from_numpy(x), "topk", k=4, scale=torch.from_numpy(scale))
    assert torch.equal(got, torch.tensor([[0.0, 3.0, 0.0, 0.0]]))
    y, _ = ref.sparse_matmul(np.zeros((3, 0)), np.zeros((0, 2)), "threshold", [ref.Member(threshold=0.5)])
    assert y.shape == (3, 2) and not y.any()


# --------------------------------------------------------------------------------------------
# the ops' activation attribute: swiglu
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_swiglu_is_silu_gate_times_up_rounded_once(dtype):
    """float32 g / (1 + exp(-g)) * u, one rounding to the input's dtype: within 2 float32 ulps of the exact value
    before that rounding (numpy's float32 exp is not correctly rounded), then exactly its rounding for float16."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 5, 2 * 37)) * np.array([4.0] * 37 + [1.0] * 37)).astype(dtype)
    got = ref.swiglu(x)
    assert got.dtype == x.dtype and got.shape == (2, 5, 37)
    g, u = x[..., :37].astype(np.float64), x[..., 37:].astype(np.float64)
    exact = g / (1 + np.exp(-g)) * u
    f32 = (g.astype(np.float32) / (np.float32(1) + np.exp(-g.astype(np.float32))) * u.astype(np.float32))
    assert np.all(np.abs(f32 - exact) <= 4 * 2.0**-24 * np.abs(exact) + 1e-45)
    np.testing.assert_array_equal(got, f32.astype(dtype))
    if dtype == np.float16:  # never the float16 product of float16 factors: one rounding only
        assert np.all(np.abs(got.astype(np.float64) - exact) <= 2.0**-11 * np.abs(exact) * (1 + 1e-6) + 2.0**-25)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_swiglu_special_values_without_warnings(dtype):
    """IEEE results: NaN propagates, silu(+Inf) = +Inf, silu(-Inf) = NaN, exp(-g) overflowing gives -0; no warnings."""
    g = np.array([np.nan, 1.0, np.inf, -np.inf, -200.0, 0.0, 2.0, np.inf], dtype)
    u = np.array([1.0, np.nan, 2.0, 1.0, 3.0, np.inf, -np.inf, 0.0], dtype)
    with np.errstate(all="raise"):  # the function must not warn (nor raise) whatever the caller's error state
        y = ref.swiglu(np.concatenate([g, u]))
    assert np.isnan(y[[0, 1, 3, 5, 7]]).all()
    assert y[2] == np.inf and y[4] == 0 and np.signbit(y[4]) and y[6] == -np.inf


def test_swiglu_shape_errors():
    with pytest.raises(ValueError, match="2K"):
        ref.swiglu(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="2K"):
        ref.swiglu(np.float32(1.0))


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_sparse_matmul_activation_applies_swiglu_first(mode):
    """activation="swiglu": the op on [gate | up] is the op on swiglu([gate | up]), for both ops; wrong widths and
    unknown activations are refused."""
    rng = np.random.default_rng(4)
    K, N, B = 40, 12, 16
    xg = rng.standard_normal((3, 2 * K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    members = [ref.Member(threshold=0.3, k=15), ref.Member(threshold=0.6, k=7, scale=rng.uniform(0.5, 2, K))]
    got = ref.sparse_matmul(xg, w, mode, members, [5, N], ramp=0.5, activation="swiglu")
    want = ref.sparse_matmul(ref.swiglu(xg), w, mode, members, [5, N], ramp=0.5)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    q = rng.integers(0, 16, (K, N)).astype(np.uint8)
    scales, offsets = rng.uniform(0.01, 0.1, (3, N)), rng.uniform(-0.5, 0, (3, N))
    packed = ref.pack_nibbles(q)
    got = ref.sparse_matmul_nbits(xg, packed, scales, offsets, N, B, mode, members, [5, N], activation="swiglu")
    want = ref.sparse_matmul_nbits(ref.swiglu(xg), packed, scales, offsets, N, B, mode, members, [5, N])
    np.testing.assert_array_equal(got[0], want[0])
    assert ref.sparse_matmul(xg[:, :K], w, mode, members, [5, N], activation="")[0].shape == (3, N)  # "" = none
    with pytest.raises(ValueError, match=r"last dimension of x must be 2K = 80"):
        ref.sparse_matmul(xg[:, :K], w, mode, members, [5, N], activation="swiglu")
    with pytest.raises(ValueError, match="activation must be one of"):
        ref.sparse_matmul(xg, w, mode, members, [5, N], activation="gelu")
