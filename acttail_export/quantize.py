"""Block-wise asymmetric 4-bit quantization of projection weights (pure maths: arrays in, a dataclass out).

A weight ``W [K, N]`` (``K`` input channels, the MatMul layout of the ONNX graph, i.e. ``linear.weight.T``) is cut
into blocks of ``B`` consecutive input channels; each (block, output column) gets a scale ``s`` and an offset ``o``::

    W[k, n] ~= s[k // B, n] * q[k, n] + o[k // B, n],   q in 0..15

which is exactly what ``com.acttail::SparseMatMulNBits`` reads (:mod:`acttail_export.reference`): ``q`` row-major
along ``K``, two columns per byte (low nibble for even ``n``), so a kept input channel is one contiguous run of
bytes. ``K`` need not be a multiple of ``B``: the last block is partial (its missing rows count for nothing; ORT's
MatMulNBits pads them with zero codes, :func:`to_matmul_nbits`).

Quantizers (:data:`QUANTIZERS`):

* ``rtn``: round to nearest on the block's [min, max] range (``s = (max - min) / 15``, ``o = min``), the GGUF Q4_1 rule.
* ``mse``: per (block, column) grid search over shrunk ranges ``[min + a (max - min), max - b (max - min)]``
  minimizing the squared error, then a few alternating least-squares refits of ``(s, o)`` given the codes (an
  HQQ-like half-quadratic step without the proximal term). Never worse than ``rtn``: the unshrunk range is
  a candidate and a refit is only kept where it lowers the error.
* ``gptq`` / ``gptq-mse`` (:data:`GPTQ_QUANTIZERS`): :func:`quantize_gptq` with the ``rtn`` / ``mse`` rule per block;
  they need each projection's input Hessian from calibration text (:func:`acttail_export.int4_rewrite.input_hessians`).
  ``gptq-act`` / ``gptq-mse-act``: the same in act-order with static groups (:func:`gptq_options`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import reference as ref

logger = logging.getLogger(__name__)

QUANTIZERS = ("rtn", "mse")
#: GPTQ-style rounding (:func:`quantize_gptq`, needs calibration Hessians) -> the per-block scale / offset rule it uses
GPTQ_QUANTIZERS = {"gptq": "rtn", "gptq-mse": "mse", "gptq-act": "rtn", "gptq-mse-act": "mse"}
#: the GPTQ-style quantizers that take the input channels in act-order (``order="act"``: static groups)
GPTQ_ACT_ORDER = frozenset({"gptq-act", "gptq-mse-act"})
#: every ``--quantizer`` of an export: the plain rules, then the GPTQ-style ones
WEIGHT_QUANTIZERS = QUANTIZERS + tuple(GPTQ_QUANTIZERS)
#: channel orders of :func:`quantize_gptq`
GPTQ_ORDERS = ("natural", "act")
BLOCK_SIZES = (32, 64, 128)
LEVELS = 15  # 4-bit codes 0..15
#: shrink fractions of the range tried at each end by the ``mse`` quantizer
GRID = np.linspace(0.0, 0.2, 9)
REFITS = 3
_CHUNK = 4096  # output columns quantized at once (bounds the grid search's memory)


@dataclass(frozen=True)
class QuantizedWeight:
    """A 4-bit weight in the ``SparseMatMulNBits`` layout (see the module docstring)."""

    packed: np.ndarray  # uint8 [K, ceil(N/2)]
    scales: np.ndarray  # float32 [ceil(K/B), N]
    offsets: np.ndarray  # float32 [ceil(K/B), N]
    K: int
    N: int
    block_size: int
    quantizer: str

    @classmethod
    def from_tensors(cls, codes, scales, offsets, block_size: int, quantizer: str) -> QuantizedWeight:
        """From :func:`quantize_tensor`'s (codes [K, N], scales, offsets) torch tensors."""
        K, N = codes.shape
        packed = ref.pack_nibbles(codes.cpu().numpy()) if K else np.zeros((0, (N + 1) // 2), np.uint8)
        return cls(packed, scales.float().cpu().numpy(), offsets.float().cpu().numpy(), K, N, block_size, quantizer)

    def codes(self) -> np.ndarray:
        """Unpacked codes uint8 [K, N]."""
        return ref.unpack_nibbles(self.packed, self.N)

    def dequantize(self) -> np.ndarray:
        """``s * q + o`` in float64 [K, N] (:func:`reference.dequantize_blocks`)."""
        return ref.dequantize_blocks(self.codes(), self.scales, self.offsets, self.block_size)

    def dequantize_f32(self) -> np.ndarray:
        """The float32 weight a float32 model holds: ``fl32(s * q + o)``."""
        return self.dequantize().astype(np.float32)


def check_block_size(block_size: int) -> int:
    """``block_size`` if it is one of :data:`BLOCK_SIZES`, else ValueError."""
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}")
    return int(block_size)


def quantize(w, block_size: int = 32, quantizer: str = "rtn", device=None) -> QuantizedWeight:
    """Quantize ``w [K, N]`` (a float numpy array or torch tensor) block-wise along ``K`` with ``quantizer``.

    The search runs in float64 with torch on ``device`` (default: where ``w`` lives; numpy input: the CPU): on a GPU
    a 7B model's projections take seconds where a numpy loop took hours with ``mse``.
    """
    return QuantizedWeight.from_tensors(*quantize_tensor(w, block_size, quantizer, device), block_size, quantizer)


def quantize_tensor(w, block_size: int = 32, quantizer: str = "rtn", device=None):
    """(codes uint8 [K, N], scales float32 [ceil(K/B), N], offsets float32 [ceil(K/B), N]) as torch tensors on
    ``device``: the arithmetic of :func:`quantize` without the packing (see there)."""
    import torch

    block_size = check_block_size(block_size)
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
    w = torch.as_tensor(w) if not isinstance(w, torch.Tensor) else w.detach()
    device = torch.device(device) if device is not None else w.device
    if w.ndim != 2 or not w.dtype.is_floating_point or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight must be a finite 2-D array [K, N], got shape {tuple(w.shape)}")
    K, N = w.shape
    blocks = -(-K // block_size)
    q = torch.zeros((K, N), dtype=torch.uint8, device=device)
    scales = torch.zeros((blocks, N), dtype=torch.float32, device=device)
    offsets = torch.zeros((blocks, N), dtype=torch.float32, device=device)
    for start in range(0, N, _CHUNK):
        cols = slice(start, min(N, start + _CHUNK))
        wb, valid = _blocked(w[:, cols].to(device=device, dtype=torch.float64), block_size)
        s, o = _params(wb, valid, quantizer)
        s, o = s.float(), o.float()  # the stored values decide the codes
        codes = _codes(wb, s.double(), o.double())
        q[:, cols] = codes.reshape(-1, codes.shape[-1])[:K]
        scales[:, cols], offsets[:, cols] = s[:, 0], o[:, 0]
    return q, scales, offsets


def quantize_gptq(w, hessian, block_size: int = 32, damp: float = 0.01, lazy: int = 128, params: str = "rtn",
                  order: str = "natural", refit: bool = False):
    """GPTQ-style rounding (Frantar et al., 2022) in this module's layout: (codes, scales, offsets) torch tensors.

    ``w [K, N]`` (float), ``hessian [K, K]`` = sum of ``x xᵀ`` over calibration inputs ``x`` of the projection.
    Input channels are quantized one at a time; each one's rounding error is spread over the channels not yet
    quantized through the inverse Hessian's Cholesky factor, so that ``X W`` (not ``W``) stays close. ``damp`` (times
    the mean diagonal) regularizes the Hessian; channels never active get weight 0.

    ``order`` (:data:`GPTQ_ORDERS`):

    * ``"natural"``: channels in order; each block of ``block_size`` channels gets the round-to-nearest (min, max)
      scale and offset of its weights as they are when its first channel is reached (``params="mse"``: the ``mse``
      search's). With ``hessian = I`` there is nothing to spread: the result is :func:`quantize` with the same
      quantizer.
    * ``"act"`` (GPTQ's ``desc_act`` with static groups): channels in decreasing order of ``diag(H)`` (stable), every
      block's scale and offset fixed beforehand from the original weights (exactly :func:`quantize_tensor`'s), so the
      layout (codes [K, N], one scale / offset per block of consecutive input channels) is unchanged.

    ``refit``: afterwards, per output column, the least-squares scales and offsets of all blocks for the fixed codes
    under the Hessian's norm (minimizing ``‖X (Ŵ − W)‖²``, :func:`_hessian_refit`); a column keeps its refit only
    where that lowers the error and every scale stays positive.
    """
    import torch

    block_size = check_block_size(block_size)
    if params not in QUANTIZERS:
        raise ValueError(f"params must be one of {', '.join(QUANTIZERS)}, got {params!r}")
    if order not in GPTQ_ORDERS:
        raise ValueError(f"order must be one of {', '.join(GPTQ_ORDERS)}, got {order!r}")
    w = torch.as_tensor(w).detach().to(torch.float64).clone()
    h = torch.as_tensor(hessian).detach().to(device=w.device, dtype=torch.float64).clone()
    K, N = w.shape
    if h.shape != (K, K) or not bool(torch.isfinite(h).all()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight [K, N] and hessian [K, K] must be finite, got {tuple(w.shape)} and {tuple(h.shape)}")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    original = w.clone() if refit else None
    h_refit = h.clone() if refit else None
    h += damp * torch.diagonal(h).mean() * torch.eye(K, dtype=h.dtype, device=h.device)
    blocks = -(-K // block_size)
    scales = torch.zeros((blocks, N), dtype=torch.float32, device=w.device)
    offsets = torch.zeros((blocks, N), dtype=torch.float32, device=w.device)
    if order == "act":  # static groups: every block's range from the original weights, in the original order
        _, scales, offsets = quantize_tensor(w, block_size, params)
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[perm], h[perm][:, perm]
        row_block = perm // block_size
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros((K, N), dtype=torch.uint8, device=w.device)  # codes in processing order
    lazy = block_size * max(1, lazy // block_size)  # whole quantization blocks per lazy update
    s64 = o64 = None
    for start in range(0, K, lazy):
        end = min(K, start + lazy)
        errors = torch.zeros((end - start, N), dtype=w.dtype, device=w.device)
        for k in range(start, end):
            if order == "act":
                s64, o64 = scales[row_block[k]].double(), offsets[row_block[k]].double()
            elif k % block_size == 0:
                s, o = _params(*_blocked(w[k:min(K, k + block_size)], block_size), params)
                scales[k // block_size], offsets[k // block_size] = s[0, 0].float(), o[0, 0].float()
                s64, o64 = scales[k // block_size].double(), offsets[k // block_size].double()
            q[k] = _codes(w[k], s64, o64)
            err = (w[k] - (s64 * q[k].double() + o64)) / u[k, k]
            w[k + 1:end] -= torch.outer(u[k, k + 1:end], err)
            errors[k - start] = err
        w[end:] -= u[start:end, end:].T @ errors
    codes = q
    if order == "act":  # back to channel order
        codes = torch.empty_like(q)
        codes[perm] = q
    if refit:
        scales, offsets = _hessian_refit(original, h_refit, codes, scales, offsets, block_size)
    return codes, scales, offsets


def _hessian_refit(w, h, codes, scales, offsets, block_size: int, chunk: int = 256):
    """Per output column, the (scale, offset) of every block minimizing ``(Ŵ − W)ᵀ H (Ŵ − W)`` for fixed codes
    (normal equations of ``2 × blocks`` unknowns, float64); kept per column only where the error drops and all its
    scales stay positive. Returns float32 (scales, offsets)."""
    import torch

    K, N = w.shape
    blocks = scales.shape[0]
    rows = torch.arange(K, device=w.device) // block_size
    member = torch.nn.functional.one_hot(rows, blocks).to(w.dtype)  # [K, blocks]
    h1 = h @ member  # [K, blocks]: H 1_c
    m_oo = member.T @ h1  # [blocks, blocks]: 1_bᵀ H 1_c
    new_s, new_o = scales.clone(), offsets.clone()
    for start in range(0, N, chunk):
        cols = slice(start, min(N, start + chunk))
        q = codes[:, cols].to(w.dtype)  # [K, n]
        wc = w[:, cols]
        n = q.shape[1]
        hw = h @ wc
        m = torch.zeros((n, 2 * blocks, 2 * blocks), dtype=w.dtype, device=w.device)
        for c in range(blocks):
            rc = slice(c * block_size, min(K, (c + 1) * block_size))
            hq_c = h[:, rc] @ q[rc]  # [K, n]: H[:, R_c] q_c
            m[:, :blocks, c] = (member.T @ (q * hq_c)).T  # q_bᵀ H q_c
            m[:, blocks:, c] = (member.T @ hq_c).T  # 1_bᵀ H q_c
            m[:, c, blocks:] = m[:, blocks:, c]  # q_cᵀ H 1_b (symmetric)
        m[:, blocks:, blocks:] = m_oo
        rhs = torch.cat([(member.T @ (q * hw)).T, (member.T @ hw).T], dim=1)  # [n, 2 blocks]
        ridge = 1e-10 * torch.diagonal(m, dim1=1, dim2=2).abs().amax(dim=1).clamp(min=1e-300)
        theta = torch.linalg.solve(m + ridge[:, None, None] * torch.eye(2 * blocks, dtype=w.dtype, device=w.device), rhs)
        s, o = theta[:, :blocks].T.float(), theta[:, blocks:].T.float()  # stored values decide the error
        before = _h_error(w[:, cols], h, q, scales[:, cols], offsets[:, cols], block_size)
        after = _h_error(w[:, cols], h, q, s, o, block_size)
        keep = (after < before) & (s > 0).all(dim=0) & torch.isfinite(s).all(dim=0) & torch.isfinite(o).all(dim=0)
        new_s[:, cols] = torch.where(keep, s, scales[:, cols])
        new_o[:, cols] = torch.where(keep, o, offsets[:, cols])
    return new_s, new_o


def _h_error(w, h, q, s, o, block_size: int):
    """``diag((Ŵ − W)ᵀ H (Ŵ − W))`` [n] for Ŵ = :func:`dequantize_tensor` of codes ``q`` with (s, o)."""
    d = dequantize_tensor(q, s, o, block_size).double() - w
    return (d * (h @ d)).sum(dim=0)


def gptq_options(quantizer: str) -> dict:
    """:func:`quantize_gptq`'s ``params`` and ``order`` for a GPTQ-style quantizer name (:data:`GPTQ_QUANTIZERS`)."""
    if quantizer not in GPTQ_QUANTIZERS:
        raise ValueError(f"not a GPTQ-style quantizer: {quantizer!r} (one of {', '.join(GPTQ_QUANTIZERS)})")
    return {"params": GPTQ_QUANTIZERS[quantizer], "order": "act" if quantizer in GPTQ_ACT_ORDER else "natural"}


def dequantize_tensor(codes, scales, offsets, block_size: int):
    """``fl32(s[k // B] * q + o[k // B])`` [K, N] in torch (float64 maths, as :func:`reference.dequantize_blocks`)."""
    import torch

    rows = torch.arange(codes.shape[0], device=codes.device) // block_size
    return (scales.double()[rows] * codes.double() + offsets.double()[rows]).float()


def _blocked(w, block_size: int):
    """(``w`` padded along K and reshaped to [blocks, B, N], validity mask [blocks, B, 1])."""
    import torch

    K, N = w.shape
    pad = -K % block_size
    valid = torch.ones((K + pad, 1), dtype=torch.bool, device=w.device)
    valid[K:] = False
    wp = torch.cat([w, w.new_zeros((pad, N))]) if pad else w
    return wp.reshape(-1, block_size, N), valid.reshape(-1, block_size, 1)


def _min_max(wb, valid):
    import torch

    lo = torch.where(valid, wb, torch.inf).amin(dim=1, keepdim=True)
    hi = torch.where(valid, wb, -torch.inf).amax(dim=1, keepdim=True)
    return lo, hi


def _params(wb, valid, quantizer: str):
    """Scale and offset [blocks, 1, N] of ``quantizer``'s range rule."""
    return _rtn_params(wb, valid) if quantizer == "rtn" else _mse_params(wb, valid)


def _rtn_params(wb, valid):
    """Scale and offset [blocks, 1, N] of round-to-nearest on each block's [min, max]."""
    return _range_params(*_min_max(wb, valid))


def _range_params(lo, hi):
    """(s, o) of the range [lo, hi]; a constant block gets s = 1 (any nonzero s: its codes are all 0)."""
    import torch

    span = hi - lo
    return torch.where(span > 0, span / LEVELS, 1.0), lo


def _codes(wb, s, o):
    """Nearest codes 0..15 of ``wb`` for (s, o) (ties to even, as numpy's rint)."""
    import torch

    return torch.clamp(torch.round((wb - o) / s), 0, LEVELS).to(torch.uint8)


def _error(wb, valid, s, o):
    """Squared error [blocks, 1, N] of quantizing ``wb`` with (s, o) (padding rows excluded)."""
    import torch

    d = torch.where(valid, s * _codes(wb, s, o) + o - wb, 0.0)
    return (d * d).sum(dim=1, keepdim=True)


def _keep_better(err, s, o, best, best_s, best_o):
    import torch

    better = err < best
    return torch.where(better, err, best), torch.where(better, s, best_s), torch.where(better, o, best_o)


def _mse_params(wb, valid):
    """Scale and offset [blocks, 1, N] minimizing the squared error (grid over shrunk ranges, then LS refits)."""
    lo, hi = _min_max(wb, valid)
    span = hi - lo
    best_s, best_o = _range_params(lo, hi)
    best = _error(wb, valid, best_s, best_o)
    for a in GRID:
        for b in GRID:
            if a + b == 0 or a + b >= 0.5:
                continue
            s, o = _range_params(lo + float(a) * span, hi - float(b) * span)
            best, best_s, best_o = _keep_better(_error(wb, valid, s, o), s, o, best, best_s, best_o)
    for _ in range(REFITS):
        s, o = _refit(wb, valid, _codes(wb, best_s, best_o))
        best, best_s, best_o = _keep_better(_error(wb, valid, s, o), s, o, best, best_s, best_o)
    return best_s, best_o


def _refit(wb, valid, q):
    """Least-squares (s, o) of ``w ~= s q + o`` per (block, column) for fixed codes ``q``."""
    import torch

    m = valid.to(wb.dtype)
    qf = q.to(wb.dtype) * m
    w = wb * m
    n = m.sum(dim=1, keepdim=True)
    sq, sw = qf.sum(dim=1, keepdim=True), w.sum(dim=1, keepdim=True)
    sqq, sqw = (qf * qf).sum(dim=1, keepdim=True), (qf * w).sum(dim=1, keepdim=True)
    det = n * sqq - sq * sq
    ok = det > 1e-12 * torch.clamp(n * sqq, min=1e-300)
    s = torch.where(ok, (n * sqw - sq * sw) / torch.where(ok, det, 1.0), 1.0)
    o = torch.where(ok, (sw - s * sq) / n, sw / n)
    ok &= s > 0  # a non-positive scale would break the code search of the next refit
    return torch.where(ok, s, 1.0), torch.where(ok, o, sw / n)


# --------------------------------------------------------------------------------------------
# ORT's com.microsoft::MatMulNBits layout
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatMulNBitsWeight:
    """Inputs of ``com.microsoft::MatMulNBits`` (bits 4): ``W[k, n] = (q - zero_points) * scales``."""

    B: np.ndarray  # uint8 [N, ceil(K/B), B/2]: K innermost per output column, low nibble first
    scales: np.ndarray  # float32 [N * ceil(K/B)]
    zero_points: np.ndarray  # float32 [N * ceil(K/B)] (float zero points: ``-offset / scale``)
    K: int
    N: int
    block_size: int


def to_matmul_nbits(w: QuantizedWeight) -> MatMulNBitsWeight:
    """The same dequantized matrix in MatMulNBits' layout (codes padded to whole blocks with 0)."""
    B, K, N = w.block_size, w.K, w.N
    blocks = -(-K // B)
    q = np.zeros((blocks * B, N), np.uint8)
    q[:K] = w.codes()
    qt = q.T.reshape(N, blocks, B)  # [N, blocks, B], K innermost
    packed = (qt[..., 0::2] | (qt[..., 1::2] << 4)).astype(np.uint8)
    scales = w.scales.T.astype(np.float32)  # [N, blocks]
    zero_points = (-w.offsets.T.astype(np.float64) / scales).astype(np.float32)
    return MatMulNBitsWeight(packed, scales.reshape(-1), zero_points.reshape(-1), K, N, B)


def dequantize_matmul_nbits(w: MatMulNBitsWeight) -> np.ndarray:
    """float64 [K, N] of a :class:`MatMulNBitsWeight` (numpy reading of ORT's contract)."""
    N, blocks = w.B.shape[:2]
    q = np.empty((N, blocks, w.block_size), np.float64)
    q[..., 0::2] = w.B & 0x0F
    q[..., 1::2] = w.B >> 4
    s = w.scales.astype(np.float64).reshape(N, blocks, 1)
    z = w.zero_points.astype(np.float64).reshape(N, blocks, 1)
    return ((q - z) * s).reshape(N, -1)[:, :w.K].T
