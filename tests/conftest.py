"""Shared fixtures: tiny random Llama / Mistral checkpoints (fast) and the real SmolLM2-135M (slow).

Tests marked ``optimum`` need the optimum extra (optimum-onnx pins transformers 4.57): ``make test`` runs them in
``.venv-optimum/`` and every other test in ``.venv/`` (transformers 5, onnxruntime-genai's builder).

The tiny models use SmolLM2's real tokenizer (with the GGUF fixes) so that exports carry a real
tokenizer and generation can be checked end to end.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# WikiText-2 raw (wiki.valid.raw, wiki.test.raw): `make test` passes its folder in ACTTAIL_WIKITEXT_DIR; the
# library's defaults read the same variable, so tests that rely on the default calibration text use it too.
WIKITEXT = Path(os.environ.get("ACTTAIL_WIKITEXT_DIR") or REPO.parent / "shared" / "data" / "wikitext-2")
os.environ["ACTTAIL_WIKITEXT_DIR"] = str(WIKITEXT)


def _optimum_importable() -> bool:
    try:
        import optimum.exporters.onnx  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or a transformers it does not support
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """Outside `make test` (which selects with -m), an `optimum` test in an environment without the extra says where it runs."""
    if _optimum_importable():
        return
    skip = pytest.mark.skip(reason="needs the optimum extra: `make test-optimum` runs it in .venv-optimum/")
    for item in items:
        if item.get_closest_marker("optimum") is not None:
            item.add_marker(skip)


def _tiny_config(architecture: str):
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    if architecture == "llama":
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    return MistralConfig(**common, sliding_window=None, architectures=["MistralForCausalLM"])


def _save_tiny(architecture: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from acttail_export.modeling import default_model_path, load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(architecture))
    model.eval()
    model.save_pretrained(folder)
    load_tokenizer(default_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _greedy_cache(tmp_path_factory):
    """The greedy search's cache (the default allocation runs it) in the session's temporary folder, not ~/.cache."""
    from acttail_export import greedy

    folder = tmp_path_factory.mktemp("greedy-cache")
    original, initial = greedy.default_cache_dir, os.environ.get("ACTTAIL_CACHE")
    # a test that sets $ACTTAIL_CACHE itself gets the library's own rule
    greedy.default_cache_dir = lambda: original() if os.environ.get("ACTTAIL_CACHE") != initial else folder
    yield folder
    greedy.default_cache_dir = original


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    return _save_tiny("mistral", tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return WIKITEXT / "wiki.valid.raw"


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    return WIKITEXT / "wiki.test.raw"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, loaded once per test session."""
    from acttail_export.modeling import default_model_path, load_model

    return load_model(default_model_path())
