"""calibration.py: thresholds against torch.quantile / numpy on tiny models, streamed error bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sparsify import hand_config, random_budgets

from acttail_export.calibration import calibrate, calibrate_many, histogram_edges, histogram_quantile, linear_quantile
from acttail_export.config import SHARED_INPUT_GROUPS, ActTailConfig, topk_keep
from acttail_export.data import read_text, token_windows
from acttail_export.errors import ActTailError
from acttail_export.sparsify import apply_sparsity

MANTISSA_BITS = 10


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def windows(tiny, wikitext_valid):
    return token_windows(tiny[1], read_text(wikitext_valid)[:50_000], sequence_length=64, samples=6)


def dense_inputs(model, windows, names) -> dict[str, torch.Tensor]:
    """Independent capture of each projection's dense input |x| over all windows."""
    store = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: store[n].append(a[0].abs().flatten()))
               for n in names]
    with torch.inference_mode():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def test_linear_quantile_matches_torch():
    x = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    s = torch.sort(x).values
    for q in (0.0, 0.1, 0.5, 0.737, 0.99):
        assert linear_quantile(s, q) == pytest.approx(float(torch.quantile(x, q)), rel=1e-6)


def test_histogram_quantile_within_one_bin():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(200_000) * np.exp(rng.standard_normal(200_000))).astype(np.float32)
    edges = histogram_edges(MANTISSA_BITS)
    bits = torch.from_numpy(x).view(torch.int32)
    key = (bits >> (23 - MANTISSA_BITS)) - ((127 - 64) << MANTISSA_BITS)
    counts = torch.bincount(key, minlength=edges.numel() - 1)
    for q in (0.05, 0.3, 0.5, 0.8, 0.95):
        est = histogram_quantile(counts, edges, q)
        exact = float(np.quantile(x, q))
        assert abs(est.threshold - exact) <= exact * 2.0**-MANTISSA_BITS
        assert abs((x <= est.threshold).mean() - q) <= est.bin_mass + 1e-6
        assert 0 < est.bin_mass < 0.01


def test_edges_are_log_spaced():
    e = histogram_edges(MANTISSA_BITS)
    assert e[0] == 0.0 and e[1] == 2.0**-64 * (1 + 2.0**-MANTISSA_BITS) and float(e[-1]) == 2.0**32
    ratio = (e[2:] / e[1:-1]).numpy()
    assert ratio.max() <= 1 + 2.0**-MANTISSA_BITS + 1e-12 and ratio.min() > 1


@pytest.mark.parametrize("exact_limit", [2**27, 0], ids=["exact", "streamed"])
def test_thresholds_match_torch_quantile(tiny, windows, exact_limit):
    model, tok = tiny
    budgets = random_budgets(model, seed=3)
    budgets["model.layers.1.mlp.down_proj"] = 0.0
    config = calibrate(model, tok, hand_config(model, budgets, "threshold"), windows=windows, progress=False,
                       batch_size=4, exact_limit=exact_limit)
    captured = dense_inputs(model, windows, budgets)
    for p in config.projections:
        assert p.k == topk_keep(p.sparsity, p.in_features)
        absx = captured[p.name]
        if p.sparsity == 0:
            assert p.threshold == 0.0
            continue
        ref = float(torch.quantile(absx.double(), p.sparsity))
        if exact_limit:
            assert p.threshold == pytest.approx(ref, rel=1e-5)
        else:
            assert abs(p.threshold - ref) <= ref * 2.0**-MANTISSA_BITS * 1.01
        # consistent with sparsify's rule (keep |x| > t) on the dense calibration activations
        assert abs(float((absx <= p.threshold).double().mean()) - p.sparsity) < 0.005
    assert config.calibration.samples == 6 and config.calibration.sequence_length == 64
    assert config.calibration.tokens == 6 * 64


def test_sequential_matches_effective_sparsity(tiny, windows):
    """Sequential calibration sees the sparsified inputs, so threshold mode hits s_i on the calibration data."""
    model, tok = tiny
    budgets = random_budgets(model, seed=4)
    config = calibrate(model, tok, hand_config(model, budgets, "threshold"), windows=windows, progress=False,
                       batch_size=4, sequential=True)
    with torch.inference_mode(), apply_sparsity(model, config) as hooks:
        model(input_ids=windows)
    eff = hooks.effective_sparsity()
    for p in config.projections:
        assert abs(eff[p.name] - p.sparsity) < 0.005, p.name
    # the first group of layer 0 sees dense input either way: same threshold as dense calibration
    dense = calibrate(model, tok, hand_config(model, budgets, "threshold"), windows=windows, progress=False)
    assert dense.projections[0].threshold == pytest.approx(config.projections[0].threshold, rel=1e-6)
    assert dense.projections[-1].threshold != pytest.approx(config.projections[-1].threshold, rel=1e-6)


@pytest.mark.parametrize("exact_limit", [2**27, 0], ids=["exact", "streamed"])
def test_calibrate_many_equals_one_by_one(tiny, windows, exact_limit):
    model, tok = tiny
    configs = [hand_config(model, random_budgets(model, seed=s), "threshold") for s in (7, 8, 9)]
    calibrate_many(model, tok, configs, windows=windows, progress=False, exact_limit=exact_limit)
    for seed, config in zip((7, 8, 9), configs):
        alone = calibrate(model, tok, hand_config(model, random_budgets(model, seed=seed), "threshold"), windows=windows,
                          progress=False, exact_limit=exact_limit)
        assert [p.threshold for p in config.projections] == pytest.approx([p.threshold for p in alone.projections], rel=1e-6)


def test_calibrate_reads_file_and_groups(tiny, wikitext_valid):
    model, tok = tiny
    config = hand_config(model, 0.5, "threshold")
    calibrate(model, tok, config, data=wikitext_valid, samples=2, sequence_length=32, progress=False)
    assert config.calibration.data == str(wikitext_valid) and config.calibration.tokens == 64
    by = config.by_name()
    for layer in range(2):
        for group in SHARED_INPUT_GROUPS:  # same input and same budget -> same threshold
            ts = {by[f"model.layers.{layer}.{'self_attn' if g in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{g}"].threshold
                  for g in group}
            assert len(ts) == 1


def test_calibrate_windows_with_source_equals_reading_the_file(tiny, wikitext_valid):
    """Windows read by the caller (the exporter reads them once for its own checks) calibrate exactly as the file read
    by calibrate, and ``source`` records the file as calibrate would have."""
    from acttail_export.data import load_windows

    model, tok = tiny
    by_file = calibrate(model, tok, hand_config(model, 0.5, "threshold"), data=wikitext_valid, samples=2, sequence_length=32,
                        progress=False)
    windows = load_windows(tok, wikitext_valid, 32, samples=2)
    by_windows = calibrate(model, tok, hand_config(model, 0.5, "threshold"), windows=windows, source=str(wikitext_valid),
                           progress=False)
    assert by_windows.calibration == by_file.calibration
    assert [p.threshold for p in by_windows.projections] == [p.threshold for p in by_file.projections]
    unnamed = calibrate(model, tok, hand_config(model, 0.5, "threshold"), windows=windows, progress=False)
    assert unnamed.calibration.data == "<token windows>"


def test_calibrate_errors(tiny, tmp_path):
    model, tok = tiny
    short = tmp_path / "short.txt"
    short.write_text("just a few words here")
    with pytest.raises(ActTailError, match="too short for 4 samples"):
        calibrate(model, tok, hand_config(model, 0.5), data=short, samples=4, sequence_length=64, progress=False)
    with pytest.raises(ActTailError, match="no projections"):
        calibrate(model, tok, ActTailConfig(target_sparsity=0.5), data=short, progress=False)


@pytest.mark.slow
def test_smollm2_streamed_thresholds(smollm2, wikitext_valid):
    """Streamed histogram quantiles on the real model agree with torch.quantile on the captured inputs."""
    from acttail_export.allocation import build_config

    model, tok = smollm2
    windows = token_windows(tok, read_text(wikitext_valid)[:20_000], sequence_length=128, samples=2)
    config = calibrate(model, tok, build_config(model, 0.7, "uniform", "threshold"), windows=windows,
                       progress=False, exact_limit=0)
    checked = [p for p in config.projections if p.layer in (0, 29)]
    captured = dense_inputs(model, windows, [p.name for p in checked])
    for p in checked:
        absx = captured[p.name]
        ref = float(torch.quantile(absx.double(), p.sparsity))
        assert abs(p.threshold - ref) <= ref * 2.0**-MANTISSA_BITS * 1.01, p.name
        assert abs(float((absx <= p.threshold).double().mean()) - p.sparsity) < 0.005, p.name
