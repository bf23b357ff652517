"""Model loading: architecture checks, GGUF tokenizer fixes, the GGUF cache, projection order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from acttail_export import modeling
from acttail_export.config import PROJECTION_KINDS, SUPPORTED_ARCHITECTURES
from acttail_export.errors import ActTailError
from acttail_export.modeling import (
    default_model_path,
    gguf_cache_dir,
    gguf_cache_key,
    iter_projections,
    load_model,
    load_tokenizer,
    read_gguf_info,
)


def _write_gguf(path: Path, architecture: str, add_bos: bool = False) -> Path:
    """A metadata-only GGUF file (no tensors) for architecture / cache tests."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- reference resolution / errors ----------------------------------------------------------
def test_default_model_path_is_the_smollm2_gguf():
    path = Path(default_model_path())
    assert path.is_file() and path.suffix == ".gguf" and "SmolLM2-135M" in path.name


def test_missing_path_raises(tmp_path):
    with pytest.raises(ActTailError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ActTailError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.gguf"))


def test_folder_without_config_raises(tmp_path):
    with pytest.raises(ActTailError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_checked_before_weights(tmp_path):
    # only a GPT-2 config.json, no weights: the error must come from the config check
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ActTailError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and all(name in message for name in SUPPORTED_ARCHITECTURES)


def test_unsupported_gguf_architecture(tmp_path):
    path = _write_gguf(tmp_path / "tiny.gguf", "gpt2")
    with pytest.raises(ActTailError, match="unsupported architecture.*LlamaForCausalLM"):
        load_model(str(path))


def test_non_gguf_file_with_gguf_suffix(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ActTailError, match="not a readable GGUF"):
        load_model(str(path))


def test_bad_dtype(tiny_llama_dir):
    with pytest.raises(ActTailError, match="dtype"):
        load_model(str(tiny_llama_dir), dtype="bf13")


@pytest.mark.parametrize("content, message", [
    (b"[]", "holds a JSON list, not an object"),
    (b"null", "holds a JSON NoneType, not an object"),
    (b'{"architectures": ["LlamaForCausalLM"], "x": "\xe9t\xe9"}', "is not UTF-8 text"),
    (b'{"architectures": "LlamaForCausalLM"}', "'architectures' must be a list"),
    (b'{"model_type": ["llama"]}', "unsupported architecture"),
])
def test_malformed_config_json_is_a_one_line_error(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    for call in (modeling.check_model_ref, load_model, load_tokenizer):
        with pytest.raises(ActTailError, match=message) as info:
            call(str(tmp_path))
        assert "\n" not in str(info.value)


def _sharded_folder(folder: Path, present: list[str], listed: list[str]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    weight_map = {f"model.layers.{i}.weight": shard for i, shard in enumerate(listed)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for shard in present:
        (folder / shard).write_bytes(b"")
    return folder


def test_missing_shard_of_a_sharded_checkpoint(tmp_path):
    listed = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    folder = _sharded_folder(tmp_path / "m", [listed[0], listed[2]], listed)
    for call in (modeling.check_model_ref, modeling.resolve_model, load_model):
        with pytest.raises(ActTailError, match=r"shard .*model-00002-of-00003\.safetensors listed in model\.safetensors\.index\.json "
                                               r"is missing \(2 of 3 shards present\)"):
            call(str(folder))
    (folder / listed[1]).write_bytes(b"")
    assert modeling.check_model_ref(str(folder)) == "LlamaForCausalLM"  # complete: only the index is read here
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ActTailError, match="has no weight_map"):
        modeling.check_model_ref(str(folder))


def test_check_weights_reads_every_indexed_shard(tiny_llama_dir, tmp_path):
    """A real sharded save passes; truncating one shard is caught by the header / size check."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(folder, max_shard_size="4MB")
    modeling.check_weights(folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ActTailError, match=f"{shard.name} is truncated or corrupted"):
        modeling.check_weights(folder)


# --- the smollm2 alias and recorded references ------------------------------------------------
def test_smollm2_alias_is_resolved_by_modeling():
    """analyze / evaluate reach the model through modeling: the alias must work there, not only in export."""
    for alias in ("smollm2", "SmolLM2", " smollm2 "):
        assert modeling.expand_model_alias(alias) == default_model_path()
    assert modeling.expand_model_alias("smollm2-135m") == "smollm2-135m"
    assert modeling.check_model_ref("SmolLM2") == "LlamaForCausalLM"
    assert modeling.resolve_model("smollm2") == default_model_path()


def test_alias_resolution_reaches_load_model(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(modeling, "default_model_path", lambda: str(tiny_llama_dir))
    model, tokenizer = load_model("smollm2")
    assert model.config.hidden_size == 64 and tokenizer.eos_token_id == 2
    assert modeling.resolve_model_ref("SMOLLM2") == str(tiny_llama_dir)


def test_relative_local_paths_resolve_to_absolute(tiny_llama_dir, monkeypatch):
    """What gets recorded must not depend on the working directory (nor become a Hub id elsewhere)."""
    import os

    def names_the_model(ref: str) -> bool:
        return os.path.isabs(ref) and os.path.normpath(ref) == ref and Path(ref).resolve() == tiny_llama_dir.resolve()

    monkeypatch.chdir(tiny_llama_dir.parent)
    relative = tiny_llama_dir.name
    assert names_the_model(modeling.resolve_model(relative))
    assert names_the_model(modeling.resolve_model(f"./{relative}/../{relative}"))
    assert names_the_model(modeling.resolve_model_ref(relative))
    model, _ = load_model(relative)
    assert names_the_model(model.config._name_or_path)
    from acttail_export.allocation import build_config

    assert names_the_model(build_config(model, 0.5, allocation="uniform").model)


def test_resolve_model_keeps_hub_ids_and_rejects_empty(monkeypatch):
    monkeypatch.setattr(modeling, "check_model_ref", lambda ref: "LlamaForCausalLM")  # no network
    assert modeling.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    for empty in (None, "", "  "):
        with pytest.raises(ActTailError, match="no model given"):
            modeling.resolve_model(empty)


# --- folders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_mistral_dir"])
def test_load_folder_matches_transformers(fixture, request):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    model, tokenizer = load_model(str(folder))
    assert not model.training
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 100, 2000, 30000, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert tokenizer.eos_token_id == 2


def test_fp16_load(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype="fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_mistral_dir"])
def test_iter_projections_order(fixture, request):
    model, _ = load_model(str(request.getfixturevalue(fixture)))
    projections = iter_projections(model)
    layers = model.config.num_hidden_layers
    assert len(projections) == layers * len(PROJECTION_KINDS)
    assert [(layer, kind) for _, layer, kind, _ in projections] == [(i, k) for i in range(layers) for k in PROJECTION_KINDS]
    for name, layer, kind, module in projections:
        assert model.get_submodule(name) is module
        assert name.startswith(f"model.layers.{layer}.") and name.endswith(kind)


def test_iter_projections_rejects_other_models():
    with pytest.raises(ActTailError, match="model.layers"):
        iter_projections(torch.nn.Linear(2, 2))


# --- GGUF tokenizer fixes and cache ---------------------------------------------------------
def test_gguf_tokenizer_fixes_follow_metadata():
    path = default_model_path()
    info = read_gguf_info(path)
    tokenizer = load_tokenizer(path)
    assert info.eos_token_id == 2 and info.add_bos_token is False  # what SmolLM2's GGUF declares
    assert tokenizer.eos_token_id == info.eos_token_id and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token_id == info.bos_token_id
    assert tokenizer.pad_token_id == info.pad_token_id
    assert tokenizer.add_bos_token is False
    ids = tokenizer("Hello world").input_ids
    assert ids[0] != info.bos_token_id and tokenizer.decode(ids) == "Hello world"


@pytest.mark.slow
def test_uncached_gguf_tokenizer_equals_cached():
    path = Path(default_model_path())
    raw = modeling._load_gguf_tokenizer_uncached(path)
    cached = load_tokenizer(str(path))
    text = "The tower is 324 metres (1,063 ft) tall.\n<|im_end|>"
    assert raw(text).input_ids == cached(text).input_ids
    assert (raw.eos_token_id, raw.bos_token_id, raw.add_bos_token) == (cached.eos_token_id, cached.bos_token_id, cached.add_bos_token)


def test_fix_gguf_tokenizer_uses_metadata_ids(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    info = modeling.GGUFTokenizerInfo("llama", bos_token_id=0, eos_token_id=1, pad_token_id=None, unk_token_id=None, add_bos_token=True,
                                      add_eos_token=None)
    fixed = modeling.fix_gguf_tokenizer(tokenizer, info)
    assert (fixed.bos_token_id, fixed.eos_token_id, fixed.add_bos_token) == (0, 1, True)
    assert fixed("hi").input_ids[0] == 0


def test_cache_key_tracks_content(tmp_path, monkeypatch):
    a = _write_gguf(tmp_path / "a.gguf", "llama")
    b = _write_gguf(tmp_path / "b.gguf", "llama", add_bos=True)
    shutil.copy(a, tmp_path / "a2.gguf")
    assert gguf_cache_key(a).split("-")[1] == gguf_cache_key(tmp_path / "a2.gguf").split("-")[1]
    assert gguf_cache_key(a).split("-")[1] != gguf_cache_key(b).split("-")[1]
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    assert gguf_cache_dir(a).parent == tmp_path / "cache"
    # one folder per transformers line: the optimum extra's transformers 4.57 cannot read a 5.x tokenizer file
    import transformers

    line = ".".join(transformers.__version__.split(".")[:2])
    assert gguf_cache_dir(a).name == f"{gguf_cache_key(a)}-transformers{line}"


def test_gguf_load_uses_cache_folder(tmp_path, monkeypatch, tiny_llama_dir):
    """A populated cache entry is loaded instead of dequantizing the GGUF again."""
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    gguf_path = _write_gguf(tmp_path / "tiny.gguf", "llama")
    shutil.copytree(tiny_llama_dir, gguf_cache_dir(gguf_path))
    monkeypatch.setattr(modeling, "_load_gguf_tokenizer_uncached", lambda path: pytest.fail("cache not used"))
    model, tokenizer = load_model(str(gguf_path))
    assert model.config.hidden_size == 64 and tokenizer.eos_token_id == 2


@pytest.mark.slow
def test_smollm2_weights_match_gguf_dequantization(smollm2):
    """Cached weights equal an independent numpy dequantization of the GGUF tensors (gguf.quants)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _ = smollm2
    reader = GGUFReader(default_model_path())
    tensors = {t.name: t for t in reader.tensors}
    pairs = [("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj"), ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj")]
    for gguf_name, hf_name in pairs:
        tensor = tensors[gguf_name]
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(list(reversed(tensor.shape.tolist())))
        actual = model.get_submodule(hf_name).weight.detach().numpy()
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    assert model.config.architectures == ["LlamaForCausalLM"] and len(iter_projections(model)) == 210
