"""HT-SR spectral analysis against numpy, synthetic Pareto samples and the ``powerlaw`` package."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acttail_export.errors import ActTailError
from acttail_export.spectral import PowerLawFit, analyze_model, eigenvalues, fit_power_law

# powerlaw 2.0 caps alpha to its default range (0, 3); HT-SR alphas of LLM projections go to ~20,
# so the reference fit is given a wide range (its continuous MLE is then the same estimator).
WIDE = {"alpha": [1.0, 100.0]}


def _powerlaw_fit(eigs: np.ndarray, **kwargs):
    import powerlaw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(eigs, xmin=None, discrete=False, verbose=False, **kwargs)


def _bruteforce_fit(x: np.ndarray) -> tuple[float, float, float]:
    """Per-candidate loop of the same estimator (reference for the vectorised code)."""
    x = np.sort(x)
    best = (np.inf, np.nan, np.nan)
    for xmin in np.unique(x)[:-1]:
        tail = x[x >= xmin]
        n = tail.size
        alpha = 1 + n / np.sum(np.log(tail / xmin))
        ks = np.max(np.abs((1 - (tail / xmin) ** (1 - alpha)) - np.arange(n) / n))
        if ks < best[0]:
            best = (ks, alpha, xmin)
    return best[1], best[2], best[0]


# --- eigenvalues -----------------------------------------------------------------------------
def test_eigenvalues_match_numpy_eigvalsh():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 80))  # out × in, W^T W is 80×80 of rank 48
    eigs = eigenvalues(torch.tensor(w, dtype=torch.float32))
    reference = np.linalg.eigvalsh(w.T.astype(np.float32).astype(np.float64) @ w.astype(np.float32).astype(np.float64))[-48:]
    assert eigs.shape == (48,) and np.all(np.diff(eigs) >= 0)
    np.testing.assert_allclose(eigs, reference, rtol=1e-8)


def test_eigenvalues_float32_path():
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(eigenvalues(w, dtype=torch.float32), np.linalg.svd(w.double().numpy(), compute_uv=False)[::-1] ** 2, rtol=1e-4)


def test_eigenvalues_rejects_bad_input():
    with pytest.raises(ActTailError, match="2-D"):
        eigenvalues(torch.ones(3))


# --- power-law fit ----------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.6, 2.0, 2.5, 3.5, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_pareto_alpha(alpha, seed):
    rng = np.random.default_rng(seed)
    tail = (1.0 - rng.random(2500)) ** (-1.0 / (alpha - 1.0))  # Pareto, x_min = 1
    bulk = rng.uniform(0.05, 1.0, 1000)  # non-power-law bulk below x_min
    fit = fit_power_law(np.concatenate([bulk, tail]))
    assert isinstance(fit, PowerLawFit)
    assert abs(fit.alpha - alpha) < 0.1
    assert fit.x_min >= 0.5 and fit.n_tail <= 3500


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3, allow_nan=False), min_size=3, max_size=60, unique=True))
def test_vectorised_equals_bruteforce(values):
    x = np.array(values)
    fit = fit_power_law(x)
    alpha, xmin, ks = _bruteforce_fit(x)
    assert fit.x_min == pytest.approx(xmin, rel=1e-12)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.ks_distance == pytest.approx(ks, rel=1e-9, abs=1e-12)


def test_fit_fields_consistent():
    rng = np.random.default_rng(3)
    x = rng.pareto(2.0, 500) + 1
    fit = fit_power_law(x)
    assert fit.lambda_max == x.max() and fit.n_tail == int(np.sum(x >= fit.x_min))
    assert fit.alpha_hat == pytest.approx(fit.alpha * np.log10(x.max()))


@pytest.mark.parametrize("shape,seed", [((300, 500), 0), ((200, 200), 1), ((500, 160), 2)])
def test_random_matrix_matches_powerlaw_package(shape, seed):
    w = torch.tensor(np.random.default_rng(seed).standard_normal(shape))
    eigs = eigenvalues(w)
    fit = fit_power_law(eigs)
    reference = _powerlaw_fit(eigs, parameter_ranges=WIDE)
    assert fit.alpha == pytest.approx(reference.alpha, rel=0.02)
    assert fit.x_min == pytest.approx(reference.xmin, rel=1e-9)


def test_heavy_tail_matches_powerlaw_default_range():
    rng = np.random.default_rng(5)
    x = (1.0 - rng.random(800)) ** (-1.0 / 1.5) * 3.0  # alpha 2.5, inside powerlaw's default range
    assert fit_power_law(x).alpha == pytest.approx(_powerlaw_fit(x).alpha, rel=0.02)


@pytest.mark.parametrize("bad", [np.array([]), np.array([1.0, np.nan]), np.array([2.0, 2.0, 2.0]), np.array([-1.0, 2.0, 3.0])])
def test_fit_rejects_bad_input(bad):
    with pytest.raises(ActTailError):
        fit_power_law(bad)


# --- models ----------------------------------------------------------------------------------
def test_analyze_model_tiny(tiny_llama_dir):
    from acttail_export.modeling import iter_projections, load_model

    model, _ = load_model(str(tiny_llama_dir))
    fits = analyze_model(model, progress=False)
    projections = iter_projections(model)
    assert list(fits) == [name for name, *_ in projections]
    for name, _, _, module in projections:
        expected = fit_power_law(np.linalg.svd(module.weight.detach().double().numpy(), compute_uv=False) ** 2)
        assert fits[name].alpha == pytest.approx(expected.alpha, rel=1e-9)


@pytest.mark.slow
def test_smollm2_projections_match_powerlaw_package(smollm2):
    model, _ = smollm2
    names = ["model.layers.0.self_attn.q_proj", "model.layers.5.self_attn.v_proj", "model.layers.20.mlp.down_proj", "model.layers.12.mlp.up_proj"]
    for name in names:
        eigs = eigenvalues(model.get_submodule(name).weight)
        fit = fit_power_law(eigs)
        reference = _powerlaw_fit(eigs, parameter_ranges=WIDE)
        assert fit.alpha == pytest.approx(reference.alpha, rel=0.02), name
        assert fit.ks_distance == pytest.approx(reference.D, rel=1e-6), name


@pytest.mark.parametrize("block", [1024, 7])
@pytest.mark.parametrize("shape,seed", [((96, 160), 0), ((160, 96), 1), ((128, 128), 2)])
def test_gram_method_equals_svd(shape, seed, block, monkeypatch):
    """eigvalsh of the smaller Gram matrix = squared singular values (both sides of the rectangle),
    also when the Gram matrix is accumulated over many column blocks."""
    monkeypatch.setattr("acttail_export.spectral._GRAM_BLOCK", block)
    w = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).float()
    svd, gram = eigenvalues(w, device="cpu"), eigenvalues(w, device="cpu", method="gram")
    assert gram.shape == (min(shape),) and np.all(gram >= 0)
    np.testing.assert_allclose(gram, svd, rtol=1e-9, atol=1e-9 * svd[-1])
    a, b = fit_power_law(svd), fit_power_law(gram)
    assert a.x_min == pytest.approx(b.x_min, rel=1e-9) and a.alpha == pytest.approx(b.alpha, rel=1e-9)
    with pytest.raises(ActTailError, match="eigenvalue method"):
        eigenvalues(w, method="qr")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3, allow_nan=False), min_size=3, max_size=80, unique=True),
       st.sampled_from([1, 7, 1 << 22]))
def test_torch_ks_scan_equals_numpy(values, chunk_elements):
    """The torch KS scan (what runs on a GPU) gives the numpy fit, also across chunk boundaries."""
    import acttail_export.spectral as spectral

    eigs = np.asarray(values)
    old = spectral._KS_CHUNK_ELEMENTS
    spectral._KS_CHUNK_ELEMENTS = chunk_elements
    try:
        a, b = fit_power_law(eigs), fit_power_law(eigs, device="cpu")
    finally:
        spectral._KS_CHUNK_ELEMENTS = old
    assert a.x_min == b.x_min and a.n_tail == b.n_tail
    assert b.alpha == pytest.approx(a.alpha, rel=1e-12) and b.ks_distance == pytest.approx(a.ks_distance, rel=1e-9, abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fit_equals_cpu_fit():
    w = torch.from_numpy(np.random.default_rng(3).standard_normal((256, 384)))
    eigs = eigenvalues(w, device="cpu")
    a, b = fit_power_law(eigs), fit_power_law(eigs, device="cuda")
    assert a.x_min == b.x_min and b.alpha == pytest.approx(a.alpha, rel=1e-12)
    g = eigenvalues(w.cuda(), method="gram")
    np.testing.assert_allclose(g, eigs, rtol=1e-9, atol=1e-9 * eigs[-1])
