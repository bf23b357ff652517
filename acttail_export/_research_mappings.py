"""Internal: the alpha→budget sweep space the default mapping was chosen from (benchmarks and studies only).

Not part of the library API and never offered by the CLI: :func:`enable` registers these mappings with
:func:`acttail_export.allocation.register_research_mappings`, after which ``allocation.scores``,
``allocate`` and ``build_config`` accept them (``allocation.check_mapping`` still does not).

``ALL_MAPPINGS`` = ``<score>[-rev][-kept|-abs]`` over every score below and the supported ones:

* ``linear``   — AlphaPruning: min-max of alpha over the whole model.
* ``log``      — min-max of ln(alpha): compresses the large, out-of-HT-SR-range alphas.
* ``clip``     — alpha clipped to the HT-SR range [2, 6] first, then min-max.
* ``rank``     — rank of alpha over the model / (n − 1): only the order matters.
* ``per-type`` / ``type-rank`` — min-max / rank of alpha within each projection kind.
* ``type``     — alpha averaged over each projection kind, min-max over kinds (one ratio per kind).
* ``type-block`` / ``type-linear`` — mean of the ``type`` score and the ``block`` / ``linear`` one.
* ``group``    — alpha averaged over each input group (q/k/v, o, gate/up, down), min-max over the groups.
* ``group-max-linear`` — mean of the ``group-max`` and ``linear`` scores.
* supported: ``block``, ``group-max``, ``group-linear``, ``group-sched`` (see :mod:`acttail_export.allocation`).

Research notes (docs/allocation.md has the tables): AlphaPruning's direction (``linear``) is worse than
uniform for activation sparsity; raw per-matrix maps (``rank``, ``log``, ``per-type``, ``block-rev``)
are noisy because many alphas lie outside the HT-SR range and many tails are short; what matters is the
input group, with a spread of about ±10 sparsity points (``-abs``, ε = 0.1) capped at half the uniform
kept fraction. The ``-kept`` scale spreads the kept fraction by at most ±ε relative to uniform: at
s = 0.8 and ε = 0.3 the sparsity scale sends budgets to 0.99 (1 % of the channels kept), the kept
scale keeps between 14 % and 26 %; the best kept-scale ε grew as ≈ 0.1 / (1 − s), i.e. a constant
absolute spread, which is what ``-abs`` is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from . import allocation
from .allocation import (
    ABS_SUFFIX,
    KEPT_SUFFIX,
    REVERSED_SUFFIX,
    SCALES,
    _group_mean_score,
    _minmax,
    _need,
    _score_block,
    _score_group,
    _score_group_max,
    _score_linear,
)

logger = logging.getLogger(__name__)

#: HT-SR "well trained" alpha range used by the ``clip`` score.
HTSR_RANGE = (2.0, 6.0)


def _rank(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to [0, 1] (ties share their mean rank)."""
    if values.size < 2:
        return np.full(values.shape, 0.5)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size)
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
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


def _score_type(a, kinds, layers):
    return _group_mean_score(a, _need(kinds, "kinds", "type"))


RESEARCH_SCORES: dict[str, allocation.ScoreFn] = {
    "linear": _score_linear,
    "log": lambda a, kinds, layers: _minmax(np.log(a)),
    "clip": lambda a, kinds, layers: _minmax(np.clip(a, *HTSR_RANGE)),
    "rank": lambda a, kinds, layers: _rank(a),
    "per-type": lambda a, kinds, layers: _grouped(a, _need(kinds, "kinds", "per-type"), _minmax),
    "type-rank": lambda a, kinds, layers: _grouped(a, _need(kinds, "kinds", "type-rank"), _rank),
    "type": _score_type,
    "type-block": lambda a, kinds, layers: 0.5 * (_score_type(a, kinds, layers) + _score_block(a, kinds, layers)),
    "type-linear": lambda a, kinds, layers: 0.5 * (_score_type(a, kinds, layers) + _score_linear(a, kinds, layers)),
    "group": _score_group,
    "group-max-linear": lambda a, kinds, layers: 0.5 * (_score_group_max(a, kinds, layers)
                                                        + _score_linear(a, kinds, layers)),
}
#: Every score of the sweep, research and supported, in the order of the original search.
SCORE_NAMES: tuple[str, ...] = ("linear", "log", "clip", "rank", "per-type", "type-rank", "block", "type", "type-block",
                                "type-linear", "group", "group-linear", "group-max", "group-max-linear", "group-sched")
#: The sweep space: every score, either direction, every scale (90 names).
ALL_MAPPINGS: tuple[str, ...] = tuple(
    base + rev + scale for base in SCORE_NAMES for rev in ("", REVERSED_SUFFIX) for scale in SCALES
)
#: Mappings whose budget is a non-decreasing function of alpha alone (before reversal).
MONOTONE_MAPPINGS: tuple[str, ...] = tuple(
    base + scale for base in ("linear", "log", "clip", "rank") for scale in ("", KEPT_SUFFIX, ABS_SUFFIX)
)


def enable() -> tuple[str, ...]:
    """Register the sweep space with :mod:`acttail_export.allocation` (idempotent); returns ``ALL_MAPPINGS``."""
    allocation.register_research_mappings(RESEARCH_SCORES, ALL_MAPPINGS)
    logger.debug("research mappings enabled (%d)", len(ALL_MAPPINGS))
    return ALL_MAPPINGS
