"""The ActTail mask rule, written once: numpy (float64 reference of the ops) and torch (the PyTorch sparse model).

Every kernel (the ONNX masking subgraph, ``com.acttail::SparseMatMul`` and ``SparseMatMulNBits`` on CPU and CUDA),
the export validation, the tests and the benchmarks check against these functions.

Per projection input ``x`` (last dimension ``K``) and one *member* (a projection; a packed MatMul has several, each
owning a column segment of the output):

* score ``s_i = |x_i|`` or, with a per-channel ``scale`` (weight-informed scores), ``s_i = fl32(|x_i| * scale_i)``,
  computed in float32 (float16 inputs are widened first). NaN scores are never kept.
* ``threshold`` mode keeps ``s_i > t`` — a float32 comparison for the fused ops; the ONNX masking subgraph compares
  in the graph's float type (``compare_dtype``).
* ``topk`` mode keeps the ``k`` largest scores of each row; among equal scores the lower channel index wins; NaN
  ranks with zero. ``t`` of a row is then its largest dropped score (0 when nothing is dropped).
* kept values are ``x_i * f_i`` with the ramp factor ``f_i = min(1, (s_i - t) / (ramp * t))`` (``f = 1`` when
  ``ramp == 0`` or ``t == 0``): continuous in ``x`` for ``ramp > 0``, with the same zero set as the hard mask.
  Soft thresholding (``soft=True``, measurement only: no kernel implements it) uses ``f_i = (s_i - t) / s_i``
  instead, i.e. ``sign(x_i) (|x_i| - t)`` for ``|x|`` scores: 1-Lipschitz in ``x``, same zero set.
* ``Y[:, member columns] = sum over kept i with x_i != 0 of x_i f_i W[i, member columns]``: dropped channels and
  zero inputs are skipped, so Inf/NaN in their weight rows never reach ``Y``. Kernels accumulate in float32.

4-bit weights (``SparseMatMulNBits``): ``W[k, n] = scales[k // B, n] * q[k, n] + offsets[k // B, n]``, ``q`` packed
two per byte along ``N`` (column ``n`` in byte ``n // 2``, low nibble for even ``n``), ``B`` the block size along
``K`` (the last block may be partial).

Activation (both ops' attribute ``activation``, :func:`swiglu`): with ``"swiglu"`` the op's ``X`` has last dimension
``2K`` holding ``[gate | up]`` and the projection input is ``x = silu(gate) * up``, computed per element in float32
as ``g / (1 + exp(-g)) * u`` and rounded once to ``X``'s type; the mask rule and the product above then apply to
that ``x``. It folds the Split / Sigmoid / Mul / Mul between a packed gate|up projection and the down projection
into the down op (:mod:`acttail_export.activation_fusion`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MODES = ("threshold", "topk")
#: values of the ops' ``activation`` attribute besides "" (none)
ACTIVATIONS = ("swiglu",)


# --------------------------------------------------------------------------------------------
# numpy: masks of one member
# --------------------------------------------------------------------------------------------
def scores(x: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Float32 scores ``|x|`` (or ``fl32(|x| * scale)``) of ``x`` [..., K]."""
    mag = np.abs(x.astype(np.float32))
    if scale is None:
        return mag
    with np.errstate(over="ignore", invalid="ignore"):
        return mag * np.asarray(scale, dtype=np.float32)


def threshold_keep(x: np.ndarray, threshold: float, scale: np.ndarray | None = None,
                   compare_dtype=np.float32) -> np.ndarray:
    """Boolean keep-mask ``s > t`` compared in ``compare_dtype`` (NaN never kept)."""
    s = scores(x, scale).astype(compare_dtype)
    with np.errstate(invalid="ignore"):
        return s > np.asarray(threshold, dtype=np.float32).astype(compare_dtype)


def topk_keep(x: np.ndarray, k: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keep-mask, t per row): the ``k`` largest scores per row (ties: lower index first, NaN ranks as 0)."""
    s = scores(x, scale)
    s = np.where(np.isnan(s), np.float32(0), s).astype(np.float64)
    flat = s.reshape(-1, s.shape[-1])
    rows, width = flat.shape
    keep = np.zeros(flat.shape, dtype=bool)
    t = np.zeros(rows, dtype=np.float64)
    k = max(0, min(int(k), width))
    if rows and width:
        # argsort of -s is stable: equal scores stay in index order, so the lower index comes first
        order = np.argsort(-flat, axis=-1, kind="stable")
        np.put_along_axis(keep, order[:, :k], True, axis=-1)
        if k < width:
            t = np.take_along_axis(flat, order[:, k:k + 1], axis=-1)[:, 0]
    keep &= flat > 0  # zero (and NaN) scores are never kept, whatever k
    return keep.reshape(s.shape), t.reshape(s.shape[:-1])


def ramp_factor(s: np.ndarray, t: np.ndarray | float, ramp: float) -> np.ndarray:
    """``min(1, (s - t) / (ramp * t))`` (1 where ``ramp == 0`` or ``t == 0``), float64."""
    s = s.astype(np.float64)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), s.shape) if np.ndim(t) == 0 else np.asarray(t, np.float64)
    if ramp == 0:
        return np.ones_like(s)
    width = ramp * t
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.clip((s - t) / width, 0.0, 1.0)
    return np.where(width > 0, f, 1.0)


@dataclass(frozen=True)
class Member:
    """The rule of one member: ``threshold`` (threshold mode) or ``k`` (top-k), optional per-channel ``scale``."""

    threshold: float | None = None
    k: int | None = None
    scale: np.ndarray | None = None


def soft_factor(s: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """Soft-thresholding factor ``(s - t) / s`` (0 where ``s <= t``), float64: ``x * f = sign(x) (|x| - t)``."""
    s = s.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (s - np.asarray(t, dtype=np.float64)) / s
    return np.where(s > t, f, 0.0)


def member_values(x: np.ndarray, mode: str, member: Member, ramp: float = 0.0,
                  compare_dtype=np.float32, soft: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(masked values ``x * f`` in float64, keep-mask) of ``x`` [..., K] for one member; ``soft``: soft thresholding
    (:func:`soft_factor`) instead of the ramp."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    s = scores(x, member.scale)
    if mode == "threshold":
        keep = threshold_keep(x, member.threshold, member.scale, compare_dtype)
        t = np.float64(np.float32(member.threshold))
    else:
        keep, t_rows = topk_keep(x, member.k, member.scale)
        t = t_rows[..., None]
    f = soft_factor(s, t) if soft else ramp_factor(s, t, ramp)
    keep = keep & (x != 0)  # zero entries contribute nothing and are skipped, not multiplied
    values = np.where(keep, x.astype(np.float64) * f, 0.0)
    return values, keep


# --------------------------------------------------------------------------------------------
# numpy: the activation
# --------------------------------------------------------------------------------------------
def swiglu(x: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` of ``x`` [..., 2K] = ``[gate | up]`` -> [..., K] in ``x``'s dtype.

    Computed per element in float32 as ``g / (1 + exp(-g)) * u`` (``g``, ``u`` widened to float32, ``np.exp`` in
    float32) and rounded once to ``x``'s dtype; overflow gives what IEEE arithmetic gives (``exp(-g) = Inf`` for
    ``g < -88``: ``-0 * u``; NaN propagates), without warnings.
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu needs a last dimension 2K ([gate | up]), got shape {x.shape}")
    half = x.shape[-1] // 2
    g = x[..., :half].astype(np.float32)
    u = x[..., half:].astype(np.float32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        y = g / (np.float32(1) + np.exp(-g)) * u
        return y.astype(x.dtype)


def activate(x: np.ndarray, activation: str | None, K: int) -> np.ndarray:
    """The op's input after its ``activation`` attribute: ``x`` [..., K] as is (None / ""), or :func:`swiglu` of
    ``x`` [..., 2K]; ValueError for another value or a wrong last dimension."""
    if not activation:
        return x
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}")
    if np.ndim(x) == 0 or np.shape(x)[-1] != 2 * K:
        raise ValueError(f"with activation={activation!r} the last dimension of x must be 2K = {2 * K}, got shape {np.shape(x)}")
    return swiglu(x)


# --------------------------------------------------------------------------------------------
# numpy: the ops
# --------------------------------------------------------------------------------------------
def sparse_matmul(x: np.ndarray, w: np.ndarray, mode: str, members: Sequence[Member],
                  segments: Sequence[int] | None = None, ramp: float = 0.0,
                  compare_dtype=np.float32, activation: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Y, |Y| bound) in float64 of ``SparseMatMul``: ``x`` [..., K], ``w`` [K, N], one member per segment.

    The bound is ``sum |v_i| |W[i, n]|`` over kept channels, the scale a float32-accumulating kernel's error is
    relative to. Inf/NaN weights only count for rows that keep their channel. ``activation="swiglu"``: ``x`` is
    [..., 2K] and the rule applies to :func:`swiglu` of it (:func:`activate`).
    """
    K, N = w.shape
    x = activate(x, activation, K)
    ends = list(segments) if segments else [N]
    if len(ends) != len(members) or ends[-1] != N or any(b <= a for a, b in zip([0, *ends], ends)):
        raise ValueError(f"segments {ends} do not split N={N} into {len(members)} members")
    x2 = x.reshape(int(np.prod(x.shape[:-1], dtype=np.int64)), K)
    y = np.zeros((x2.shape[0], N))
    bound = np.zeros_like(y)
    start = 0
    for member, end in zip(members, ends):
        values, keep = member_values(x2, mode, member, ramp, compare_dtype)
        wf = w[:, start:end].astype(np.float64)
        y[:, start:end], bound[:, start:end] = _masked_product(values, keep, wf)
        start = end
    shape = x.shape[:-1] + (N,)
    return y.reshape(shape), bound.reshape(shape)


def _masked_product(values: np.ndarray, keep: np.ndarray, wf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    finite = np.isfinite(wf)
    clean = np.where(finite, wf, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        y = values @ clean
        bound = np.abs(values) @ np.abs(clean)
        for k, n in zip(*np.nonzero(~finite)):  # non-finite weights count only where channel k is kept
            term = np.where(keep[:, k], values[:, k] * wf[k, n], 0.0)
            y[:, n] += term
            bound[:, n] += np.abs(term)
    return y, bound


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [K, ceil(N/2)] -> q uint8 [K, N] (column n in byte n // 2, low nibble for even n)."""
    packed = np.asarray(packed, dtype=np.uint8)
    q = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    q[:, 0::2] = packed & 0x0F
    q[:, 1::2] = packed >> 4
    return q[:, :n]


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q uint8 [K, N] with values 0..15 -> uint8 [K, ceil(N/2)] (inverse of :func:`unpack_nibbles`)."""
    q = np.asarray(q, dtype=np.uint8)
    if q.size and q.max() > 15:
        raise ValueError("4-bit values must be in 0..15")
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), np.uint8)], axis=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, offsets: np.ndarray, block_size: int, axis: str = "K") -> np.ndarray:
    """``W[k, n] = scales[k // B, n] * q[k, n] + offsets[k // B, n]`` in float64 (q unpacked, [K, N]); with
    ``axis="N"`` (blocks along the output dimension, scales / offsets ``[K, ceil(N / B)]``, the harness' prototype
    layout of docs/quantization.md) ``W[k, n] = scales[k, n // B] * q[k, n] + offsets[k, n // B]``."""
    if axis == "N":
        cols = np.arange(q.shape[1]) // block_size
        return scales.astype(np.float64)[:, cols] * q.astype(np.float64) + offsets.astype(np.float64)[:, cols]
    if axis != "K":
        raise ValueError(f"axis must be 'K' or 'N', got {axis!r}")
    rows = np.arange(q.shape[0]) // block_size
    return scales.astype(np.float64)[rows] * q.astype(np.float64) + offsets.astype(np.float64)[rows]


def sparse_matmul_nbits(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, offsets: np.ndarray, n: int,
                        block_size: int, mode: str, members: Sequence[Member], segments: Sequence[int] | None = None,
                        ramp: float = 0.0, activation: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Y, bound) of ``SparseMatMulNBits``: :func:`sparse_matmul` on the dequantized weight (``activation`` as there)."""
    w = dequantize_blocks(unpack_nibbles(packed, n), scales, offsets, block_size)
    return sparse_matmul(x, w, mode, members, segments, ramp, activation=activation)


# --------------------------------------------------------------------------------------------
# torch: the PyTorch sparse model's masks (same rule; compare in the tensor's own dtype)
# --------------------------------------------------------------------------------------------
def torch_scores(x, scale=None):
    """``|x|`` (or ``|x| * scale`` in float32) as a tensor."""
    mag = x.abs()
    return mag if scale is None else mag.float() * scale


def torch_topk_keep(s, k: int):
    """(keep-mask, t per row) of the ``k`` largest scores along the last dim; ties: lower index first."""
    import torch

    d = s.shape[-1]
    s = torch.nan_to_num(s, nan=0.0)
    if k >= d:
        return s > 0, torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)
    if k <= 0:
        return torch.zeros_like(s, dtype=torch.bool), s.amax(-1)
    values, order = torch.sort(s, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return keep & (s > 0), values[..., k]


def torch_ramp(s, t, ramp: float):
    """Ramp factor ``min(1, (s - t) / (ramp * t))`` (1 where ``ramp == 0`` or ``t == 0``)."""
    import torch

    if ramp == 0:
        return torch.ones_like(s)
    width = ramp * t
    f = ((s - t) / torch.where(width > 0, width, torch.ones_like(width))).clamp(0.0, 1.0)
    return torch.where(width > 0, f, torch.ones_like(f))


def torch_mask(x, mode: str, threshold: float | None = None, k: int | None = None, scale=None, ramp: float = 0.0,
               soft: bool = False):
    """``x`` with the rule applied (new tensor, ``x``'s dtype): the PyTorch reference of one projection; ``soft``: soft
    thresholding (kept values ``x (s - t) / s``) instead of the ramp."""
    import torch

    s = torch_scores(x, scale)
    if mode == "threshold":
        keep = s > threshold
        t = torch.as_tensor(threshold, dtype=s.dtype, device=s.device)
    elif mode == "topk":
        keep, t = torch_topk_keep(s, int(k))
        t = t.unsqueeze(-1)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if soft:
        return torch.where(keep, x * ((s - t) / torch.where(keep, s, torch.ones_like(s))).to(x.dtype), zero)
    if ramp == 0:
        return torch.where(keep, x, zero)  # not x * keep: a dropped Inf/NaN must give 0, not NaN
    return torch.where(keep, x * torch_ramp(s, t, ramp).to(x.dtype), zero)
