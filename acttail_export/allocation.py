"""Per-projection sparsity budgets from HT-SR alphas (ActTail) or uniform.

Every mapping turns the alphas into a score ``z_i`` in [0, 1] and then a ratio

    r_i = 1 − ε + 2ε · z_i            (r_i in [1 − ε, 1 + ε]; ε = 0 gives uniform)

and the budgets ``s_i = s · r_i · ΣP / Σ_j P_j r_j`` (P = parameter count), so the
parameter-weighted mean budget equals the target ``s`` exactly. Budgets are clipped to
[0, s_max] and the remainder redistributed over the unclipped projections (proportionally to
r_i) until the weighted mean is exact again.

Scores (``MAPPINGS`` = ``<score>[-rev][-kept|-abs]``; ``-rev`` reverses the direction, z → 1 − z):

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
* ``type-linear`` — mean of the ``type`` and ``linear`` scores (a per-kind and a per-projection term).
* ``group``    — alpha averaged over each *input group* (projections that read the same activation:
  q/k/v, o, gate/up, down; ``config.SHARED_INPUT_GROUPS``), min-max over the four groups. Projections
  of a group get the same budget, so q/k/v (and gate/up) keep the same channels of their shared input.
* ``group-linear`` — mean of the ``group`` and ``linear`` scores.
* ``group-max`` — per layer, the *largest* alpha among the projections reading one input (the reader
  that passes input perturbations on most: q/k/v → usually v, gate/up → usually up), averaged over the
  layers of each input group, min-max over the four groups. Reversed, it protects the q/k/v and
  gate/up inputs (read by v_proj / up_proj, the light-tailed matrices) and sparsifies the o and down
  inputs (single readers with mid-range alphas).
* ``group-max-linear`` — mean of the ``group-max`` and ``linear`` scores.
* ``group-sched`` — depends on the target s: ``(1 − w)·group-max + w·group-linear`` with
  ``w = clip((s − 0.5) / 0.3, 0, 1)`` (``SCHEDULE_RANGE``): ``group-max`` at s <= 50 %,
  ``group-linear`` at s >= 80 %, a linear blend between. The validation sweep found that which input
  group is expensive changes with the target (q/k/v at 50 %, gate/up at 80 %); docs/allocation.md.

Scale (suffix ``-kept``): by default ε spreads the *sparsity* as above (AlphaPruning). With
``-kept`` it spreads the *kept fraction* instead, with the same direction (higher z, more sparsity):

    1 − s_i = (1 − s) · k_i · ΣP / Σ_j P_j k_j,    k_i = 1 + ε − 2ε · z_i,

so the kept channels of each projection vary by at most ±ε relative to uniform. At high targets
this is the gentler, symmetric choice: at s = 0.8 and ε = 0.3 the sparsity scale sends budgets to
0.99 (1 % of the channels kept, a 20× cut), the kept scale keeps between 14 % and 26 %.
Bounds are then 1 − s_max <= 1 − s_i <= 1, solved the same way.

Scale (suffix ``-abs``): additive, ``s_i = s + ε'(2 z_i − 1) + c`` with one shift c for the exact
weighted mean (then clipped to [0, s_max], c re-solved), and ``ε' = min(ε, (1 − s) / 2)``. Every
budget moves by about ±ε *percentage points* from the target whatever the target (the validation
sweep found the best kept-scale ε ≈ 0.1 / (1 − s), a constant absolute spread), but never by more
than half of the uniform kept fraction (at 90 % a ±10-point spread would keep 2 % of a
projection's channels: the top-k cliff). docs/allocation.md has the evidence.

AlphaPruning's direction (``linear``) gives heavier-tailed (smaller-alpha, better-trained)
matrices lower sparsity. See docs/allocation.md for which direction wins for activation sparsity.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from .config import (
    DEFAULT_S_MAX,
    GREEDY_ALLOCATIONS,
    SHARED_INPUT_GROUPS,
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


def _score_group(a, kinds, layers):
    kinds = _need(kinds, "kinds", "group")
    group_of = {kind: index for index, group in enumerate(SHARED_INPUT_GROUPS) for kind in group}
    return _group_mean_score(a, np.array([group_of[str(k)] for k in kinds]))


def _input_groups(kinds: np.ndarray) -> np.ndarray:
    group_of = {kind: index for index, group in enumerate(SHARED_INPUT_GROUPS) for kind in group}
    return np.array([group_of[str(k)] for k in kinds])


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


def _score_group_max_linear(a, kinds, layers):
    return 0.5 * (_score_group_max(a, kinds, layers) + _score_linear(a, kinds, layers))


def _score_type_linear(a, kinds, layers):
    return 0.5 * (_score_type(a, kinds, layers) + _score_linear(a, kinds, layers))


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
    "type-linear": _score_type_linear,
    "group": _score_group,
    "group-linear": _score_group_linear,
    "group-max": _score_group_max,
    "group-max-linear": _score_group_max_linear,
    "group-sched": _score_group_sched,
}
#: Scores that depend on the target sparsity as well as the alphas.
TARGET_SCORES = ("group-sched",)
REVERSED_SUFFIX = "-rev"
KEPT_SUFFIX = "-kept"
ABS_SUFFIX = "-abs"
SCALES = ("", KEPT_SUFFIX, ABS_SUFFIX)
MAPPINGS: tuple[str, ...] = tuple(
    base + rev + scale for base in _SCORES for rev in ("", REVERSED_SUFFIX) for scale in SCALES
)
#: Mappings whose budget is a non-decreasing function of alpha alone (before reversal).
MONOTONE_MAPPINGS: tuple[str, ...] = tuple(base + scale for base in ("linear", "log", "clip", "rank") for scale in SCALES)

#: ``-abs`` scale: the spread never exceeds this fraction of the uniform kept fraction 1 − s.
ABS_MAX_KEPT_CUT = 0.5

DEFAULT_MAPPING = "group-sched-rev-abs"
DEFAULT_EPSILON = 0.1


def check_mapping(mapping: str) -> str:
    if mapping not in MAPPINGS:
        raise ActTailError(f"mapping must be one of {', '.join(MAPPINGS)}; got {mapping!r}")
    return mapping


def parse_mapping(mapping: str) -> tuple[str, bool, str]:
    """``<score>[-rev][-kept|-abs]`` -> (score name, reversed, scale: "sparsity" | "kept" | "abs")."""
    check_mapping(mapping)
    scale = "sparsity"
    for suffix, name in ((KEPT_SUFFIX, "kept"), (ABS_SUFFIX, "abs")):
        if mapping.endswith(suffix):
            mapping, scale = mapping[: -len(suffix)], name
    reverse = mapping.endswith(REVERSED_SUFFIX)
    if reverse:
        mapping = mapping[: -len(REVERSED_SUFFIX)]
    return mapping, reverse, scale


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
        z = _SCORES[base](*args, target)
    else:
        z = _SCORES[base](*args)
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


def _greedy_budgets(model, projections, budgets, params, layers, trajectories) -> np.ndarray:
    """Greedy budgets with each block's target = the parameter-weighted mean of ``budgets`` in that block."""
    from .greedy import greedy_budgets

    if trajectories is None:
        raise ActTailError("greedy allocations need the search's trajectories: run greedy.search(model, windows, levels) first")
    by_name = greedy_budgets(model, trajectories, block_targets(budgets, params, layers))
    return np.array([by_name[name] for name, *_ in projections])


def block_targets(budgets: np.ndarray, params: np.ndarray, layers: Sequence[int]) -> list[float]:
    """Parameter-weighted mean budget of every layer (the greedy search's level per block)."""
    layers = np.asarray(layers)
    return [float((params[layers == l] * budgets[layers == l]).sum() / params[layers == l].sum())
            for l in range(int(layers.max()) + 1)]


def greedy_levels(model, allocation: str, sparsities: Sequence[float], epsilon: float | None = None,
                  mapping: str | None = None, s_max: float = DEFAULT_S_MAX, fits: dict | None = None) -> list[float]:
    """Per block, the highest level the greedy search must reach for ``allocation`` at every target in ``sparsities``."""
    levels = None
    for s in sparsities:
        config = build_config(model, s, "uniform" if allocation == "teal-greedy" else "acttail", epsilon=epsilon,
                              mapping=mapping if mapping or allocation != "acttail-greedy" else _combined_mapping(),
                              s_max=s_max, fits=fits)
        params = np.array([p.parameters for p in config.projections], dtype=np.float64)
        targets = block_targets(np.array([p.sparsity for p in config.projections]), params, [p.layer for p in config.projections])
        levels = targets if levels is None else [max(a, b) for a, b in zip(levels, targets)]
    return levels


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

    ``uniform`` and ``teal-greedy`` record ``epsilon`` and ``mapping`` as None: neither shapes their budgets.
    ``teal-greedy`` / ``acttail-greedy`` read their budgets off ``trajectories`` (:func:`greedy.search`); the
    latter first gives each block the mean of its acttail budgets under ``mapping`` (default
    ``greedy.COMBINED_MAPPING``) as the block's target.
    """
    from .modeling import iter_projections

    target_sparsity = check_sparsity(target_sparsity, "target sparsity")
    epsilon = DEFAULT_EPSILON if epsilon is None else check_epsilon(epsilon)
    if allocation == "acttail-greedy" and mapping is None:
        mapping = _combined_mapping()
    mapping = check_mapping(DEFAULT_MAPPING if mapping is None else mapping)
    if allocation in ("uniform", "teal-greedy"):  # the same budget everywhere: no spread, no alpha mapping to record
        epsilon, mapping = None, None
    projections = iter_projections(model)
    if fits is None and allocation in ("acttail", "acttail-greedy"):
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
    layers = [l for _, l, _, _ in projections]
    if allocation in ("uniform", "teal-greedy"):
        budgets = uniform(params, target_sparsity)
    else:
        budgets = allocate(alphas, params, target_sparsity, epsilon, mapping, s_max,
                           kinds=[k for _, _, k, _ in projections], layers=layers)
    if allocation in ("teal-greedy", "acttail-greedy"):
        budgets = _greedy_budgets(model, projections, budgets, params, layers, trajectories)
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
