"""TEAL-style block-wise greedy allocation (acttail_export.greedy) on a tiny random Llama."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from acttail_export import greedy
from acttail_export.config import PROJECTION_KINDS, PROJECTION_PARENT, topk_keep
from acttail_export.sparsify import mask_topk

SETTINGS = dict(step=0.02, samples=2, sequence_length=16)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    windows = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, windows


def _reference_error(layer, hidden, kwargs, sparsity, mode, dense_inputs, target) -> float:
    """Block error by a full forward of an untouched copy of the layer with the sparsify reference masks."""
    handles = []
    for kind, s in zip(PROJECTION_KINDS, sparsity):
        module = getattr(getattr(layer, PROJECTION_PARENT[kind]), kind)
        if s <= 0:
            continue
        if mode == "topk":
            k = topk_keep(float(s), module.in_features)
            handles.append(module.register_forward_pre_hook(lambda m, a, k=k: (mask_topk(a[0], k),)))
        else:
            t = float(torch.quantile(dense_inputs[kind].abs().flatten().double(), float(s)))
            handles.append(module.register_forward_pre_hook(lambda m, a, t=t: (a[0] * (a[0].abs() > t),)))
    try:
        out = layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out = out[0] if isinstance(out, tuple) else out
    return float((out - target).double().norm(dim=-1).mean())


def _dense_inputs(layer, hidden, kwargs) -> dict:
    seen, handles = {}, []
    for kind in PROJECTION_KINDS:
        module = getattr(getattr(layer, PROJECTION_PARENT[kind]), kind)
        handles.append(module.register_forward_pre_hook(lambda m, a, kind=kind: seen.__setitem__(kind, a[0].clone())))
    try:
        layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("index", [0, 1])
def test_each_step_picks_the_smallest_block_error_against_brute_force(tiny, mode, index):
    model, windows = tiny
    hidden, kwargs = greedy.block_inputs(model, windows)
    with torch.inference_mode():
        for layer in model.model.layers[:index]:
            hidden = layer(hidden, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        reference = copy.deepcopy(model.model.layers[index])
        dense = _dense_inputs(reference, hidden, kwargs)
        search = greedy.BlockSearch(model.model.layers[index], hidden, kwargs, greedy.GreedySettings(mode=mode, **SETTINGS))
        chosen_kinds = set()
        try:
            for _ in range(12):
                before = search.sparsity.copy()
                brute = []
                for i, value in search.candidates():
                    trial = before.copy()
                    trial[i] = value
                    brute.append((_reference_error(reference, hidden, kwargs, trial, mode, dense, search.target), i))
                chosen, err, errors = search.step()
                best_err, best = min(brute)
                assert chosen == best
                # the incremental path (a candidate recomputes only what its rule changes, a step refreshes only the
                # caches it affects) runs the same float32 ops as the full layer, in another grouping: every
                # candidate's error, not only the chosen one, so that a stale cache shows at the next step
                assert err == pytest.approx(best_err, rel=1e-5, abs=1e-7)
                for want, i in brute:
                    assert errors[i] == pytest.approx(want, rel=1e-5, abs=1e-7), PROJECTION_KINDS[i]
                assert np.count_nonzero(search.sparsity != before) == 1
                chosen_kinds.add(PROJECTION_KINDS[chosen])
        finally:
            search.close()
        # the refresh paths taken: attention (q/k/v), o, one MLP product (gate/up) and down
        assert len(chosen_kinds) >= 3, chosen_kinds


@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_commit_refreshes_the_caches_a_full_forward_would(tiny, mode, kind):
    """After one projection's rule is raised, ``commit`` recomputes only what that rule affects; the caches it leaves
    (residual sum, gate/up outputs, down input) equal those of a full block forward in the new state."""
    model, windows = tiny
    hidden, kwargs = greedy.block_inputs(model, windows)
    with torch.inference_mode():
        search = greedy.BlockSearch(model.model.layers[1], hidden, kwargs, greedy.GreedySettings(mode=mode, **SETTINGS))
        try:
            for i, value in enumerate([0.2, 0.3, 0.1, 0.25, 0.15, 0.3, 0.2]):  # a sparse state first
                search.sparsity[i] = value
                search.set_sparsity(i, value)
            search.forward()
            i = PROJECTION_KINDS.index(kind)
            search.sparsity[i] += 0.3
            search.set_sparsity(i, search.sparsity[i])
            search.commit()
            got = [search._mid, search._outputs["gate_proj"], search._outputs["up_proj"], search._inputs["down_proj"]]
            search.forward()
            want = [search._mid, search._outputs["gate_proj"], search._outputs["up_proj"], search._inputs["down_proj"]]
        finally:
            search.close()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [7, 64, 160])
def test_memo_masks_are_the_sparsify_masks_bit_for_bit(d):
    """A top-k mask read off the sorted |x| of a token equals ``mask_topk`` (signs of the zeros included), also for
    tokens where the k-th and (k+1)-th largest tie (those take ``mask_topk``'s own choice); threshold masks equal
    ``x * (|x| > t)``."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 4, d, generator=g)
    x[0, 0, : d // 2 + 1] = 0.5 * torch.sign(torch.randn(d // 2 + 1, generator=g))  # a tie across every boundary
    x[0, 1] = 0.0
    x[1, 2] = torch.randint(-2, 3, (d,), generator=g).float()  # few distinct magnitudes
    data = greedy._Input(x)
    for k in sorted({0, 1, d // 3, d // 2, d // 2 + 1, d - 1, d, d + 1}):
        got, want = data.mask(k, "topk", torch.empty_like(x)), mask_topk(x, k)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), k
    for t in (0.0, 0.5, 1.0):
        got, want = greedy._Input(x).mask(t, "threshold", torch.empty_like(x)), x * (x.abs() > t)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), t


@pytest.mark.parametrize("d, n", [(7, 5), (64, 3), (160, 7)])
def test_delta_equals_the_full_product(d, n):
    """``_Input.delta``: the product of a sparser rule as the product of the old one plus the entries the rule drops
    equals the two full products' difference, for top-k (ties at either rank take ``mask_topk``'s choice, k = 0 / d /
    None) and threshold rules; a less sparse rule is refused (None)."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 4, d, generator=g)
    x[0, 0, : d // 2 + 1] = 0.5 * torch.sign(torch.randn(d // 2 + 1, generator=g))  # a tie across every boundary
    x[0, 1] = 0.0
    x[1, 2] = torch.randint(-2, 3, (d,), generator=g).float()  # few distinct magnitudes
    weight = torch.randn(n, d, generator=g)
    weight_t = weight.t().contiguous()

    def product(rule, mode):
        return torch.nn.functional.linear(greedy._Input(x).mask(rule, mode, torch.empty_like(x)), weight)

    ks = [None, d, d - 1, d // 2 + 1, d // 2, d // 3, 1, 0]
    for i, old in enumerate(ks):
        for rule in ks[i:]:
            data = greedy._Input(x)
            data.mask(old, "topk", torch.empty_like(x))  # the sorted |x| of an input that already ran
            got = product(old, "topk") + data.delta(old, rule, "topk", weight_t)
            torch.testing.assert_close(got, product(rule, "topk"), rtol=1e-5, atol=1e-5, msg=f"k {old} -> {rule}")
    assert greedy._Input(x).delta(d // 3, d // 2, "topk", weight_t) is None
    ts = [None, 0.0, 0.3, 0.5, 1.0, 1.5]
    for i, old in enumerate(ts):
        for rule in ts[i + 1:]:
            got = product(old, "threshold") + greedy._Input(x).delta(old, rule, "threshold", weight_t)
            torch.testing.assert_close(got, product(rule, "threshold"), rtol=1e-5, atol=1e-5, msg=f"t {old} -> {rule}")
    assert greedy._Input(x).delta(0.5, 0.3, "threshold", weight_t) is None
    assert greedy._Input(x).delta(0.5, None, "threshold", weight_t) is None


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_delta_updates_choose_as_full_products(tiny, mode, monkeypatch):
    """The search with every projection's product updated from the entries a step drops (``delta_limit`` 1) makes the
    choices of the search that computes every product in full (``delta_limit`` 0), with the same errors to float
    rounding; the updates were taken."""
    model, windows = tiny
    hidden, kwargs = greedy.block_inputs(model, windows)
    runs, updates = [], []
    original = greedy._Input.delta

    def counted(self, *args):
        out = original(self, *args)
        updates[-1] += out is not None
        return out

    monkeypatch.setattr(greedy._Input, "delta", counted)
    for limit in (0.0, 1.0):
        updates.append(0)
        with torch.inference_mode():
            search = greedy.BlockSearch(model.model.layers[1], hidden, kwargs,
                                        greedy.GreedySettings(mode=mode, delta_limit=limit, **SETTINGS))
            try:
                runs.append([search.step() for _ in range(25)])
            finally:
                search.close()
    assert updates[0] == 0 and updates[1] > 25
    assert [chosen for chosen, _, _ in runs[0]] == [chosen for chosen, _, _ in runs[1]]
    for (_, _, full), (_, _, updated) in zip(*runs):
        assert updated == pytest.approx(full, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("limit", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_shards_give_the_errors_of_the_whole_batch(tiny, mode, limit):
    """On CPU a block's sequences are split into one shard per torch thread, each evaluated in a thread of its own:
    every candidate's error equals, bit for bit, that of a single-threaded search on the whole batch (with the
    products updated from the dropped entries too, ``delta_limit`` 1: each token's sum on its own)."""
    model, windows = tiny
    hidden, kwargs = greedy.block_inputs(model, windows)
    threads, runs = torch.get_num_threads(), []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            with torch.inference_mode():
                search = greedy.BlockSearch(model.model.layers[0], hidden, kwargs,
                                            greedy.GreedySettings(mode=mode, delta_limit=limit, **SETTINGS))
                try:
                    assert len(search._shards) == n
                    runs.append([search.step() for _ in range(15)])
                finally:
                    search.close()
        finally:
            torch.set_num_threads(threads)
    assert runs[0] == runs[1]
    # the projections' forward is the module's own again
    assert not any("forward" in vars(m) for m in search.modules.values())


def test_budgets_at_reach_the_target_exactly(tiny):
    model, windows = tiny
    trajectories = greedy.search(model, windows, 0.7, greedy.GreedySettings(**SETTINGS), cache_dir=False, progress=False)
    for index, layer in enumerate(model.model.layers):
        params = np.array([getattr(getattr(layer, PROJECTION_PARENT[k]), k).weight.numel() for k in PROJECTION_KINDS], float)
        rows = np.asarray(trajectories[index])
        assert np.all(np.diff(rows, axis=0) >= 0)  # budgets only rise
        for target in (0.0, 0.1, 0.333, 0.5, 0.7):
            b = greedy.budgets_at(trajectories[index], params, target)
            assert float(b @ params / params.sum()) == pytest.approx(target, abs=1e-12)
            assert np.all((b >= 0) & (b <= 0.99 + 1e-12))
            prior = rows[rows @ params / params.sum() <= target + 1e-12][-1]
            assert np.all(b >= prior - 1e-12)  # the recorded state below the target, one projection raised


def test_build_config_records_greedy_budgets(tiny):
    from acttail_export.allocation import build_config

    model, windows = tiny
    trajectories = greedy.search(model, windows, 0.6, greedy.GreedySettings(**SETTINGS), cache_dir=False, progress=False)
    config = build_config(model, 0.6, allocation="teal-greedy", trajectories=trajectories)
    assert config.allocation == "teal-greedy" and config.mapping is None
    for layer in range(len(model.model.layers)):
        projs = [p for p in config.projections if p.layer == layer]
        mean = sum(p.sparsity * p.parameters for p in projs) / sum(p.parameters for p in projs)
        assert mean == pytest.approx(0.6, abs=1e-12)
        assert all(p.k == topk_keep(p.sparsity, p.in_features) for p in projs)


def test_updated_products_are_cached_apart(tiny, tmp_path):
    """A search with ``delta_limit`` above 0 rounds differently from the full products: its trajectories get a cache
    file of their own (the full search's key is the one it had before the setting existed)."""
    model, windows = tiny
    greedy.search(model, windows, 0.2, greedy.GreedySettings(**SETTINGS), cache_dir=tmp_path, progress=False)
    greedy.search(model, windows, 0.2, greedy.GreedySettings(delta_limit=1.0, **SETTINGS), cache_dir=tmp_path,
                  progress=False)
    keys = [json.loads(path.read_text())["key"] for path in tmp_path.glob("greedy-*.json")]
    assert sorted(key["settings"].get("delta_limit", 0.0) for key in keys) == [0.0, 1.0]
    assert all(len(key) == 4 for key in keys)
    assert "delta_limit" not in greedy.GreedySettings().key()
    assert greedy.GreedySettings(delta_limit=0.2).key()["delta_limit"] == 0.2
    for bad in (-0.1, 1.5, True, "0.2", None):
        with pytest.raises(greedy.ActTailError, match="^greedy search: delta_limit must be a number in \\[0, 1\\]"):
            greedy.GreedySettings(delta_limit=bad)


def test_cache_round_trip_and_resume(tiny, tmp_path, monkeypatch):
    model, windows = tiny
    settings = greedy.GreedySettings(**SETTINGS)
    fresh = greedy.search(model, windows, 0.5, settings, cache_dir=False, progress=False)
    low = greedy.search(model, windows, 0.3, settings, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("greedy-*.json")
    assert {int(k): v for k, v in json.loads(path.read_text())["trajectories"].items()} == low
    # interrupted after block 0: drop block 1 from the file; a rerun computes block 1 only
    payload = json.loads(path.read_text())
    del payload["trajectories"]["1"]
    path.write_text(json.dumps(payload))
    runs = []
    original = greedy.BlockSearch.run
    monkeypatch.setattr(greedy.BlockSearch, "run", lambda self, rows, *a: runs.append(len(rows)) or original(self, rows, *a))
    assert greedy.search(model, windows, 0.3, settings, cache_dir=tmp_path, progress=False) == low
    assert runs == [0]
    # a higher level extends the cached trajectories and equals a search from scratch
    runs.clear()
    extended = greedy.search(model, windows, 0.5, settings, cache_dir=tmp_path, progress=False)
    assert runs == [len(low[0]), len(low[1])]
    assert extended == fresh
    # the block errors of every row survive the cache and its extension: those of a search from scratch
    fresh_errors = greedy.search(model, windows, 0.5, settings, cache_dir=False, progress=False).errors
    assert greedy.search(model, windows, 0.5, settings, cache_dir=tmp_path, progress=False).errors == fresh_errors
    assert json.loads(path.read_text())["errors"] == {str(k): v for k, v in fresh_errors.items()}
    # other settings: another key, another file
    greedy.search(model, windows, 0.1, greedy.GreedySettings(**{**SETTINGS, "step": 0.05}), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("greedy-*.json"))) == 2


def test_export_with_teal_greedy_and_fused_kernel(tiny_llama_dir, tmp_path, monkeypatch):
    from acttail_export.config import ActTailConfig
    from acttail_export.exporter import export

    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "calibration.txt"  # any UTF-8 text calibrates (and, absent WikiText-2, validates) the export
    text.write_text(" ".join(f"Sentence {i} of the calibration text, with some words in it." for i in range(400)))
    out = export(str(tiny_llama_dir), tmp_path / "out", sparsity=0.5, allocation="teal-greedy", kernel="fused",
                 calibration_data=text, calibration_samples=2, sequence_length=32, eval_tokens=128, progress=False)
    config = ActTailConfig.load(out)
    assert config.allocation == "teal-greedy" and config.kernel == "fused"
    assert config.weighted_sparsity() == pytest.approx(0.5, abs=1e-9)
    assert len({round(p.sparsity, 9) for p in config.projections}) > 1  # not uniform
    assert config.perplexity["validation"]["top1_agreement"] >= 0.99
    assert list((tmp_path / "cache" / "greedy").glob("greedy-*.json"))


@pytest.mark.parametrize("extra", [[], ["--weights", "int4"], ["--mode", "threshold", "--sparsity", "0.9"]])
def test_search_text_too_short(tiny_llama_dir, tmp_path, capsys, caplog, extra):
    """The default at 50 % searches on 8 windows of 128 calibration tokens: a text with fewer is one line naming the
    search's needs and the fix (the export's own windows fit), exit 2, nothing written — before the long stages (the
    4-bit quantization, the spectral analysis), not after them."""
    from acttail_export.cli import main

    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"Sentence {i} of a short text." for i in range(60)))  # a few hundred tokens
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="acttail_export")
    assert main(["export", "--model", str(tiny_llama_dir), "--calibration-data", str(text), "--calibration-samples",
                 "2", "--sequence-length", "32", *extra, str(out)]) == 2
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage ")]
    assert len(stages) == 1 and stages[0].startswith("stage load model"), stages
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert err[-1].startswith("acttail-export: error: the greedy allocation search of --allocation acttail reads 8 "
                              "windows of 128 tokens of the calibration text, and short.txt holds ")
    assert err[-1].endswith("pass a longer --calibration-data, or an allocation without the search (htsr, uniform)")
    assert int(err[-1].split("holds ")[1].split(":")[0]) < 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def _params(layer) -> np.ndarray:
    return np.array([getattr(getattr(layer, PROJECTION_PARENT[k]), k).weight.numel() for k in PROJECTION_KINDS], float)


def test_max_increment_is_validated():
    assert greedy.GreedySettings().max_increment is None
    assert greedy.GreedySettings(max_increment=1.0).max_increment == 1.0
    assert greedy.GreedySettings(max_increment=0.32).max_increment == 0.32
    for bad in (0.0, -0.1, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(greedy.ActTailError, match="max_increment"):
            greedy.GreedySettings(max_increment=bad)


def test_max_increment_none_keeps_the_candidates_and_a_cap_limits_the_small_projections(tiny):
    """Without a cap (the default) the candidates are ``min(s_max, s + step · P_block / P_i)`` bit for bit, before and
    after a few steps; with a cap below k / v's increment (0.42 on the tiny model at step 0.02) and above q's (0.21),
    k / v rise by the cap and every other projection by its full increment."""
    model, windows = tiny
    layer = model.model.layers[0]
    hidden, kwargs = greedy.block_inputs(model, windows)
    params = _params(layer)
    full = SETTINGS["step"] * params.sum() / params
    small = [PROJECTION_KINDS.index("k_proj"), PROJECTION_KINDS.index("v_proj")]
    assert full[small].min() > 0.3 > np.delete(full, small).max()
    with torch.inference_mode():
        for cap in (None, 0.3):
            search = greedy.BlockSearch(layer, hidden, kwargs, greedy.GreedySettings(**SETTINGS, max_increment=cap))
            try:
                for _ in range(4):
                    got = search.candidates()
                    if cap is None:  # the pre-cap formula, bit for bit
                        assert got == [(i, min(0.99, s + full[i])) for i, s in enumerate(search.sparsity)]
                    else:
                        for i, value in got:
                            rise = value - search.sparsity[i]
                            want = 0.3 if i in small else full[i]
                            assert rise == pytest.approx(min(want, 0.99 - search.sparsity[i]), abs=1e-12)
                    search.step()
            finally:
                search.close()


def test_max_increment_above_every_increment_gives_the_same_trajectories(tiny):
    """A cap no projection's increment reaches changes nothing (0.42 is the largest at step 0.02 on the tiny model)."""
    model, windows = tiny
    plain = greedy.search(model, windows, 0.4, greedy.GreedySettings(**SETTINGS), cache_dir=False, progress=False)
    capped = greedy.search(model, windows, 0.4, greedy.GreedySettings(**SETTINGS, max_increment=0.5), cache_dir=False,
                           progress=False)
    assert capped == plain


def test_max_increment_is_in_the_cache_key_only_when_set(tiny, tmp_path):
    model, windows = tiny
    greedy.search(model, windows, 0.2, greedy.GreedySettings(**SETTINGS), cache_dir=tmp_path, progress=False)
    greedy.search(model, windows, 0.2, greedy.GreedySettings(**SETTINGS, max_increment=0.3), cache_dir=tmp_path,
                  progress=False)
    keys = [json.loads(path.read_text())["key"]["settings"] for path in sorted(tmp_path.glob("greedy-*.json"))]
    assert len(keys) == 2
    assert sorted(key.get("max_increment", 0.0) for key in keys) == [0.0, 0.3]
    uncapped = next(key for key in keys if "max_increment" not in key)
    assert sorted(uncapped) == ["mode", "s_max", "samples", "sequence_length", "step"]  # the key of before the cap


def test_budgets_at_reach_the_target_exactly_with_a_cap(tiny):
    """Capped steps raise the block by less than ``step``: the interpolation of the crossing step still lands on the
    target, between the two rows' budgets."""
    model, windows = tiny
    settings = greedy.GreedySettings(**SETTINGS, max_increment=0.3)
    trajectories = greedy.search(model, windows, 0.7, settings, cache_dir=False, progress=False)
    capped_steps = 0
    for index, layer in enumerate(model.model.layers):
        params = _params(layer)
        rows = np.asarray(trajectories[index])
        rises = np.diff(rows, axis=0)
        assert np.all(rises >= 0) and np.all((rises > 0).sum(axis=1) == 1)  # one projection a step
        assert rises.max() <= 0.3 + 1e-12
        capped_steps += int(np.isclose(rises.max(axis=1), 0.3).sum())
        levels = rows @ params / params.sum()
        for target in (0.0, 0.1, 0.333, 0.5, 0.7, *((levels[1:-1] + levels[2:]) / 2)):
            if target > levels[-1]:
                continue
            b = greedy.budgets_at(trajectories[index], params, target)
            assert float(b @ params / params.sum()) == pytest.approx(target, abs=1e-12)
            j = int(np.searchsorted(levels, target - 1e-12))
            if j > 0:
                assert np.all(b >= rows[j - 1] - 1e-12) and np.all(b <= rows[j] + 1e-12)
    assert capped_steps > 0  # the cap was hit (k / v steps)


def test_search_records_each_rows_block_error_and_the_dense_norm(tiny):
    """``errors[b][j]`` of the search's result: the block error of trajectory row j (0 for the dense row), against a full
    forward of an untouched copy of the block with the reference masks; ``scales[b]``: the dense output's mean token
    norm."""
    model, windows = tiny
    trajectories = greedy.search(model, windows, 0.4, greedy.GreedySettings(**SETTINGS), cache_dir=False, progress=False)
    errors, scales = trajectories.errors, trajectories.scales
    hidden, kwargs = greedy.block_inputs(model, windows)
    with torch.inference_mode():
        for index, layer in enumerate(model.model.layers):
            rows = trajectories[index]
            assert len(errors[index]) == len(rows) and errors[index][0] == 0.0
            reference = copy.deepcopy(layer)
            target = reference(hidden, **kwargs)
            target = target[0] if isinstance(target, tuple) else target
            assert scales[index] == pytest.approx(float(target.double().norm(dim=-1).mean()), rel=1e-6)
            dense = _dense_inputs(reference, hidden, kwargs)
            for j in (1, len(rows) // 2, len(rows) - 1):
                want = _reference_error(reference, hidden, kwargs, rows[j], "topk", dense, target)
                # the same float32 ops in another grouping (see the brute-force test above)
                assert errors[index][j] == pytest.approx(want, rel=1e-5, abs=1e-7)
            hidden = target


def _interp_cost(levels, errors, out) -> float:
    return float(sum(np.interp(o, lv, er) for o, lv, er in zip(out, levels, errors)))


@pytest.mark.parametrize("seed", range(6))
def test_waterfill_targets_are_optimal_on_convex_curves_against_brute_force(seed):
    """On convex curves (each step costs more per unit of level than the one before), moving the block with the
    cheapest next step is optimal: no choice of rows (with one block between two of its rows, as the LP optimum of
    piecewise-linear convex costs has) reaches the target at a smaller total error."""
    import itertools

    rng = np.random.default_rng(seed)
    blocks, rows = 3, 5
    levels = [np.concatenate([[0.0], np.cumsum(rng.uniform(0.05, 0.25, rows - 1))]) for _ in range(blocks)]
    errors = [np.concatenate([[0.0], np.cumsum(np.sort(rng.uniform(0.1, 2.0, rows - 1)) * np.diff(lv))]) for lv in levels]
    weights = rng.uniform(1.0, 3.0, blocks)
    share = weights / weights.sum()
    top = float(sum(s * lv[-1] for s, lv in zip(share, levels)))
    for target in (0.3 * top, 0.55 * top, 0.9 * top):
        out = greedy.waterfill_targets(levels, errors, weights, target)
        assert float(out @ share) == pytest.approx(target, abs=1e-12)
        assert all(0 <= o <= lv[-1] + 1e-12 for o, lv in zip(out, levels))
        best = np.inf
        for pos in itertools.product(range(rows), repeat=blocks):
            base = sum(share[b] * levels[b][p] for b, p in enumerate(pos))
            for f in range(blocks):
                p = pos[f]
                if p + 1 >= rows:
                    continue
                t = (target - base) / (share[f] * (levels[f][p + 1] - levels[f][p]))
                if 0 <= t <= 1:
                    trial = [levels[b][q] for b, q in enumerate(pos)]
                    trial[f] = levels[f][p] + t * (levels[f][p + 1] - levels[f][p])
                    best = min(best, _interp_cost(levels, errors, trial))
        assert _interp_cost(levels, errors, out) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_waterfill_targets_cap_and_errors():
    from acttail_export.errors import ActTailError

    levels = [np.array([0.0, 0.2, 0.4, 0.6]), np.array([0.0, 0.2, 0.4, 0.6])]
    cheap, dear = np.array([0.0, 0.1, 0.2, 0.3]), np.array([0.0, 1.0, 2.0, 3.0])
    # without a cap the cheap block goes first, to its last row, then the dear one
    out = greedy.waterfill_targets(levels, [cheap, dear], np.array([1.0, 1.0]), 0.4)
    assert out.tolist() == pytest.approx([0.6, 0.2])
    # a cap stops the cheap block at the last row not above it
    out = greedy.waterfill_targets(levels, [cheap, dear], np.array([1.0, 1.0]), 0.4, max_level=0.45)
    assert out.tolist() == pytest.approx([0.4, 0.4])
    with pytest.raises(ActTailError, match="search to a higher level"):
        greedy.waterfill_targets(levels, [cheap, dear], np.array([1.0, 1.0]), 0.5, max_level=0.45)
    with pytest.raises(ActTailError, match="2 curves for 3 blocks"):
        greedy.waterfill_targets(levels, [cheap, dear], np.array([1.0, 1.0, 1.0]), 0.2)


def test_rank_is_validated_and_in_the_cache_key_only_when_not_the_default():
    from acttail_export.errors import ActTailError

    with pytest.raises(ActTailError, match="rank must be one of error, error_per_rise"):
        greedy.GreedySettings(rank="smallest")
    assert "rank" not in greedy.GreedySettings().key()
    assert greedy.GreedySettings(rank="error_per_rise").key()["rank"] == "error_per_rise"


def test_rank_error_per_rise_picks_the_smallest_rise_per_level(tiny):
    """With a binding cap the candidates add different levels: each step takes the smallest (error − the current
    error) / (the level the candidate adds), from every candidate's error as the step computed it."""
    model, windows = tiny
    hidden, kwargs = greedy.block_inputs(model, windows)
    settings = greedy.GreedySettings(**SETTINGS, max_increment=0.05, rank="error_per_rise")
    with torch.inference_mode():
        search = greedy.BlockSearch(model.model.layers[0], hidden, kwargs, settings)
        try:
            current, chosen_kinds = 0.0, set()
            for _ in range(12):
                before = search.sparsity.copy()
                raised = dict(search.candidates())
                rises = {i: (v - before[i]) * search.params[i] / search.params.sum() for i, v in raised.items()}
                assert len({round(r, 12) for r in rises.values()}) > 1  # the cap binds: the rises differ
                chosen, err, errors = search.step()
                scores = {i: (errors[i] - current) / rises[i] for i in raised}
                assert chosen == min(scores, key=scores.get)
                assert search.current_error() == pytest.approx(err, rel=1e-6, abs=1e-9)
                current = err
                chosen_kinds.add(chosen)
        finally:
            search.close()
        assert len(chosen_kinds) >= 2


def test_rank_error_per_rise_without_a_binding_cap_is_teals_rule(tiny):
    """While every candidate adds the same level (no cap; no candidate clipped at s_max), the same steps."""
    model, windows = tiny
    settings = greedy.GreedySettings(**SETTINGS)
    plain = greedy.search(model, windows, 0.3, settings, cache_dir=False, progress=False)
    per_rise = greedy.search(model, windows, 0.3, greedy.GreedySettings(**SETTINGS, rank="error_per_rise"),
                             cache_dir=False, progress=False)
    for index, layer in enumerate(model.model.layers):
        rows = np.asarray(plain[index])
        unclipped = np.all(rows + settings.increments(_params(layer)) <= settings.s_max, axis=1)
        same = int(np.argmin(unclipped)) if not unclipped.all() else len(rows)  # rows whose step had equal rises
        assert same >= 3
        assert per_rise[index][:same + 1] == plain[index][:same + 1]


def test_waterfill_greedy_config_is_the_waterfill_of_the_recorded_curves(tiny, tmp_path):
    """``waterfill-greedy`` at a target: the search reaches target + headroom in every block; the block levels are
    :func:`greedy.waterfill_targets` on each block's errors over its dense output's norm (weighted mean = target, none
    above target + headroom); inside each block the search's budgets at that level; recorded and round-tripped."""
    from acttail_export.allocation import build_config, greedy_levels
    from acttail_export.config import ActTailConfig
    from acttail_export.errors import ActTailError

    model, windows = tiny
    target = 0.5
    levels = greedy_levels(model, "waterfill-greedy", [target], "topk")
    assert levels == [pytest.approx(target + greedy.WATERFILL_HEADROOM)] * len(model.model.layers)
    trajectories = greedy.search(model, windows, levels, greedy.GreedySettings(**SETTINGS), cache_dir=False, progress=False)
    config = build_config(model, target, "waterfill-greedy", trajectories=trajectories)
    assert config.allocation_method == "waterfill-greedy" and config.weighted_sparsity() == pytest.approx(target, abs=1e-9)
    params = [_params(layer) for layer in model.model.layers]
    curves = [np.asarray(trajectories[b]) @ p / p.sum() for b, p in enumerate(params)]
    rel = [np.asarray(trajectories.errors[b]) / trajectories.scales[b] for b in range(len(params))]
    want = greedy.waterfill_targets(curves, rel, np.array([p.sum() for p in params]), target,
                                    max_level=target + greedy.WATERFILL_HEADROOM)
    assert len(set(np.round(want, 6))) > 1  # the blocks get different levels
    for b, p in enumerate(params):
        budgets = np.array([q.sparsity for q in config.projections if q.layer == b])
        assert budgets == pytest.approx(greedy.budgets_at(trajectories[b], p, want[b]), abs=1e-12)
        assert float(budgets @ p / p.sum()) <= target + greedy.WATERFILL_HEADROOM + 1e-9
    assert ActTailConfig.load(config.save(tmp_path)).to_dict() == config.to_dict()
    with pytest.raises(ActTailError, match="no recorded block errors: pass the result of greedy.search"):
        build_config(model, target, "waterfill-greedy", trajectories=dict(trajectories))


def test_a_cache_without_errors_is_searched_again(tiny, tmp_path, monkeypatch):
    """A cache written before the errors were recorded: every block is searched again, to the same rows, with errors."""
    model, windows = tiny
    settings = greedy.GreedySettings(**SETTINGS)
    first = greedy.search(model, windows, 0.3, settings, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("greedy-*.json")
    payload = json.loads(path.read_text())
    del payload["errors"], payload["scales"]
    path.write_text(json.dumps(payload))
    runs = []
    original = greedy.BlockSearch.run
    monkeypatch.setattr(greedy.BlockSearch, "run", lambda self, rows, *a: runs.append(len(rows)) or original(self, rows, *a))
    again = greedy.search(model, windows, 0.3, settings, cache_dir=tmp_path, progress=False)
    assert runs == [0] * len(model.model.layers)
    assert again == first and again.errors == first.errors and again.scales == first.scales


def test_lazy_is_validated_and_in_the_cache_key_only_when_set():
    from acttail_export.errors import ActTailError

    with pytest.raises(ActTailError, match="lazy evaluation ranks by the error only"):
        greedy.GreedySettings(lazy=True, rank="error_per_rise")
    for bad in (-1, 1.5, True):
        with pytest.raises(ActTailError, match="refresh must be an integer >= 0"):
            greedy.GreedySettings(lazy=True, refresh=bad)
    assert "lazy" not in greedy.GreedySettings().key() and "refresh" not in greedy.GreedySettings().key()
    assert greedy.GreedySettings(lazy=True).key()["lazy"] is True
    assert greedy.GreedySettings(lazy=True, refresh=3).key()["refresh"] == 3


@pytest.mark.parametrize("mode, refresh", [("topk", 0), ("threshold", 0), ("topk", 3)])
def test_lazy_step_against_brute_force(tiny, mode, refresh):
    """Each lazy step takes a candidate whose fresh rise is the smallest of all rises known after the step (fresh, or
    the last known for a candidate it did not evaluate; ties to the lowest index); every error it computes is a full
    layer forward's; where no candidate it left unevaluated has a true rise below its last known one, the choice is the
    full step's. With ``refresh`` n, every n-th step evaluates every candidate."""
    model, windows = tiny
    hidden, kwargs = greedy.block_inputs(model, windows)
    with torch.inference_mode():
        reference = copy.deepcopy(model.model.layers[0])
        dense = _dense_inputs(reference, hidden, kwargs)
        search = greedy.BlockSearch(model.model.layers[0], hidden, kwargs,
                                    greedy.GreedySettings(mode=mode, lazy=True, refresh=refresh, **SETTINGS))
        current, skipped = 0.0, 0
        try:
            for step in range(16):
                before, stale = search.sparsity.copy(), dict(search._rises)
                brute = {}
                for i, value in search.candidates():
                    trial = before.copy()
                    trial[i] = value
                    brute[i] = _reference_error(reference, hidden, kwargs, trial, mode, dense, search.target)
                chosen, err, errors = search.step()
                evaluated = {i for i in brute if np.isfinite(errors[i])}
                if step == 0 or (refresh and step % refresh == 0):
                    assert evaluated == set(brute)
                skipped += len(brute) - len(evaluated)
                assert chosen in evaluated
                for i in evaluated:
                    assert errors[i] == pytest.approx(brute[i], rel=1e-5, abs=1e-7), PROJECTION_KINDS[i]
                known = {i: errors[i] - current if i in evaluated else stale[i] for i in brute}
                assert min(known, key=lambda i: (known[i], i)) == chosen
                if all(brute[i] - current >= stale[i] - 1e-6 for i in brute if i not in evaluated):
                    assert chosen == min(brute, key=lambda i: (brute[i], i))
                current = err
        finally:
            search.close()
    assert skipped > 0  # the laziness happened: some steps left candidates unevaluated


def test_lazy_equals_the_full_step_where_rises_never_fall(tiny):
    """On a block error whose rises never fall as other projections rise (here: a separable convex cost of the seven
    rules, put in place of the block forward), the lazy search makes every choice of the full one, with fewer
    evaluations."""
    model, windows = tiny
    hidden, kwargs = greedy.block_inputs(model, windows)
    weights = np.random.default_rng(3).uniform(0.5, 2.0, len(PROJECTION_KINDS))

    def cost(keys, layer):
        dims = [getattr(getattr(layer, PROJECTION_PARENT[k]), k).in_features for k in PROJECTION_KINDS]
        dropped = [0 if k is None else d - k for k, d in zip(keys, dims)]
        return float(sum(w * (x / d) ** 2 for w, x, d in zip(weights, dropped, dims)))

    runs = {}
    with torch.inference_mode():
        for lazy in (False, True):
            search = greedy.BlockSearch(model.model.layers[0], hidden, kwargs,
                                        greedy.GreedySettings(lazy=lazy, **SETTINGS))
            calls = []

            def distances(candidates, layer=model.model.layers[0], calls=calls):
                calls.append(len(candidates))
                return [torch.full((4,), cost(keys, layer), dtype=torch.float64) for keys in candidates]

            search._distances = distances
            try:
                runs[lazy] = ([search.step()[0] for _ in range(40)], sum(calls))
            finally:
                search.close()
    assert runs[True][0] == runs[False][0]
    assert len(set(runs[False][0])) >= 4
    assert runs[True][1] < runs[False][1] / 2


@pytest.mark.parametrize("refresh", [0, 3])
def test_lazy_resume_and_extension_equal_one_run(tiny, tmp_path, refresh):
    """The last known rises are cached with the trajectories (and the refresh steps counted from the dense row):
    extending a lazy search (or reading it back) gives the trajectories and errors of one lazy run to the higher
    level."""
    model, windows = tiny
    settings = greedy.GreedySettings(lazy=True, refresh=refresh, **SETTINGS)
    fresh = greedy.search(model, windows, 0.5, settings, cache_dir=False, progress=False)
    greedy.search(model, windows, 0.3, settings, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("greedy-*.json")
    payload = json.loads(path.read_text())
    assert payload["key"]["settings"]["lazy"] is True
    assert set(payload["rises"]) == {str(i) for i in range(len(model.model.layers))}
    extended = greedy.search(model, windows, 0.5, settings, cache_dir=tmp_path, progress=False)
    assert extended == fresh and extended.errors == fresh.errors
    assert greedy.search(model, windows, 0.5, settings, cache_dir=tmp_path, progress=False) == fresh
    # a lazy cache entry without its rises (written by hand, or truncated) is searched again, not extended blind
    payload = json.loads(path.read_text())
    del payload["rises"]["1"]
    path.write_text(json.dumps(payload))
    assert greedy.search(model, windows, 0.5, settings, cache_dir=tmp_path, progress=False) == fresh


def test_default_settings_per_method_and_mode():
    """Where they were measured (docs/allocation.md 6k, 6m, 6n): the fast search (lazy, refresh 3, updated products)
    behind ``waterfill-greedy`` in top-k mode, TEAL's search with updated products behind ``teal-greedy`` in both modes
    and ``acttail-greedy`` in threshold mode; every other method, ``acttail-greedy`` in top-k mode and
    ``waterfill-greedy`` in threshold mode search in full."""
    fast = greedy.default_settings("waterfill-greedy", "topk")
    assert (fast.mode, fast.lazy, fast.refresh, fast.delta_limit) == ("topk", True, 3, 0.2)
    assert fast.key() == {**greedy.GreedySettings().key(), "lazy": True, "refresh": 3, "delta_limit": 0.2}
    teal = greedy.default_settings("teal-greedy", "topk")
    assert (teal.mode, teal.lazy, teal.delta_limit) == ("topk", False, 0.2)
    assert teal.key() == {**greedy.GreedySettings().key(), "delta_limit": 0.2}
    teal_threshold = greedy.default_settings("teal-greedy", "threshold")  # TEAL's rule, products updated (section 6m)
    assert (teal_threshold.mode, teal_threshold.lazy, teal_threshold.delta_limit) == ("threshold", False, 0.2)
    # the combination in threshold mode: the same settings, so that search_for runs one search for both (section 6n)
    assert greedy.default_settings("acttail-greedy", "threshold") == teal_threshold
    for method, mode in [("acttail-greedy", "topk"), ("waterfill-greedy", "threshold"), ("htsr", "threshold"),
                         ("uniform", "topk")]:
        assert greedy.default_settings(method, mode) == greedy.GreedySettings(mode=mode)


def test_search_for_runs_each_methods_own_search(tiny, tiny_llama_dir, wikitext_valid):
    """``acttail`` at 50 % (TEAL's search) and 80 % (``waterfill-greedy`` on the fast search) in one call: two
    searches, each equal to ``greedy.search`` with that method's default settings on the same windows, and
    ``build_config`` reads each level's budgets off its own method's search; one target: one search."""
    from acttail_export.allocation import build_config, greedy_levels
    from acttail_export.data import EXPORT_CALIBRATION_FLAGS, read_text, token_windows
    from acttail_export.modeling import load_model

    model, _ = tiny
    _, tokenizer = load_model(str(tiny_llama_dir))
    windows = token_windows(tokenizer, read_text(wikitext_valid, EXPORT_CALIBRATION_FLAGS), greedy.DEFAULT_SEQUENCE_LENGTH,
                            max_tokens=greedy.DEFAULT_SAMPLES * greedy.DEFAULT_SEQUENCE_LENGTH)
    expected = {s: greedy.search(model, windows, greedy_levels(model, "acttail", [s], "topk"),
                                 greedy.default_settings(method, "topk"), cache_dir=False, progress=False)
                for s, method in ((0.5, "teal-greedy"), (0.8, "waterfill-greedy"))}
    both = greedy.search_for(model, tokenizer, "acttail", [0.5, 0.8], "topk", wikitext_valid, cache_dir=False,
                             progress=False)
    assert dict(both.for_method("teal-greedy")) == dict(expected[0.5])
    assert dict(both.for_method("waterfill-greedy")) == dict(expected[0.8])
    for s, method in ((0.5, "teal-greedy"), (0.8, "waterfill-greedy")):
        default = build_config(model, s, "acttail", "topk", trajectories=both)
        reference = build_config(model, s, method, "topk", trajectories=expected[s])
        assert default.allocation_method == method
        assert [p.sparsity for p in default.projections] == [p.sparsity for p in reference.projections]
    one = greedy.search_for(model, tokenizer, "acttail", [0.8], "topk", wikitext_valid, cache_dir=False, progress=False)
    assert not one.methods and dict(one) == dict(expected[0.8])
    # the fast search is not the full one on this model: the two runs to 90 % choose differently somewhere
    full = greedy.search(model, windows, greedy_levels(model, "acttail", [0.8], "topk"), greedy.GreedySettings(),
                         cache_dir=False, progress=False)
    assert dict(full) != dict(expected[0.8])


def test_search_for_threshold_one_search_serves_both_methods(tiny, tiny_llama_dir, wikitext_valid):
    """Threshold mode: TEAL's search (``acttail`` at 50 %) and the combination's (80 %) have the same settings (section
    6n), so ``search_for`` runs one search, every block to the higher of the two methods' levels; a greedy trajectory
    does not depend on how far it goes, so each method's budgets equal those of its own search."""
    from acttail_export.allocation import build_config, greedy_levels
    from acttail_export.data import EXPORT_CALIBRATION_FLAGS, read_text, token_windows
    from acttail_export.modeling import load_model

    model, _ = tiny
    _, tokenizer = load_model(str(tiny_llama_dir))
    windows = token_windows(tokenizer, read_text(wikitext_valid, EXPORT_CALIBRATION_FLAGS), greedy.DEFAULT_SEQUENCE_LENGTH,
                            max_tokens=greedy.DEFAULT_SAMPLES * greedy.DEFAULT_SEQUENCE_LENGTH)
    pairs = ((0.5, "teal-greedy"), (0.8, "acttail-greedy"))
    expected = {s: greedy.search(model, windows, greedy_levels(model, "acttail", [s], "threshold"),
                                 greedy.default_settings(method, "threshold"), cache_dir=False, progress=False)
                for s, method in pairs}
    both = greedy.search_for(model, tokenizer, "acttail", [0.5, 0.8], "threshold", wikitext_valid, cache_dir=False,
                             progress=False)
    assert not both.methods  # one search
    levels = [np.asarray(rows[-1]) @ greedy._block_params(layer) / greedy._block_params(layer).sum()
              for rows, layer in zip(both.values(), model.model.layers)]
    needed = np.maximum(greedy_levels(model, "acttail", [0.5], "threshold"), greedy_levels(model, "acttail", [0.8], "threshold"))
    assert np.all(np.asarray(levels) >= needed - 1e-9)
    for s, method in pairs:
        default = build_config(model, s, "acttail", "threshold", trajectories=both)
        reference = build_config(model, s, method, "threshold", trajectories=expected[s])
        assert default.allocation_method == method
        assert [p.sparsity for p in default.projections] == [p.sparsity for p in reference.projections]
