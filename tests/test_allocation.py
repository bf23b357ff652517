"""Sparsity allocation: property tests (hypothesis), reference formulas, build_config, analyze command.

The supported mappings (``allocation.MAPPINGS``) are tested as they are; the research sweep space
(``_research_mappings.ALL_MAPPINGS``) after its explicit ``enable()``, which the CLI never calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acttail_export import _research_mappings as research
from acttail_export import allocation
from acttail_export.allocation import MAPPINGS, allocate, build_config, scores
from acttail_export.config import PROJECTION_KINDS, SHARED_INPUT_GROUPS, ActTailConfig, topk_keep
from acttail_export.errors import ActTailError

ALL_MAPPINGS = research.enable()  # the sweep space, registered for the library functions of this process
MONOTONE_MAPPINGS = research.MONOTONE_MAPPINGS


@st.composite
def problems(draw, min_size=2, max_size=40):
    """Random (alphas, params, kinds, layers, target, epsilon, s_max)."""
    n = draw(st.integers(min_size, max_size))
    alphas = np.array(draw(st.lists(st.floats(1.05, 30.0), min_size=n, max_size=n)))
    params = np.array(draw(st.lists(st.integers(16, 10_000_000), min_size=n, max_size=n)), dtype=np.float64)
    kinds = [PROJECTION_KINDS[i % len(PROJECTION_KINDS)] for i in range(n)]
    layers = [i // len(PROJECTION_KINDS) for i in range(n)]
    s_max = draw(st.floats(0.5, 0.99))
    target = draw(st.floats(0.0, s_max))
    epsilon = draw(st.floats(0.0, 0.99))
    return alphas, params, kinds, layers, target, epsilon, s_max


def _weighted(s, params):
    return float((s * params).sum() / params.sum())


@pytest.mark.parametrize("mapping", MAPPINGS)
@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_supported_mappings_weighted_mean_exact_and_bounds(problem, mapping):
    alphas, params, kinds, layers, target, epsilon, s_max = problem
    s = allocate(alphas, params, target, epsilon, mapping, s_max, kinds=kinds, layers=layers)
    assert abs(_weighted(s, params) - target) < 1e-6
    assert np.all(s >= 0) and np.all(s <= s_max + 1e-12)
    # -abs: every budget within ε' = min(ε, (1 − s)/2) of the target before the shift c, so the spread is <= 2ε'
    assert np.ptp(s) <= 2 * min(epsilon, allocation.ABS_MAX_KEPT_CUT * (1 - target)) + 1e-9


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(ALL_MAPPINGS))
def test_weighted_mean_exact_and_bounds(problem, mapping):
    alphas, params, kinds, layers, target, epsilon, s_max = problem
    s = allocate(alphas, params, target, epsilon, mapping, s_max, kinds=kinds, layers=layers)
    assert s.shape == alphas.shape
    assert abs(_weighted(s, params) - target) < 1e-6
    assert np.all(s >= 0) and np.all(s <= s_max + 1e-12)


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(MONOTONE_MAPPINGS))
def test_monotone_in_alpha(problem, mapping):
    alphas, params, kinds, layers, target, epsilon, s_max = problem
    order = np.argsort(alphas)
    forward = allocate(alphas, params, target, epsilon, mapping, s_max)[order]
    suffix = next((x for x in ("-kept", "-abs") if mapping.endswith(x)), "")
    reversed_name = mapping[: len(mapping) - len(suffix)] + "-rev" + suffix
    reverse = allocate(alphas, params, target, epsilon, reversed_name, s_max)[order]
    assert np.all(np.diff(forward) >= -1e-12)  # AlphaPruning direction: larger alpha, larger sparsity
    assert np.all(np.diff(reverse) <= 1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(min_size=14), st.sampled_from(["per-type", "type-rank"]))
def test_per_type_monotone_within_kind(problem, mapping):
    alphas, params, kinds, layers, target, epsilon, s_max = problem
    s = allocate(alphas, params, target, epsilon, mapping, s_max, kinds=kinds, layers=layers)
    for kind in set(kinds):
        mask = np.array(kinds) == kind
        order = np.argsort(alphas[mask])
        assert np.all(np.diff(s[mask][order]) >= -1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(min_size=14))
def test_block_and_type_share_one_budget_per_group(problem):
    alphas, params, kinds, layers, target, epsilon, s_max = problem
    block = allocate(alphas, params, target, epsilon, "block", s_max, kinds=kinds, layers=layers)
    kind = allocate(alphas, params, target, epsilon, "type-rev", s_max, kinds=kinds, layers=layers)
    for layer in set(layers):
        values = block[np.array(layers) == layer]
        assert np.ptp(values) < 1e-12
    for k in set(kinds):
        assert np.ptp(kind[np.array(kinds) == k]) < 1e-12
    for mapping in ("group-rev-kept", "group-max-rev-abs", "group-max"):
        group = allocate(alphas, params, target, epsilon, mapping, s_max, kinds=kinds, layers=layers)
        for members in SHARED_INPUT_GROUPS:
            assert np.ptp(group[np.isin(kinds, members)]) < 1e-12


@settings(max_examples=40, deadline=None)
@given(problems(min_size=14))
def test_block_abs_one_budget_per_layer_monotone_in_layer_mean_alpha(problem):
    """``block-abs`` (acttail-greedy's block targets): one budget per layer, non-decreasing in the layer's mean
    alpha (AlphaPruning's direction)."""
    alphas, params, kinds, layers, target, epsilon, s_max = problem
    s = allocate(alphas, params, target, epsilon, "block-abs", s_max, kinds=kinds, layers=layers)
    layers = np.array(layers)
    means, budgets = [], []
    for layer in np.unique(layers):
        assert np.ptp(s[layers == layer]) < 1e-12
        means.append(alphas[layers == layer].mean())
        budgets.append(s[layers == layer][0])
    order = np.argsort(means)
    assert np.all(np.diff(np.array(budgets)[order]) >= -1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(MAPPINGS + ALL_MAPPINGS))
def test_epsilon_zero_is_uniform(problem, mapping):
    alphas, params, kinds, layers, target, _, s_max = problem
    s = allocate(alphas, params, target, 0.0, mapping, s_max, kinds=kinds, layers=layers)
    np.testing.assert_allclose(s, target, rtol=0, atol=1e-12)


def test_alphapruning_linear_reference():
    """Unclipped budgets equal the closed form s·r_i·ΣP/Σ(P r) with the AlphaPruning min-max ratio."""
    alphas = np.array([2.0, 3.0, 4.5, 8.0, 5.0])
    params = np.array([100.0, 300.0, 200.0, 50.0, 350.0])
    eps, target = 0.2, 0.5
    r = (alphas - alphas.min()) / (alphas.max() - alphas.min()) * 2 * eps + 1 - eps
    expected = target * r * params.sum() / (params * r).sum()
    np.testing.assert_allclose(allocate(alphas, params, target, eps, "linear"), expected, rtol=1e-12)
    r_rev = 2 - r  # reversed: z -> 1 - z
    want = target * r_rev * params.sum() / (params * r_rev).sum()
    np.testing.assert_allclose(allocate(alphas, params, target, eps, "linear-rev"), want, rtol=1e-12)


def test_kept_scale_reference():
    """Unclipped kept-scale budgets: 1 − s_i = (1 − s)·k_i·ΣP/Σ(P k) with k_i = 1 + ε − 2ε z_i."""
    alphas = np.array([2.0, 3.0, 4.5, 8.0, 5.0])
    params = np.array([100.0, 300.0, 200.0, 50.0, 350.0])
    eps, target = 0.3, 0.8
    z = np.log(alphas / 2.0) / np.log(4.0)
    for name, zz in (("log-kept", z), ("log-rev-kept", 1 - z)):
        k = 1 + eps - 2 * eps * zz
        expected = 1 - (1 - target) * k * params.sum() / (params * k).sum()
        np.testing.assert_allclose(allocate(alphas, params, target, eps, name), expected, rtol=1e-12)


def test_abs_scale_reference():
    """Unclipped additive budgets: s_i = s + ε(2 z_i − 1) − Σ P ε(2z − 1) / ΣP."""
    alphas = np.array([2.0, 3.0, 4.5, 8.0, 5.0])
    params = np.array([100.0, 300.0, 200.0, 50.0, 350.0])
    eps, target = 0.1, 0.6
    z = 1 - (alphas - 2.0) / 6.0  # linear-rev
    offset = eps * (2 * z - 1)
    expected = target + offset - (params * offset).sum() / params.sum()
    np.testing.assert_allclose(allocate(alphas, params, target, eps, "linear-rev-abs"), expected, rtol=1e-12)
    high = allocate(alphas, params, 0.9, eps, "linear-rev-abs", s_max=0.99)  # spread capped at (1 − s)/2
    np.testing.assert_allclose(np.ptp(high), 2 * 0.05, rtol=1e-9)


def test_clipping_redistributes_proportionally():
    alphas = np.array([1.5, 2.0, 3.0, 10.0])
    params = np.array([1.0, 1.0, 1.0, 1.0])
    s = allocate(alphas, params, 0.9, 0.9, "linear", s_max=0.95)
    assert s[-1] == pytest.approx(0.95) and abs(s.mean() - 0.9) < 1e-12
    r = 1 - 0.9 + 1.8 * (alphas - 1.5) / 8.5
    free = s < 0.95 - 1e-12
    ratios = s[free] / r[free]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)  # unclipped keep the r_i proportions


def test_score_definitions():
    alphas = np.array([2.0, 4.0, 4.0, 16.0])
    np.testing.assert_allclose(scores(alphas, "log"), [0, 1 / 3, 1 / 3, 1])  # ln 2, ln 4, ln 16
    np.testing.assert_allclose(scores(alphas, "rank"), [0, 0.5, 0.5, 1])  # ties share their mean rank
    np.testing.assert_allclose(scores(alphas, "clip"), [0, 0.5, 0.5, 1])  # 16 clipped to 6
    np.testing.assert_allclose(scores(alphas, "linear-rev"), 1 - (alphas - 2) / 14)
    kinds, layers = ["q_proj", "q_proj", "v_proj", "v_proj"], [0, 1, 0, 1]
    np.testing.assert_allclose(scores(alphas, "per-type", kinds), [0, 1, 0, 1])
    np.testing.assert_allclose(scores(alphas, "block", layers=layers), [0, 1, 0, 1])  # layer means 3 and 10
    np.testing.assert_allclose(scores(alphas, "type", kinds), [0, 0, 1, 1])
    np.testing.assert_allclose(scores(alphas, "type-block", kinds, layers), [0, 0.5, 0.5, 1])
    np.testing.assert_allclose(scores(alphas, "type-linear", kinds, layers), [0, 1 / 14, 0.5 + 1 / 14, 1])
    group_kinds = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # groups qkv, qkv, gate/up, down
    np.testing.assert_allclose(scores(alphas, "group", group_kinds), [0, 0, 1 / 13, 1])  # group means 3, 3, 4, 16
    # group-max: per layer the largest alpha of an input's readers, averaged over layers, min-max over groups
    six = np.array([2.0, 6.0, 8.0, 3.0, 4.0, 7.0])
    six_kinds = ["q_proj", "v_proj", "q_proj", "v_proj", "down_proj", "down_proj"]
    six_layers = [0, 0, 1, 1, 0, 1]  # q/k/v input: max 6 (layer 0), 8 (layer 1) -> 7; down input: 4, 7 -> 5.5
    np.testing.assert_allclose(scores(six, "group-max", six_kinds, six_layers), [1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(scores(six, "group-max-rev-abs", six_kinds, six_layers), [0, 0, 0, 0, 1, 1])
    np.testing.assert_allclose(scores(six, "group", six_kinds), [0, 0, 0, 0, 1, 1])  # plain means: 4.75 vs 5.5
    # group-sched: group-max at s <= 0.5, group-linear at s >= 0.8, linear blend between
    gmax, glin = scores(six, "group-max", six_kinds, six_layers), scores(six, "group-linear", six_kinds, six_layers)
    for target, w in ((0.0, 0.0), (0.5, 0.0), (0.6, 1 / 3), (0.65, 0.5), (0.8, 1.0), (0.95, 1.0)):
        assert allocation.schedule_weight(target) == pytest.approx(w)
        np.testing.assert_allclose(scores(six, "group-sched", six_kinds, six_layers, target=target), (1 - w) * gmax + w * glin)
        np.testing.assert_allclose(scores(six, "group-sched-rev", six_kinds, six_layers, target=target), 1 - ((1 - w) * gmax + w * glin))
    with pytest.raises(ActTailError, match="needs the target sparsity"):
        scores(six, "group-sched", six_kinds, six_layers)


def test_group_sched_equals_its_endpoints():
    """The scheduled default is group-max-rev-abs at 50 % and group-linear-rev-abs from 80 % on (same budgets)."""
    rng = np.random.default_rng(0)
    kinds = list(PROJECTION_KINDS) * 4
    layers = [i // len(PROJECTION_KINDS) for i in range(len(kinds))]
    alphas, params = rng.uniform(2, 20, len(kinds)), rng.integers(100, 1000, len(kinds)).astype(float)
    for target, twin in ((0.3, "group-max-rev-abs"), (0.5, "group-max-rev-abs"), (0.8, "group-linear-rev-abs"), (0.9, "group-linear-rev-abs")):
        np.testing.assert_allclose(allocate(alphas, params, target, 0.1, "group-sched-rev-abs", kinds=kinds, layers=layers),
                                   allocate(alphas, params, target, 0.1, twin, kinds=kinds, layers=layers), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target=0.995), "exceeds s_max"),
    (dict(mapping="nope"), "mapping must be one of"),
    (dict(alphas=np.array([1.0, -2.0])), "positive"),
    (dict(params=np.array([1.0])), "equal length"),
    (dict(epsilon=1.0), "epsilon"),
    (dict(mapping="per-type"), "needs the projection kinds"),
    (dict(mapping="block"), "needs the projection layers"),
    (dict(mapping="group-max"), "needs the projection kinds"),
    (dict(mapping="group-max", kinds=["q_proj", "o_proj"]), "needs the projection layers"),
])
def test_allocate_errors(kwargs, match):
    args = dict(alphas=np.array([2.0, 3.0]), params=np.array([1.0, 2.0]), target=0.5, epsilon=0.3, mapping="linear")
    args.update(kwargs)
    with pytest.raises(ActTailError, match=match):
        allocate(**args)


# --- supported mappings vs the research registry ----------------------------------------------
def test_supported_mappings_are_a_few_of_the_sweep_space():
    from acttail_export.greedy import COMBINED_MAPPING

    assert allocation.DEFAULT_MAPPING in MAPPINGS and COMBINED_MAPPING in MAPPINGS  # both reachable from the CLI
    assert set(MAPPINGS) <= set(ALL_MAPPINGS) and 2 <= len(MAPPINGS) <= 4 < len(ALL_MAPPINGS)
    assert set(allocation.__all__) <= set(dir(allocation))


@pytest.mark.parametrize("mapping", ["linear", "log-rev-kept", "group-rev-kept"])
def test_check_mapping_refuses_research_mappings_even_when_enabled(mapping):
    assert mapping in ALL_MAPPINGS  # registered in this process, so allocate() takes it ...
    assert allocate(np.array([2.0, 5.0]), np.array([1.0, 3.0]), 0.5, 0.1, mapping, kinds=["q_proj", "o_proj"]).size == 2
    with pytest.raises(ActTailError, match=f"^--mapping must be one of {', '.join(MAPPINGS)}; got '{mapping}'$"):
        allocation.check_mapping(mapping, "--mapping")  # ... but the CLI's check does not


def test_research_mappings_need_the_registry(monkeypatch):
    """Without ``_research_mappings.enable()`` the library knows the supported mappings only."""
    monkeypatch.setattr(allocation, "_RESEARCH_MAPPINGS", set())
    alphas, params = np.array([2.0, 5.0, 9.0]), np.array([1.0, 2.0, 3.0])
    with pytest.raises(ActTailError, match="mapping must be one of"):
        allocate(alphas, params, 0.5, 0.1, "linear")
    kinds, layers = ["q_proj", "o_proj", "down_proj"], [0, 0, 1]
    for mapping in MAPPINGS:
        budgets = allocate(alphas, params, 0.5, 0.1, mapping, kinds=kinds, layers=layers)
        assert abs(_weighted(budgets, params) - 0.5) < 1e-9


def test_register_research_mappings_needs_a_known_score():
    with pytest.raises(ActTailError, match="names no registered score"):
        allocation.register_research_mappings({}, ["no-such-score-rev-abs"])


@pytest.mark.parametrize("command", ["analyze", "evaluate", "export"])
def test_cli_refuses_a_research_mapping(command, tiny_llama_dir, wikitext_test, tmp_path, capsys):
    """Every command's --mapping takes the supported mappings only: one line on stderr, exit 2, nothing written."""
    from acttail_export.cli import main

    out = tmp_path / "out"
    argv = {"analyze": ["analyze", "--model", str(tiny_llama_dir), "--json", str(tmp_path / "a.json"), "--no-progress"],
            "evaluate": ["evaluate", "--model", str(tiny_llama_dir), "--data", str(wikitext_test), "--json",
                         str(tmp_path / "e.json"), "--no-progress"],
            "export": ["export", "--model", str(tiny_llama_dir), str(out)]}[command]
    assert main([*argv, "--mapping", "linear-rev-abs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"--mapping must be one of {', '.join(MAPPINGS)}; got 'linear-rev-abs'")
    assert list(tmp_path.iterdir()) == []


# --- build_config on a real (tiny) model -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from acttail_export.modeling import load_model
    from acttail_export.spectral import analyze_model

    model, _ = load_model(str(tiny_llama_dir))
    return model, analyze_model(model, progress=False)


@pytest.mark.parametrize("mapping", ["linear", "block-rev", *MAPPINGS])
def test_build_config_htsr(tiny, mapping, tmp_path):
    model, fits = tiny
    config = build_config(model, 0.7, "htsr", epsilon=0.4, mapping=mapping, fits=fits)
    assert isinstance(config, ActTailConfig) and len(config.projections) == 14
    assert abs(config.weighted_sparsity() - 0.7) < 1e-9
    kinds = [p.kind for p in config.projections]
    layers = [p.layer for p in config.projections]
    params = np.array([p.parameters for p in config.projections], dtype=float)
    expected = allocate(np.array([fits[p.name].alpha for p in config.projections]), params, 0.7, 0.4, mapping, kinds=kinds, layers=layers)
    np.testing.assert_allclose([p.sparsity for p in config.projections], expected, rtol=0, atol=0)
    for p in config.projections:
        assert p.alpha == fits[p.name].alpha and p.k == topk_keep(p.sparsity, p.in_features)
        assert p.in_features == model.get_submodule(p.name).in_features
    assert ActTailConfig.load(config.save(tmp_path)).to_dict() == config.to_dict()


def test_build_config_uniform_and_defaults(tiny):
    model, fits = tiny
    uniform = build_config(model, 0.5, allocation="uniform", mode="threshold")
    assert {p.sparsity for p in uniform.projections} == {0.5} and all(p.k is None for p in uniform.projections)
    default = build_config(model, 0.5, "htsr", fits=fits)
    assert (default.mapping, default.epsilon) == (allocation.DEFAULT_MAPPING, allocation.DEFAULT_EPSILON)


def test_build_config_uniform_records_no_epsilon_or_mapping(tiny, tmp_path):
    """Neither shapes uniform budgets, so neither is recorded (was: the acttail defaults 0.1 / group-sched-rev-abs)."""
    model, fits = tiny
    for kwargs in ({}, {"epsilon": 0.3, "mapping": "linear"}):
        config = build_config(model, 0.5, allocation="uniform", fits=fits, **kwargs)
        assert (config.epsilon, config.mapping) == (None, None)
        assert {p.sparsity for p in config.projections} == {0.5}
        saved = json.loads(config.save(tmp_path).read_text())
        assert (saved["epsilon"], saved["mapping"]) == (None, None)
        assert ActTailConfig.load(tmp_path).to_dict() == config.to_dict()
    acttail = build_config(model, 0.5, "htsr", epsilon=0.3, mapping="linear", fits=fits)
    assert (acttail.epsilon, acttail.mapping) == (0.3, "linear")


def test_build_config_missing_fits(tiny):
    model, fits = tiny
    partial = dict(list(fits.items())[:3])
    with pytest.raises(ActTailError, match="fits lack 11 projections"):
        build_config(model, 0.5, "htsr", fits=partial)


def test_default_policy_resolves_every_level():
    """``acttail`` is one method per level and mode (each mode's table in increasing order, ending at 1); the others
    are themselves in every mode; the mode is required and checked."""
    from acttail_export.config import ALLOCATION_METHODS, ALLOCATIONS, DEFAULT_POLICY, MODES, resolve_allocation

    assert set(DEFAULT_POLICY) == set(MODES)
    for mode, table in DEFAULT_POLICY.items():
        bounds = [bound for bound, _ in table]
        assert bounds == sorted(bounds) and bounds[-1] == 1.0
        assert {method for _, method in table} <= set(ALLOCATION_METHODS)
        assert resolve_allocation("acttail", 0.0, mode) == "uniform"  # dense: every budget 0, no alphas, no search
        for s in np.linspace(0.01, 0.99, 99):
            expected = next(method for bound, method in table if s <= bound)
            assert resolve_allocation("acttail", float(s), mode) == expected
            for name in ALLOCATIONS[1:]:
                assert resolve_allocation(name, float(s), mode) == name
    levels = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    # the measured choices (docs/allocation.md sections 6c, 6d), top-k: greedy 40-60 %, water-filled block levels
    # 70-80 %, HT-SR 90 %
    assert [resolve_allocation("acttail", s, "topk") for s in levels] == ["teal-greedy"] * 3 + ["waterfill-greedy"] * 2 + [
        "htsr"]
    # threshold (threshold_valid*.json): HT-SR at 40 %, greedy 50-60 %, the combination above (90 % included)
    assert [resolve_allocation("acttail", s, "threshold") for s in levels] == ["htsr"] + ["teal-greedy"] * 2 + [
        "acttail-greedy"] * 3
    with pytest.raises(TypeError):
        resolve_allocation("acttail", 0.5)  # the mode is required
    with pytest.raises(ActTailError, match="^mode must be one of topk, threshold; got 'dense'$"):
        resolve_allocation("acttail", 0.5, "dense")


def test_build_config_default_is_the_policy_method(tiny, tiny_llama_dir, wikitext_valid, tmp_path):
    """``build_config(..., "acttail")`` has the budgets of the method it resolves to, records both names, round-trips;
    without the search's trajectories a greedy level is one line that names the fix."""
    from acttail_export.config import resolve_allocation
    from acttail_export.greedy import search_for
    from acttail_export.modeling import load_model

    model, fits = tiny
    _, tokenizer = load_model(str(tiny_llama_dir))
    levels = [0.5, 0.7, 0.8, 0.9]
    for mode in ("topk", "threshold"):
        trajectories = search_for(model, tokenizer, "acttail", levels, mode, wikitext_valid, fits=fits, progress=False)
        for s in levels:
            method = resolve_allocation("acttail", s, mode)
            default = build_config(model, s, "acttail", mode, fits=fits, trajectories=trajectories)
            reference = build_config(model, s, method, mode, fits=fits, trajectories=trajectories)
            assert (default.allocation, default.allocation_method, default.mode) == ("acttail", method, mode)
            assert [p.sparsity for p in default.projections] == [p.sparsity for p in reference.projections]
            assert (default.epsilon, default.mapping) == (reference.epsilon, reference.mapping)
            loaded = ActTailConfig.load(default.save(tmp_path))
            assert loaded.to_dict() == default.to_dict() and loaded.allocation_method == method
    # at 90 % the mode picks the method: HT-SR in top-k mode, the combination in threshold mode
    topk = build_config(model, 0.9, "acttail", "topk", fits=fits)
    threshold = build_config(model, 0.9, "acttail", "threshold", fits=fits, trajectories=trajectories)
    assert (topk.allocation_method, threshold.allocation_method) == ("htsr", "acttail-greedy")
    assert [p.sparsity for p in topk.projections] != [p.sparsity for p in threshold.projections]
    with pytest.raises(ActTailError, match="^allocation 'acttail' at 0.9 runs the greedy search .*allocation='htsr'"):
        build_config(model, 0.9, "acttail", "threshold", fits=fits)
    with pytest.raises(ActTailError, match="^allocation 'acttail' at 0.5 runs the greedy search .*allocation='htsr'"):
        build_config(model, 0.5, "acttail", fits=fits)
    # a config written before the policy (no allocation_method) still loads
    legacy = build_config(model, 0.9, "acttail", fits=fits).to_dict()
    del legacy["allocation_method"]
    assert ActTailConfig.from_dict(legacy).allocation_method is None


def test_analyze_refuses_a_greedy_level_of_the_default(tiny_llama_dir, tmp_path, capsys):
    from acttail_export.cli import main

    assert main(["analyze", "--model", str(tiny_llama_dir), "--allocation", "acttail", "--sparsity", "0.5",
                 "--json", str(tmp_path / "a.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allocation acttail at 0.5 in threshold mode is teal-greedy" in err[0] and "--allocation htsr" in err[0]
    assert list(tmp_path.iterdir()) == []
    # at 90 % the default is HT-SR in top-k mode (analyzed here), the combination in threshold mode (refused)
    assert main(["analyze", "--model", str(tiny_llama_dir), "--allocation", "acttail", "--sparsity", "0.9", "--mode", "threshold",
                 "--json", str(tmp_path / "a.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allocation acttail at 0.9 in threshold mode is acttail-greedy" in err[0]
    assert list(tmp_path.iterdir()) == []
    assert main(["analyze", "--model", str(tiny_llama_dir), "--allocation", "acttail", "--sparsity", "0.9",
                 "--json", str(tmp_path / "a.json"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert (data["allocation"], data["allocation_method"], data["mode"]) == ("acttail", "htsr", "topk")
    assert main(["analyze", "--model", str(tiny_llama_dir), "--allocation", "htsr", "--sparsity", "0.9", "--mode", "threshold",
                 "--json", str(tmp_path / "b.json"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["mode"] == "threshold" and all(row["k"] is None for row in data["projections"])
    # no --mode: the export's default for the target (threshold at 40 %, where the default is HT-SR alone)
    assert main(["analyze", "--model", str(tiny_llama_dir), "--allocation", "acttail", "--sparsity", "0.4",
                 "--json", str(tmp_path / "c.json"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert (data["allocation_method"], data["mode"]) == ("htsr", "threshold")


# --- analyze command ---------------------------------------------------------------------------
def test_analyze_command_json_and_plot(tiny_llama_dir, tmp_path):
    from acttail_export.cli import main
    from acttail_export.modeling import load_model
    from acttail_export.spectral import analyze_model

    json_path, png_path = tmp_path / "fits.json", tmp_path / "heat.png"
    code = main(["analyze", "--model", str(tiny_llama_dir), "--json", str(json_path), "--plot", str(png_path),
                 "--sparsity", "0.6", "--epsilon", "0.3", "--mapping", "group-linear-rev-abs"])
    assert code == 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
    data = json.loads(json_path.read_text())
    model, _ = load_model(str(tiny_llama_dir))
    fits = analyze_model(model, progress=False)
    config = build_config(model, 0.6, "htsr", epsilon=0.3, mapping="group-linear-rev-abs", fits=fits)
    rows = {row["name"]: row for row in data["projections"]}
    assert list(rows) == list(fits)
    for p in config.projections:
        assert rows[p.name]["alpha"] == fits[p.name].alpha
        assert rows[p.name]["x_min"] == fits[p.name].x_min
        assert rows[p.name]["sparsity"] == p.sparsity
    assert data["weighted_sparsity"] == pytest.approx(0.6, abs=1e-9)


@pytest.mark.parametrize("argv,match", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--mapping", "bogus"], "--mapping must be one of"),
    (["--epsilon", "x"], "epsilon"),
    (["--plot", "/nonexistent-dir/x.png"], "folder"),
])
def test_analyze_command_errors(tiny_llama_dir, argv, match, capsys):
    from acttail_export.cli import main

    assert main(["analyze", "--model", str(tiny_llama_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and len(err.strip().splitlines()) == 1
    assert match in err


def test_analyze_command_uniform(tiny_llama_dir, tmp_path, capsys):
    from acttail_export.cli import main

    json_path, png_path = tmp_path / "u.json", tmp_path / "u.png"
    assert main(["analyze", "--model", str(tiny_llama_dir), "--allocation", "uniform", "--json", str(json_path),
                 "--plot", str(png_path), "--no-progress"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("allocation uniform: weighted sparsity 0.500000") and "epsilon" not in summary
    data = json.loads(json_path.read_text())
    assert (data["allocation"], data["epsilon"], data["mapping"]) == ("uniform", None, None)
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_analyze_command_smollm2_alias(tiny_llama_dir, tmp_path, monkeypatch):
    """``--model smollm2`` is the bundled model in analyze too (a stand-in replaces the 135M here)."""
    from pathlib import Path

    from acttail_export import modeling
    from acttail_export.cli import main

    monkeypatch.setattr(modeling, "default_model_path", lambda: str(tiny_llama_dir))
    json_path = tmp_path / "alias.json"
    assert main(["analyze", "--model", "smollm2", "--json", str(json_path), "--no-progress"]) == 0
    data = json.loads(json_path.read_text())
    assert Path(data["model"]).resolve() == tiny_llama_dir.resolve() and len(data["projections"]) == 14


def test_analyze_command_records_the_model_path_absolute(tiny_llama_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from acttail_export.cli import main

    monkeypatch.chdir(tiny_llama_dir.parent)
    json_path = tmp_path / "rel.json"
    assert main(["analyze", "--model", tiny_llama_dir.name, "--json", str(json_path), "--no-progress"]) == 0
    recorded = json.loads(json_path.read_text())["model"]
    assert Path(recorded).is_absolute() and Path(recorded).resolve() == tiny_llama_dir.resolve()
