"""Per-projection sparsity budgets from HT-SR alphas (ActTail) or uniform.

Every mapping turns the alphas into a score ``z_i`` in [0, 1] and then a ratio

    r_i = 1 − ε + 2ε · z_i            (r_i in [1 − ε, 1 + ε]; ε = 0 gives uniform)

and the budgets ``s_i = s · r_i · ΣP / Σ_j P_j r_j`` (P = parameter count), so the
parameter-weighted mean budget equals the target ``s`` exactly. Budgets are clipped to
[0, s_max] and the remainder redistributed over the unclipped projections (proportionally to
r_i) until the weighted mean is exact again.

Scores (``MAPPINGS``; every one also exists reversed as ``<name>-rev`` with z → 1 − z):

* ``linear``   — AlphaPruning: min-max of alpha over the whole model.
* ``log``      — min-max of ln(alpha): compresses the large, out-of-HT-SR-range alphas.
* ``clip``     — alpha clipped to the HT-SR range [2, 6] first, then min-max.
* ``rank``     — rank of alpha over the model / (n − 1): only the order matters.
* ``per-type`` — min-max of alpha within each projection kind (q, k, v, ... compared with their
  own kind only; every kind spans the full [1 − ε, 1 + ε]).
* ``type-rank`` — rank within each projection kind.
* ``block``    — alpha averaged over each layer's projections, min-max over layers (the
  AlphaPruning block-wise variant: one ratio per layer).
* ``type``     — alpha averaged over each projection kind, min-max over kinds (one ratio per kind).
* ``type-block`` — mean of the ``type`` and ``block`` scores (a per-kind and a per-layer term).

AlphaPruning's direction (``linear``) gives heavier-tailed (smaller-alpha, better-trained)
matrices lower sparsity. See docs/allocation.md for which direction wins for activation sparsity.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from .config import (
    ActTailConfig,
    ProjectionConfig,
    check_epsilon,
    check_sparsity,
    topk_keep,
)
from .errors import ActTailError

logger = logging.getLogger(__name__)

#: HT-SR "well trained" alpha range used by the ``clip`` mapping.
HTSR_RANGE = (2.0, 6.0)

ScoreFn = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]


def _minmax(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min()) if values.size else 0.0
    return np.full(values.shape, 0.5) if span <= 0 else (values - values.min()) / span


def _rank(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to [0, 1] (ties share their mean rank)."""
    if values.size < 2:
        return np.full(values.shape, 0.5)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size)
    sorted_values = values[order]
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for start, count in zip(first, counts):  # tie groups only (few)
        if count > 1:
            ranks[order[start:start + count]] = start + (count - 1) / 2
    return ranks / (values.size - 1)


def _grouped(values: np.ndarray, groups: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    out = np.empty(values.shape)
    for group in np.unique(groups):
        mask = groups == group
        out[mask] = fn(values[mask])
    return out


def _group_mean_score(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(groups, return_inverse=True)
    means = np.array([values[inverse == g].mean() for g in range(unique.size)])
    return _minmax(means)[inverse]


def _need(groups: np.ndarray | None, what: str, mapping: str) -> np.ndarray:
    if groups is None:
        raise ActTailError(f"mapping {mapping!r} needs the projection {what}; pass {what}= to allocate()")
    return groups


def _score_linear(a, kinds, layers):
    return _minmax(a)


def _score_log(a, kinds, layers):
    return _minmax(np.log(a))


def _score_clip(a, kinds, layers):
    return _minmax(np.clip(a, *HTSR_RANGE))


def _score_rank(a, kinds, layers):
    return _rank(a)


def _score_per_type(a, kinds, layers):
    return _grouped(a, _need(kinds, "kinds", "per-type"), _minmax)


def _score_type_rank(a, kinds, layers):
    return _grouped(a, _need(kinds, "kinds", "type-rank"), _rank)


def _score_block(a, kinds, layers):
    return _group_mean_score(a, _need(layers, "layers", "block"))


def _score_type(a, kinds, layers):
    return _group_mean_score(a, _need(kinds, "kinds", "type"))


def _score_type_block(a, kinds, layers):
    return 0.5 * (_score_type(a, kinds, layers) + _score_block(a, kinds, layers))


_SCORES: dict[str, ScoreFn] = {
    "linear": _score_linear,
    "log": _score_log,
    "clip": _score_clip,
    "rank": _score_rank,
    "per-type": _score_per_type,
    "type-rank": _score_type_rank,
    "block": _score_block,
    "type": _score_type,
    "type-block": _score_type_block,
}
REVERSED_SUFFIX = "-rev"
MAPPINGS: tuple[str, ...] = tuple(name for base in _SCORES for name in (base, base + REVERSED_SUFFIX))
#: Mappings whose budget is a non-decreasing function of alpha alone (before reversal).
MONOTONE_MAPPINGS: tuple[str, ...] = ("linear", "log", "clip", "rank")

DEFAULT_MAPPING = "block-rev"
DEFAULT_EPSILON = 0.3


def check_mapping(mapping: str) -> str:
    if mapping not in MAPPINGS:
        raise ActTailError(f"mapping must be one of {', '.join(MAPPINGS)}; got {mapping!r}")
    return mapping


def scores(alphas: np.ndarray, mapping: str, kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> np.ndarray:
    """Score z_i in [0, 1] of every projection under ``mapping`` (reversal applied)."""
    check_mapping(mapping)
    reverse = mapping.endswith(REVERSED_SUFFIX)
    base = mapping[: -len(REVERSED_SUFFIX)] if reverse else mapping
    z = _SCORES[base](alphas, None if kinds is None else np.asarray(kinds), None if layers is None else np.asarray(layers))
    return 1.0 - z if reverse else z


def _redistribute(ratios: np.ndarray, params: np.ndarray, target: float, s_max: float) -> np.ndarray:
    """s_i = c · r_i with c set so Σ P s = target · ΣP, clipping at s_max and re-solving for the rest."""
    budget = target * params.sum()
    clipped = np.zeros(ratios.size, dtype=bool)
    s = np.zeros(ratios.size)
    for _ in range(ratios.size + 1):
        free = ~clipped
        if not free.any():  # target == s_max
            return np.full(ratios.size, s_max)
        remaining = budget - s_max * params[clipped].sum()
        c = remaining / float((params[free] * ratios[free]).sum())
        s = np.where(clipped, s_max, c * ratios)
        over = free & (s > s_max)
        if not over.any():
            return s
        clipped |= over
    raise AssertionError("redistribution did not converge")  # pragma: no cover - at most n rounds


def allocate(
    alphas: np.ndarray,
    params: np.ndarray,
    target: float,
    epsilon: float,
    mapping: str,
    s_max: float = 0.99,
    kinds: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
) -> np.ndarray:
    """Per-projection sparsities whose parameter-weighted mean is ``target`` (see module docstring)."""
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    params = np.asarray(params, dtype=np.float64).ravel()
    target = check_sparsity(target, "target sparsity")
    epsilon = check_epsilon(epsilon)
    if not 0.0 < s_max < 1.0:
        raise ActTailError(f"s_max must be in (0, 1), got {s_max}")
    if target > s_max:
        raise ActTailError(f"target sparsity {target} exceeds s_max {s_max}: lower the target or raise s_max")
    if alphas.size == 0 or alphas.shape != params.shape:
        raise ActTailError(f"alphas and params must be non-empty and of equal length, got {alphas.size} and {params.size}")
    if not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ActTailError("alphas must be finite and positive (fit them with spectral.analyze_model)")
    if not np.all(params > 0):
        raise ActTailError("parameter counts must be positive")
    for name, groups in (("kinds", kinds), ("layers", layers)):
        if groups is not None and len(groups) != alphas.size:
            raise ActTailError(f"{name} must have one entry per alpha ({alphas.size}), got {len(groups)}")
    z = scores(alphas, mapping, kinds, layers)
    ratios = 1.0 - epsilon + 2.0 * epsilon * z
    if target == 0.0:
        return np.zeros(alphas.size)
    return _redistribute(ratios, params, target, s_max)


def uniform(params: np.ndarray, target: float) -> np.ndarray:
    """The same budget ``target`` for every projection."""
    return np.full(np.asarray(params).size, check_sparsity(target, "target sparsity"))


def build_config(
    model,
    target_sparsity: float,
    allocation: str = "acttail",
    mode: str = "topk",
    epsilon: float | None = None,
    mapping: str | None = None,
    s_max: float = 0.99,
    fits: dict | None = None,
) -> ActTailConfig:
    """ActTailConfig with one :class:`ProjectionConfig` per projection (alpha, budget, and k in top-k mode)."""
    from .modeling import iter_projections

    target_sparsity = check_sparsity(target_sparsity, "target sparsity")
    epsilon = DEFAULT_EPSILON if epsilon is None else check_epsilon(epsilon)
    mapping = check_mapping(DEFAULT_MAPPING if mapping is None else mapping)
    projections = iter_projections(model)
    if fits is None and allocation == "acttail":
        from .spectral import analyze_model

        fits = analyze_model(model)
    config = ActTailConfig(target_sparsity=target_sparsity, allocation=allocation, mode=mode, epsilon=epsilon, mapping=mapping, s_max=s_max)
    params = np.array([m.in_features * m.out_features for _, _, _, m in projections], dtype=np.float64)
    alphas = None
    if fits is not None:
        missing = [name for name, *_ in projections if name not in fits]
        if missing:
            raise ActTailError(f"fits lack {len(missing)} projections (e.g. {missing[0]}): fit them with spectral.analyze_model(model)")
        alphas = np.array([fits[name].alpha for name, *_ in projections])
    if allocation == "uniform":
        budgets = uniform(params, target_sparsity)
    else:
        budgets = allocate(alphas, params, target_sparsity, epsilon, mapping, s_max,
                           kinds=[k for _, _, k, _ in projections], layers=[l for _, l, _, _ in projections])
    for (name, layer, kind, module), s, i in zip(projections, budgets, range(len(projections))):
        config.projections.append(ProjectionConfig(
            name=name, layer=layer, kind=kind, in_features=module.in_features, out_features=module.out_features,
            sparsity=float(s), alpha=None if alphas is None else float(alphas[i]),
            k=topk_keep(float(s), module.in_features) if mode == "topk" else None,
        ))
    config.architecture = type(model).__name__
    config.model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    logger.info("%s allocation: target %.3f, weighted %.6f, budgets %.3f..%.3f", allocation, target_sparsity,
                config.weighted_sparsity(), float(budgets.min()), float(budgets.max()))
    return config
