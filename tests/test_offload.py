"""Sharded / offloaded models (accelerate device maps with CPU + disk offload) give the same alphas,
thresholds and perplexity as the model loaded on one device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acttail_export import allocation, calibration, spectral
from acttail_export.evaluation import perplexity_windows
from acttail_export.modeling import load_model
from acttail_export.offload import PeakMemory, input_device, load_model_sharded, projection_weight

DEVICE_MAPS = {
    # layer 1 and the final norm on disk: their weights live on `meta` between uses
    "cpu+disk": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"},
    # every decoder layer on disk
    "disk-layers": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk",
                    "model.norm": "cpu", "lm_head": "cpu"},
}


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    return model, tokenizer


def _windows(tokenizer, path, n=6, length=64):
    ids = tokenizer(path.read_text()[:60000], return_tensors="pt").input_ids[0]
    return ids[: n * length].reshape(n, length)


@pytest.mark.parametrize("map_name", sorted(DEVICE_MAPS))
def test_offloaded_alphas_thresholds_and_perplexity_equal_single_device(map_name, reference, tiny_llama_dir, tmp_path, wikitext_valid):
    ref_model, tokenizer = reference
    model, _ = load_model_sharded(str(tiny_llama_dir), device_map=DEVICE_MAPS[map_name], offload_folder=tmp_path / "offload")
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert offloaded, "the device map should leave some weights on disk (meta tensors)"

    ref_fits = spectral.analyze_model(ref_model, progress=False)
    fits = spectral.analyze_model(model, progress=False)
    assert list(fits) == list(ref_fits)
    for name, ref_fit in ref_fits.items():
        np.testing.assert_allclose(fits[name].alpha, ref_fit.alpha, rtol=1e-6)
        np.testing.assert_allclose(fits[name].x_min, ref_fit.x_min, rtol=1e-6)
    # the weights went back to disk after the analysis
    assert [n for n, p in model.named_parameters() if p.device.type == "meta"] == offloaded

    windows = _windows(tokenizer, wikitext_valid)
    ref_config = allocation.build_config(ref_model, 0.6, allocation="htsr", mode="threshold", fits=ref_fits)
    config = allocation.build_config(model, 0.6, allocation="htsr", mode="threshold", fits=fits)
    calibration.calibrate(ref_model, tokenizer, ref_config, windows=windows, progress=False)
    calibration.calibrate(model, tokenizer, config, windows=windows, progress=False)
    for ref_p, p in zip(ref_config.projections, config.projections):
        assert p.name == ref_p.name and p.sparsity == ref_p.sparsity
        assert p.threshold == ref_p.threshold  # exactly

    ref_ppl = perplexity_windows(ref_model, windows, ref_config, progress=False)
    ppl = perplexity_windows(model, windows, config, progress=False)
    np.testing.assert_allclose(ppl["perplexity"], ref_ppl["perplexity"], rtol=1e-5)
    np.testing.assert_allclose(ppl["effective_sparsity"], ref_ppl["effective_sparsity"], rtol=1e-9)


def test_max_memory_forces_offload_and_matches(tmp_path):
    """``device_map="auto"`` with a host-memory cap puts later layers on disk; logits are unchanged."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="auto", max_memory={"cpu": "600KB"},
                                                 offload_folder=str(tmp_path / "off")).eval()
    placement = set(model.hf_device_map.values())
    assert placement == {"cpu", "disk"}, model.hf_device_map
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.inference_mode():
        expected = ref_model(input_ids=ids).logits
        got = model(input_ids=ids.to(input_device(model))).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ref_fits = spectral.analyze_model(ref_model, progress=False)
    fits = spectral.analyze_model(model, progress=False)
    for name, fit in ref_fits.items():
        np.testing.assert_allclose(fits[name].alpha, fit.alpha, rtol=1e-6)


def test_projection_weight_materializes_then_releases(tiny_llama_dir, tmp_path, reference):
    ref_model, _ = reference
    model, _ = load_model_sharded(str(tiny_llama_dir), device_map=DEVICE_MAPS["disk-layers"], offload_folder=tmp_path / "off")
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    assert module.weight.device.type == "meta"
    with projection_weight(module) as weight:
        torch.testing.assert_close(weight, ref_model.get_submodule("model.layers.1.mlp.down_proj").weight, rtol=0, atol=0)
    assert module.weight.device.type == "meta"
    with PeakMemory.measure() as peak:
        spectral.analyze_model(model, progress=False)
    assert peak.host_rss_mib > 0 and peak.gpu_peak_mib == {}


def test_peak_memory_on_a_gpu_machine_before_cuda_is_initialized(monkeypatch):
    """On a machine with a GPU where CUDA is not initialized yet (the export's first stage, 'load model', before
    anything touched the GPU), PyTorch's reset_peak_memory_stats raises "Invalid device argument": measure must not
    call it then, and must report the block's peak once the block itself initialized CUDA (found on the H200,
    2026-12-02: every `export --device cuda` failed in its first stage)."""
    state = {"initialized": False, "peak": {0: 0}}

    def reset(i):
        if not state["initialized"]:
            raise RuntimeError("Invalid device argument ")
        state["peak"][i] = 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: state["peak"][i])
    with PeakMemory.measure() as peak:  # the block initializes CUDA and allocates 3 MiB
        state["initialized"], state["peak"][0] = True, 3 * 2**20
    assert peak.gpu_peak_mib == {"cuda:0": 3.0}
    state["peak"][0] = 5 * 2**20  # an earlier block's peak is reset once CUDA is up
    with PeakMemory.measure() as peak:
        state["peak"][0] = max(state["peak"][0], 2**20)
    assert peak.gpu_peak_mib == {"cuda:0": 1.0}
