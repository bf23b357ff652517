"""HT-SR spectral analysis: power-law fit of the eigenvalues of WᵀW for every projection.

The eigenvalues of WᵀW are the squared singular values of W. Their upper tail is fitted with a
continuous power law p(λ) ∝ λ^-α (Clauset, Shalizi & Newman 2009, as in the ``powerlaw`` package,
WeightWatcher and AlphaPruning): for every candidate x_min (each distinct eigenvalue but the
largest) the maximum-likelihood exponent is

    α(x_min) = 1 + n / Σ_{λ_i >= x_min} ln(λ_i / x_min),

and the chosen x_min minimises the Kolmogorov–Smirnov distance between the empirical tail CDF
(j / n at the j-th smallest tail eigenvalue) and the fitted CDF 1 − (λ / x_min)^(1−α).
All candidates are evaluated at once with array operations (in chunks to bound memory).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ActTailError

logger = logging.getLogger(__name__)

#: Eigenvalues below this fraction of the largest one are treated as numerical zeros.
ZERO_EIGENVALUE_RTOL = 1e-10
#: Elements of the (candidates × tail) KS matrix evaluated per chunk.
_KS_CHUNK_ELEMENTS = 1 << 22
#: ``eigenvalues(method=...)``: singular values of W, or eigenvalues of the smaller Gram matrix.
EIGEN_METHODS = ("svd", "gram")
#: Columns of W converted to float64 at a time when accumulating the Gram matrix.
_GRAM_BLOCK = 1024


@dataclass
class PowerLawFit:
    """Power-law fit of one eigenvalue spectrum.

    ``alpha``: tail exponent; ``x_min``: start of the fitted tail; ``ks_distance``: KS distance of
    the fit; ``n_tail``: eigenvalues in the tail; ``lambda_max``: largest eigenvalue;
    ``alpha_hat``: WeightWatcher's weighted alpha, α·log10(λ_max).
    """

    alpha: float
    x_min: float
    ks_distance: float
    n_tail: int
    lambda_max: float
    alpha_hat: float
    #: None for a real fit; for a degenerate spectrum (all-zero, rank < 2, no finite fit) the reason and where the
    #: alpha came from instead (see :func:`analyze_model`).
    fallback: str | None = None

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def eigenvalues(weight, device=None, dtype=None, method: str = "svd") -> np.ndarray:
    """Ascending eigenvalues of WᵀW (squared singular values of ``weight``) as float64 numpy.

    ``method="svd"``: ``torch.linalg.svdvals`` of W (float64 on CPU, float32 on GPU unless ``dtype``
    is given). ``method="gram"``: ``torch.linalg.eigvalsh`` of the smaller Gram matrix (W Wᵀ or WᵀW,
    which share their non-zero eigenvalues) in float64 — several times faster on a GPU for
    LLaMA-sized matrices, same eigenvalues to float64 rounding of the Gram product.
    Computed on ``device`` (default: the weight's device, or CUDA when available).
    """
    import torch

    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or 0 in weight.shape:
        raise ActTailError(f"eigenvalues need a non-empty 2-D weight tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if method not in EIGEN_METHODS:
        raise ActTailError(f"eigenvalue method must be one of {', '.join(EIGEN_METHODS)}; got {method!r}")
    if device is None:
        device = weight.device if weight.device.type != "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    with torch.no_grad():
        if method == "gram":
            # the smaller Gram matrix, accumulated over column blocks of W so that only one block
            # is ever held in float64 next to it (W itself stays in its own dtype)
            w = weight.detach().to(device=device)
            w = w if w.shape[0] <= w.shape[1] else w.T
            gram = torch.zeros(w.shape[0], w.shape[0], dtype=dtype or torch.float64, device=device)
            for start in range(0, w.shape[1], _GRAM_BLOCK):
                block = w[:, start:start + _GRAM_BLOCK].to(gram.dtype)
                gram.addmm_(block, block.T)
            del block
            eigs = torch.linalg.eigvalsh(gram).double().cpu().numpy()
            # Gram rounding can leave tiny negative values where the true eigenvalue is 0
            return np.sort(np.clip(eigs, 0.0, None))
        if dtype is None:
            dtype = torch.float64 if device.type == "cpu" else torch.float32
        singular = torch.linalg.svdvals(weight.detach().to(device=device, dtype=dtype))
    eigs = singular.double().cpu().numpy() ** 2
    return np.sort(eigs)


def fit_power_law(eigs: np.ndarray, device=None) -> PowerLawFit:
    """Continuous power-law MLE with x_min chosen by minimum KS distance (vectorised).

    ``device`` (a torch device such as ``"cuda"``) runs the KS scan — the (candidates × tail)
    matrix, the costly part for thousands of eigenvalues — with torch in float64 there; the
    default is numpy on the CPU. Both give the same fit.
    """
    x = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ActTailError("fit_power_law needs a non-empty array of finite eigenvalues")
    if x[0] < 0 and x[0] < -ZERO_EIGENVALUE_RTOL * max(x[-1], 0.0):
        raise ActTailError(f"fit_power_law got a negative eigenvalue {x[0]:.3g}; eigenvalues of WᵀW are >= 0")
    x = x[x > ZERO_EIGENVALUE_RTOL * x[-1]]
    n = x.size
    # candidate x_min: first occurrence of each distinct value, the largest value excluded
    _, first = np.unique(x, return_index=True)
    candidates = first[:-1]
    if candidates.size < 1:
        raise ActTailError(f"fit_power_law needs at least 2 distinct positive eigenvalues, got {np.unique(x).size}")

    log_x = np.log(x)
    suffix_log = np.cumsum(log_x[::-1])[::-1]  # Σ_{j>=i} ln x_j
    n_tail = n - candidates
    log_sum = suffix_log[candidates] - n_tail * log_x[candidates]  # Σ ln(x_j / x_i)
    with np.errstate(divide="ignore"):
        alphas = 1.0 + n_tail / log_sum

    ks = _ks_distances(log_x, candidates, alphas, n_tail, device)
    valid = np.isfinite(alphas) & np.isfinite(ks)
    if not valid.any():
        raise ActTailError("fit_power_law found no finite power-law fit (degenerate spectrum)")
    best = int(np.argmin(np.where(valid, ks, np.inf)))
    alpha = float(alphas[best])
    lambda_max = float(x[-1])
    return PowerLawFit(
        alpha=alpha,
        x_min=float(x[candidates[best]]),
        ks_distance=float(ks[best]),
        n_tail=int(n_tail[best]),
        lambda_max=lambda_max,
        alpha_hat=alpha * math.log10(lambda_max),
    )


def _ks_distances(log_x: np.ndarray, candidates: np.ndarray, alphas: np.ndarray, n_tail: np.ndarray,
                  device=None) -> np.ndarray:
    """KS distance of the fit at every candidate x_min (chunked over candidates to bound memory)."""
    n = log_x.size
    chunk = max(1, _KS_CHUNK_ELEMENTS // n)
    if device is None:
        ks = np.empty(candidates.size)
        offsets = np.arange(n)
        for start in range(0, candidates.size, chunk):
            idx = candidates[start:start + chunk]  # (c,)
            a = alphas[start:start + chunk, None]
            j = offsets[None, :] - idx[:, None]  # position inside each tail, negative = outside
            inside = j >= 0
            log_ratio = np.where(inside, log_x[None, :] - log_x[idx][:, None], 0.0)
            fitted = -np.expm1((1.0 - a) * log_ratio)  # 1 - (x / x_min)^(1 - α)
            empirical = j / n_tail[start:start + chunk, None]
            ks[start:start + chunk] = np.max(np.where(inside, np.abs(fitted - empirical), -np.inf), axis=1)
        return ks

    import torch

    device = torch.device(device)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    lx, cand, al, nt = t(log_x), torch.as_tensor(candidates, device=device), t(alphas), t(n_tail)
    offsets = torch.arange(n, device=device)
    ks = torch.empty(candidates.size, dtype=torch.float64, device=device)
    for start in range(0, candidates.size, chunk):
        idx = cand[start:start + chunk]
        j = offsets[None, :] - idx[:, None]
        inside = j >= 0
        log_ratio = torch.where(inside, lx[None, :] - lx[idx][:, None], 0.0)
        fitted = -torch.expm1((1.0 - al[start:start + chunk, None]) * log_ratio)
        empirical = j / nt[start:start + chunk, None]
        ks[start:start + chunk] = torch.where(inside, (fitted - empirical).abs(), -torch.inf).amax(dim=1)
    return ks.cpu().numpy()


def analyze_model(model, device=None, progress: bool = True, method: str = "svd") -> dict[str, PowerLawFit]:
    """Power-law fit of every projection of a LLaMA / Mistral model, keyed by module name.

    Eigenvalues are computed where each weight lives (or on ``device``); when that is a GPU the
    KS scan runs there too. ``method`` is passed to :func:`eigenvalues`.
    """
    import torch
    from tqdm.auto import tqdm

    from .modeling import iter_projections
    from .offload import projection_weight

    projections = iter_projections(model)
    fits: dict[str, PowerLawFit] = {}
    degenerate: dict[str, str] = {}
    for name, _, _, module in tqdm(projections, desc="HT-SR spectra", unit="matrix", disable=not progress):
        # one matrix at a time: offloaded weights (accelerate) are loaded for this block only
        with projection_weight(module) as weight:
            eigs = eigenvalues(weight, device=device, method=method)
            where = torch.device(device) if device is not None else weight.device
            try:
                fits[name] = fit_power_law(eigs, device=where if where.type == "cuda" else None)
            except ActTailError as exc:  # all-zero / rank-1 / constant spectrum: no power law to fit
                degenerate[name] = str(exc).removeprefix("fit_power_law ")
    _fill_degenerate(fits, degenerate, {name: layer for name, layer, _, _ in projections})
    logger.debug("fitted %d spectra", len(fits))
    return fits


def _fill_degenerate(fits: dict[str, PowerLawFit], degenerate: dict[str, str], layers: dict[str, int]) -> None:
    """Give each degenerate spectrum the median alpha of its layer's fitted projections (of the whole model when
    the layer has none), recorded in ``fallback``; an ActTailError naming the projection when nothing was fitted."""
    for name, reason in degenerate.items():
        same_layer = [f.alpha for n, f in fits.items() if layers[n] == layers[name] and f.fallback is None]
        pool, source = (same_layer, f"median alpha of layer {layers[name]}") if same_layer else (
            [f.alpha for f in fits.values() if f.fallback is None], "median alpha of the model")
        if not pool:
            raise ActTailError(f"the weight spectrum of {name} is degenerate ({reason}) and no projection of the model has a "
                               "usable spectrum: use --allocation uniform, which needs no alphas")
        alpha = float(np.median(pool))
        logger.warning("%s: degenerate weight spectrum (%s); using the %s, %.3f", name, reason, source, alpha)
        fits[name] = PowerLawFit(alpha=alpha, x_min=0.0, ks_distance=1.0, n_tail=0, lambda_max=0.0, alpha_hat=0.0,
                                 fallback=f"{reason}; {source}")
