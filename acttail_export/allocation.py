"""Per-projection sparsity budgets: from HT-SR alphas (``htsr``), uniform, or TEAL's greedy search.

``acttail`` (the default) is a method per target level and mode (``config.DEFAULT_POLICY``, resolved by
``config.resolve_allocation``): ``teal-greedy`` up to 65 %, then in top-k mode ``waterfill-greedy`` up to 85 % and
``htsr`` above; in threshold mode ``htsr`` up to 45 %, ``teal-greedy`` up to 65 %, ``acttail-greedy`` above.

A mapping ``<score>[-rev][-kept|-abs]`` turns the alphas into scores z_i in [0, 1] (higher z, more
sparsity; ``-rev``: 1 − z) and the scores into budgets whose parameter-weighted mean is the target s
exactly, clipped to [0, s_max] (scales: none = AlphaPruning's s·(1 − ε + 2ε z_i), normalised; ``-kept``
spreads the kept fraction; ``-abs``: s + ε'(2 z_i − 1) + c, ε' = min(ε, (1 − s)/2); docs/allocation.md).

Supported mappings (``MAPPINGS``, the evidence in docs/allocation.md): ``group-sched-rev-abs`` (the
default: input-group score, (1 − w)·group-max + w·group-linear, w = clip((s − 0.5)/0.3, 0, 1)),
``group-linear-rev-abs`` (mean alpha per input group plus the per-projection term; the default from 80 %
on), ``group-max-rev-abs`` (largest reader alpha per input group: one budget per group at every target;
the default up to 50 %) and ``block-abs`` (mean alpha per layer: ``acttail-greedy``'s block targets).

The ~90-mapping sweep space is :mod:`acttail_export._research_mappings`; its ``enable()`` registers it
(:func:`register_research_mappings`) for benchmarks; :func:`check_mapping` (CLI, options) takes ``MAPPINGS`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .config import (
    ALPHA_ALLOCATIONS,
    DEFAULT_S_MAX,
    GREEDY_ALLOCATIONS,
    SHARED_INPUT_GROUPS,
    ActTailConfig,
    ProjectionConfig,
    check_epsilon,
    check_sparsity,
    resolve_allocation,
    topk_keep,
)
from .errors import ActTailError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_EPSILON", "DEFAULT_MAPPING", "MAPPINGS", "SCHEDULE_RANGE", "ScoreFn", "allocate", "block_targets",
           "build_config", "check_mapping", "greedy_levels", "needs_alphas", "needs_search", "parse_mapping",
           "register_research_mappings", "schedule_weight", "scores", "uniform"]

ScoreFn = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]


def _minmax(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min()) if values.size else 0.0
    return np.full(values.shape, 0.5) if span <= 0 else (values - values.min()) / span


def _group_mean_score(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(groups, return_inverse=True)
    means = np.array([values[inverse == g].mean() for g in range(unique.size)])
    return _minmax(means)[inverse]


def _need(groups: np.ndarray | None, what: str, mapping: str) -> np.ndarray:
    if groups is None:
        raise ActTailError(f"mapping {mapping!r} needs the projection {what}; pass {what}= to allocate()")
    return groups


def _input_groups(kinds: np.ndarray) -> np.ndarray:
    group_of = {kind: index for index, group in enumerate(SHARED_INPUT_GROUPS) for kind in group}
    return np.array([group_of[str(k)] for k in kinds])


def _score_linear(a, kinds, layers):
    return _minmax(a)


def _score_block(a, kinds, layers):
    return _group_mean_score(a, _need(layers, "layers", "block"))


def _score_group(a, kinds, layers):
    return _group_mean_score(a, _input_groups(_need(kinds, "kinds", "group")))


def _score_group_max(a, kinds, layers):
    """Per layer, the largest alpha among the projections reading one input (its most perturbation-passing
    reader); averaged over layers per input group; min-max over the four groups."""
    groups = _input_groups(_need(kinds, "kinds", "group-max"))
    layers = _need(layers, "layers", "group-max")
    reader_max = np.empty(a.shape)
    for key in set(zip(groups.tolist(), np.asarray(layers).tolist())):
        mask = (groups == key[0]) & (layers == key[1])
        reader_max[mask] = a[mask].max()
    return _group_mean_score(reader_max, groups)


def _score_group_linear(a, kinds, layers):
    return 0.5 * (_score_group(a, kinds, layers) + _score_linear(a, kinds, layers))


#: ``group-sched``: weight of ``group-linear`` (vs ``group-max``) rises linearly from 0 at the first
#: target to 1 at the second (docs/allocation.md: the input groups' relative cost changes with the target).
SCHEDULE_RANGE = (0.5, 0.8)


def schedule_weight(target: float) -> float:
    """w(s) = clip((s − s_lo) / (s_hi − s_lo), 0, 1): ``group-sched`` = (1 − w)·group-max + w·group-linear."""
    lo, hi = SCHEDULE_RANGE
    return float(np.clip((target - lo) / (hi - lo), 0.0, 1.0))


def _score_group_sched(a, kinds, layers, target):
    w = schedule_weight(target)
    return (1.0 - w) * _score_group_max(a, kinds, layers) + w * _score_group_linear(a, kinds, layers)


#: Scores of the supported mappings (research scores join through :func:`register_research_mappings`).
_SCORES: dict[str, ScoreFn] = {
    "block": _score_block,
    "group-max": _score_group_max,
    "group-linear": _score_group_linear,
    "group-sched": _score_group_sched,
}
#: Scores that depend on the target sparsity as well as the alphas.
TARGET_SCORES = ("group-sched",)
REVERSED_SUFFIX = "-rev"
KEPT_SUFFIX = "-kept"
ABS_SUFFIX = "-abs"
SCALES = ("", KEPT_SUFFIX, ABS_SUFFIX)

DEFAULT_MAPPING = "group-sched-rev-abs"
DEFAULT_EPSILON = 0.1
#: The supported mappings: the default and the alternatives docs/allocation.md recommends.
MAPPINGS: tuple[str, ...] = (DEFAULT_MAPPING, "group-linear-rev-abs", "group-max-rev-abs", "block-abs")

#: ``-abs`` scale: the spread never exceeds this fraction of the uniform kept fraction 1 − s.
ABS_MAX_KEPT_CUT = 0.5

#: Research mappings made known by :func:`register_research_mappings` (never accepted by :func:`check_mapping`).
_RESEARCH_SCORES: dict[str, ScoreFn] = {}
_RESEARCH_MAPPINGS: set[str] = set()


def _split(mapping: str) -> tuple[str, bool, str]:
    """``<score>[-rev][-kept|-abs]`` -> (score name, reversed, scale: "sparsity" | "kept" | "abs"); no lookup."""
    scale = "sparsity"
    for suffix, name in ((KEPT_SUFFIX, "kept"), (ABS_SUFFIX, "abs")):
        if mapping.endswith(suffix):
            mapping, scale = mapping[: -len(suffix)], name
    reverse = mapping.endswith(REVERSED_SUFFIX)
    if reverse:
        mapping = mapping[: -len(REVERSED_SUFFIX)]
    return mapping, reverse, scale


def register_research_mappings(score_fns: dict[str, ScoreFn], mappings: Iterable[str]) -> None:
    """Research hook (benchmarks, studies): make ``mappings`` known to :func:`scores`, :func:`allocate` and
    :func:`build_config`, with the extra ``score_fns`` they name. :func:`check_mapping` does not change."""
    known = {**_SCORES, **_RESEARCH_SCORES, **score_fns}
    mappings = tuple(mappings)
    unknown = [m for m in mappings if _split(m)[0] not in known]
    if unknown:
        raise ActTailError(f"research mapping {unknown[0]!r} names no registered score")
    _RESEARCH_SCORES.update(score_fns)
    _RESEARCH_MAPPINGS.update(mappings)


def check_mapping(mapping: str, flag: str = "mapping") -> str:
    """``mapping`` if it is a supported mapping (``MAPPINGS``), else a one-line ActTailError listing them."""
    if mapping not in MAPPINGS:
        raise ActTailError(f"{flag} must be one of {', '.join(MAPPINGS)}; got {mapping!r}")
    return mapping


def _resolve(mapping: str) -> str:
    """A supported mapping, or a research one registered through :func:`register_research_mappings`."""
    return mapping if mapping in _RESEARCH_MAPPINGS else check_mapping(mapping)


def parse_mapping(mapping: str) -> tuple[str, bool, str]:
    """``<score>[-rev][-kept|-abs]`` -> (score name, reversed, scale: "sparsity" | "kept" | "abs")."""
    return _split(_resolve(mapping))


def _score_fn(base: str) -> ScoreFn:
    return _SCORES[base] if base in _SCORES else _RESEARCH_SCORES[base]


def scores(alphas: np.ndarray, mapping: str, kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None,
           target: float | None = None) -> np.ndarray:
    """Score z_i in [0, 1] of every projection under ``mapping`` (reversal applied); higher z, more sparsity.

    ``target`` (the target sparsity) is needed by the scores in ``TARGET_SCORES`` only."""
    base, reverse, _ = parse_mapping(mapping)
    args = (np.asarray(alphas, dtype=np.float64), None if kinds is None else np.asarray(kinds),
            None if layers is None else np.asarray(layers))
    if base in TARGET_SCORES:
        if target is None:
            raise ActTailError(f"mapping {mapping!r} needs the target sparsity; pass target= to scores()")
        z = _score_fn(base)(*args, target)
    else:
        z = _score_fn(base)(*args)
    return 1.0 - z if reverse else z


def _bisect(mass, total: float, a: float, b: float, relative: bool) -> float:
    """Midpoint of the bracket [a, b] narrowed until mass(c) crosses total (mass non-decreasing in c)."""
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mass(mid) < total:
            a = mid
        else:
            b = mid
        if b - a <= 1e-15 * (b if relative else 1.0):
            break
    return 0.5 * (a + b)


def _solve_shifted(base: np.ndarray, params: np.ndarray, total: float, lo: float, hi: float) -> np.ndarray:
    """v_i = clip(base_i + c, lo, hi) with Σ P_i v_i = total (bisection on c, then exact on the free set)."""
    def mass(c: float) -> float:
        return float((params * np.clip(base + c, lo, hi)).sum())

    # mass(a) = lo·ΣP, mass(b) = hi·ΣP
    c = _bisect(mass, total, lo - float(base.max()), hi - float(base.min()), relative=False)
    raw = base + c
    free = (raw > lo) & (raw < hi)
    if free.any():
        fixed = (params[~free] * np.clip(raw[~free], lo, hi)).sum()
        c_exact = (total - fixed - (params[free] * base[free]).sum()) / params[free].sum()
        if np.all((base[free] + c_exact >= lo) & (base[free] + c_exact <= hi)):
            c = c_exact
    return np.clip(base + c, lo, hi)


def _solve_clipped(ratios: np.ndarray, params: np.ndarray, total: float, lo: float, hi: float) -> np.ndarray:
    """v_i = clip(c · r_i, lo, hi) with Σ P_i v_i = total (requires lo·ΣP <= total <= hi·ΣP).

    Σ P clip(c r, lo, hi) is continuous and non-decreasing in c; c is bracketed by bisection, then
    the projections clipped at that c are fixed and c is re-solved exactly for the free ones.
    """
    def mass(c: float) -> float:
        return float((params * np.clip(c * ratios, lo, hi)).sum())

    # mass(a) = lo·ΣP <= total <= hi·ΣP = mass(b)
    c = _bisect(mass, total, 0.0, hi / float(ratios.min()), relative=True)
    for _ in range(ratios.size + 1):  # exact solve on the free set; repeat if it moves a boundary
        raw = c * ratios
        low, high = raw <= lo, raw >= hi
        free = ~(low | high)
        if not free.any():
            break
        rest = total - lo * params[low].sum() - hi * params[high].sum()
        c_new = rest / float((params[free] * ratios[free]).sum())
        v = c_new * ratios
        if np.all((v[free] >= lo - 1e-15) & (v[free] <= hi + 1e-15)):
            c = c_new
            break
        c = c_new
    return np.clip(c * ratios, lo, hi)


def allocate(
    alphas: np.ndarray,
    params: np.ndarray,
    target: float,
    epsilon: float,
    mapping: str,
    s_max: float = DEFAULT_S_MAX,
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
    z = scores(alphas, mapping, kinds, layers, target)
    if target == 0.0:
        return np.zeros(alphas.size)
    scale = parse_mapping(mapping)[2]
    if scale == "abs":  # additive: s_i = s + ε'(2 z_i − 1) + c, ε' = min(ε, ABS_MAX_KEPT_CUT·(1 − s))
        spread = min(epsilon, ABS_MAX_KEPT_CUT * (1.0 - target))
        return _solve_shifted(target + spread * (2.0 * z - 1.0), params, target * params.sum(), 0.0, s_max)
    if scale == "kept":  # kept-fraction scale: more sparsity = fewer kept channels
        kept = _solve_clipped(1.0 + epsilon - 2.0 * epsilon * z, params, (1.0 - target) * params.sum(), 1.0 - s_max, 1.0)
        return 1.0 - kept
    return _solve_clipped(1.0 - epsilon + 2.0 * epsilon * z, params, target * params.sum(), 0.0, s_max)


def uniform(params: np.ndarray, target: float) -> np.ndarray:
    """The same budget ``target`` for every projection."""
    return np.full(np.asarray(params).size, check_sparsity(target, "target sparsity"))


def _greedy_budgets(model, projections, budgets, params, layers, trajectories, allocation: str, method: str,
                    target: float) -> np.ndarray:
    """Greedy budgets of ``method`` (``allocation`` resolved at ``target``) with each block's target = the
    parameter-weighted mean of ``budgets`` in that block (``waterfill-greedy``: the block levels of
    :func:`greedy.waterfill_levels` instead)."""
    from .greedy import greedy_budgets, waterfill_levels

    if trajectories is None:
        raise ActTailError(f"allocation {allocation!r} at {target:g} runs the greedy search (calibration text): pass "
                           "trajectories=greedy.search_for(model, tokenizer, allocation, [target], mode, data), or use "
                           "allocation='htsr' for budgets from the alphas alone")
    if hasattr(trajectories, "for_method"):  # search_for's result: the search this method runs
        trajectories = trajectories.for_method(method)
    waterfill = method == "waterfill-greedy"
    targets = waterfill_levels(model, trajectories, target) if waterfill else block_targets(budgets, params, layers)
    by_name = greedy_budgets(model, trajectories, targets)
    return np.array([by_name[name] for name, *_ in projections])


def block_targets(budgets: np.ndarray, params: np.ndarray, layers: Sequence[int]) -> list[float]:
    """Parameter-weighted mean budget of every layer (the greedy search's level per block)."""
    layers = np.asarray(layers)
    return [float((params[layers == i] * budgets[layers == i]).sum() / params[layers == i].sum())
            for i in range(int(layers.max()) + 1)]


def needs_alphas(allocation: str, sparsities: Sequence[float], mode: str) -> bool:
    """Whether ``allocation`` reads HT-SR alphas at any of ``sparsities`` in ``mode`` (``spectral.analyze_model`` first)."""
    return any(resolve_allocation(allocation, s, mode) in ALPHA_ALLOCATIONS for s in sparsities)


def needs_search(allocation: str, sparsities: Sequence[float], mode: str) -> bool:
    """Whether ``allocation`` reads the greedy search at any of ``sparsities`` in ``mode`` (``greedy.search_for`` first)."""
    return any(resolve_allocation(allocation, s, mode) in GREEDY_ALLOCATIONS for s in sparsities)


def greedy_levels(model, allocation: str, sparsities: Sequence[float], mode: str, epsilon: float | None = None,
                  mapping: str | None = None, s_max: float = DEFAULT_S_MAX, fits: dict | None = None) -> list[float]:
    """Per block, the highest level the greedy search must reach for ``allocation`` at every target in ``sparsities``
    in ``mode`` (0 for every block when none of them needs the search)."""
    levels = [0.0] * (max(layer for _, layer, _, _ in _projections(model)) + 1)
    for s in sparsities:
        method = resolve_allocation(allocation, s, mode)
        if method not in GREEDY_ALLOCATIONS:
            continue
        if method == "waterfill-greedy":  # every block may go up to the target plus the headroom
            from .greedy import WATERFILL_HEADROOM

            levels = [max(a, min(s + WATERFILL_HEADROOM, s_max)) for a in levels]
            continue
        config = build_config(model, s, "uniform" if method == "teal-greedy" else "htsr", epsilon=epsilon,
                              mapping=mapping if mapping else _combined_mapping() if method == "acttail-greedy" else None,
                              s_max=s_max, fits=fits)
        params = np.array([p.parameters for p in config.projections], dtype=np.float64)
        targets = block_targets(np.array([p.sparsity for p in config.projections]), params, [p.layer for p in config.projections])
        levels = [max(a, b) for a, b in zip(levels, targets)]
    return levels


def _projections(model):
    from .modeling import iter_projections

    return iter_projections(model)


def _combined_mapping() -> str:
    from .greedy import COMBINED_MAPPING

    return COMBINED_MAPPING


def build_config(
    model,
    target_sparsity: float,
    allocation: str = "acttail",
    mode: str = "topk",
    epsilon: float | None = None,
    mapping: str | None = None,
    s_max: float = DEFAULT_S_MAX,
    fits: dict | None = None,
    trajectories: dict | None = None,
) -> ActTailConfig:
    """ActTailConfig with one :class:`ProjectionConfig` per projection (alpha, budget, and k in top-k mode).

    ``allocation`` is resolved to its method at ``target_sparsity`` in ``mode`` (``config.resolve_allocation``; recorded as
    ``allocation_method``). ``uniform`` and ``teal-greedy`` record ``epsilon`` and ``mapping`` as None: neither
    shapes their budgets. ``teal-greedy`` / ``acttail-greedy`` read their budgets off ``trajectories``
    (:func:`greedy.search`); the latter first gives each block the mean of its HT-SR budgets under ``mapping``
    (default ``greedy.COMBINED_MAPPING``) as the block's target.
    """
    target_sparsity = check_sparsity(target_sparsity, "target sparsity")
    method = resolve_allocation(allocation, target_sparsity, mode)
    epsilon = DEFAULT_EPSILON if epsilon is None else check_epsilon(epsilon)
    if method == "acttail-greedy" and mapping is None:
        mapping = _combined_mapping()
    mapping = _resolve(DEFAULT_MAPPING if mapping is None else mapping)
    if method not in ALPHA_ALLOCATIONS:  # the same budget everywhere: no spread, no alpha mapping to record
        epsilon, mapping = None, None
    projections = _projections(model)
    if fits is None and method in ALPHA_ALLOCATIONS:
        from .spectral import analyze_model

        fits = analyze_model(model)
    config = ActTailConfig(target_sparsity=target_sparsity, allocation=allocation, mode=mode, epsilon=epsilon,
                           mapping=mapping, s_max=s_max, allocation_method=method)
    params = np.array([m.in_features * m.out_features for _, _, _, m in projections], dtype=np.float64)
    alphas = None
    if fits is not None:
        missing = [name for name, *_ in projections if name not in fits]
        if missing:
            raise ActTailError(f"fits lack {len(missing)} projections (e.g. {missing[0]}): fit them with spectral.analyze_model(model)")
        alphas = np.array([fits[name].alpha for name, *_ in projections])
    layers = [layer for _, layer, _, _ in projections]
    if method in ALPHA_ALLOCATIONS:
        budgets = allocate(alphas, params, target_sparsity, epsilon, mapping, s_max,
                           kinds=[k for _, _, k, _ in projections], layers=layers)
    else:
        budgets = uniform(params, target_sparsity)
    if method in GREEDY_ALLOCATIONS:
        budgets = _greedy_budgets(model, projections, budgets, params, layers, trajectories, allocation, method,
                                  target_sparsity)
    for (name, layer, kind, module), s, i in zip(projections, budgets, range(len(projections))):
        config.projections.append(ProjectionConfig(
            name=name, layer=layer, kind=kind, in_features=module.in_features, out_features=module.out_features,
            sparsity=float(s), alpha=None if alphas is None else float(alphas[i]),
            k=topk_keep(float(s), module.in_features) if mode == "topk" else None,
        ))
    config.architecture = type(model).__name__
    config.model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    logger.info("%s allocation (%s): target %.3f, weighted %.6f, budgets %.3f..%.3f", allocation, method, target_sparsity,
                config.weighted_sparsity(), float(budgets.min()), float(budgets.max()))
    return config
