"""End-to-end exports of tiny Llama / Mistral models: folder contents, validation, generation vs PyTorch."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import onnx
import pytest
import torch

from acttail_export.config import CONFIG_NAME, PROJECTION_KINDS, ActTailConfig
from acttail_export.errors import ActTailError, ExportValidationError

# the optimum base (ORTModelForCausalLM loading, fp16 on CPU); the default genai base: tests/test_optimize.py
pytestmark = pytest.mark.optimum
FAST = dict(calibration_samples=2, sequence_length=32, eval_tokens=128, progress=False, base="optimum")
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived"]


def _export(model_dir, out, **kw):
    from acttail_export.exporter import export

    return export(str(model_dir), out, **{**FAST, **kw})


@pytest.fixture(scope="module")
def llama_topk(tiny_llama_dir, tmp_path_factory):
    return _export(tiny_llama_dir, tmp_path_factory.mktemp("exp") / "llama-topk", sparsity=0.5, mode="topk")


@pytest.fixture(scope="module")
def mistral_threshold(tiny_mistral_dir, tmp_path_factory):
    return _export(tiny_mistral_dir, tmp_path_factory.mktemp("exp") / "mistral-thr", sparsity=0.6, mode="threshold",
                   allocation="uniform")


def test_output_folder_contents(llama_topk, tiny_llama_dir):
    names = {p.name for p in llama_topk.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            CONFIG_NAME, "README.md"} <= names
    assert not any(n.startswith(".") for n in names)  # no leftover base export
    assert not [p for p in llama_topk.parent.iterdir() if ".acttail-" in p.name]  # temp folder renamed away
    config = ActTailConfig.load(llama_topk)
    raw = json.loads((llama_topk / CONFIG_NAME).read_text())
    assert raw["model"] == str(tiny_llama_dir) and raw["architecture"] == "LlamaForCausalLM"
    assert config.mode == "topk" and config.kernel == "mask" and config.target_sparsity == 0.5
    assert len(config.projections) == 2 * len(PROJECTION_KINDS)
    assert math.isclose(config.weighted_sparsity(), 0.5, abs_tol=1e-6)
    # the default at 50 % is TEAL's greedy search (config.DEFAULT_POLICY): budgets from the search, no alphas read
    assert (config.allocation, config.allocation_method) == ("acttail", "teal-greedy")
    assert len({round(p.sparsity, 9) for p in config.projections}) > 1
    for p in config.projections:
        assert p.alpha is None
        assert p.threshold is not None and p.k == math.ceil((1 - p.sparsity) * p.in_features - 1e-9)
    # top-k keeps exactly k per token, so the effective sparsity follows from k
    expect = sum((1 - p.k / p.in_features) * p.parameters for p in config.projections) / sum(p.parameters for p in config.projections)
    assert config.effective_sparsity == pytest.approx(expect, abs=1e-9)
    assert config.calibration.samples == 2 and config.calibration.sequence_length == 32
    assert config.calibration.data.endswith("wiki.valid.raw")
    assert {"torch", "transformers", "onnx", "onnxruntime", "optimum", "optimum-onnx"} <= set(config.versions)  # this base's
    assert config.perplexity["perplexity"] > 1 and config.perplexity["tokens"] == 128
    validation = config.perplexity["validation"]
    assert {"max_abs_logit_diff", "median_rel_error", "top1_agreement"} <= set(validation)  # free-running: reported only
    assert max(validation["forced_mask_rel_error"], validation["projection_rel_error"], validation["cached_step_rel_error"]) < 1e-4
    graph = onnx.load(str(llama_topk / "model.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in graph.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]


def test_model_card(llama_topk):
    card = (llama_topk / "README.md").read_text()
    config = ActTailConfig.load(llama_topk)
    assert f"{config.perplexity['perplexity']:.3f}" in card
    assert "load_model(" in card and "generate(" in card
    assert "- allocation `acttail` = `teal-greedy` (TEAL's block-wise greedy search on the calibration text)" in card
    for p in config.projections:  # no alpha under the greedy search: a dash
        assert f"| {p.name} | – | {p.sparsity:.3f} |" in card


def _reference_generate(model_dir, config, prompts, max_new_tokens=8):
    from acttail_export.modeling import load_model
    from acttail_export.sparsify import apply_sparsity

    model, tokenizer = load_model(str(model_dir))
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with apply_sparsity(model, config), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return inputs, out


def _onnx_generate(export_dir, inputs, max_new_tokens=8):
    from acttail_export.runtime import load_model

    ort_model = load_model(export_dir)
    return ort_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=ort_model.generation_config.pad_token_id or 2)


@pytest.mark.parametrize("which", ["llama_topk", "mistral_threshold"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "left-padded-batch"])
def test_greedy_generation_matches_pytorch_sparse_reference(which, prompts, request, tiny_llama_dir, tiny_mistral_dir):
    export_dir = request.getfixturevalue(which)
    model_dir = tiny_llama_dir if which == "llama_topk" else tiny_mistral_dir
    config = ActTailConfig.load(export_dir)
    inputs, want = _reference_generate(model_dir, config, prompts)
    if len(prompts) > 1:
        assert (inputs["attention_mask"] == 0).any()  # really left-padded
    got = _onnx_generate(export_dir, inputs)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_mistral_threshold_export(mistral_threshold):
    config = ActTailConfig.load(mistral_threshold)
    assert config.architecture == "MistralForCausalLM" and config.allocation == "uniform"
    assert all(p.sparsity == pytest.approx(0.6) for p in config.projections)
    # measured on validation text: near the target, not exactly it
    assert 0.4 < config.effective_sparsity < 0.8
    graph = onnx.load(str(mistral_threshold / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "Greater" and n.name.startswith("/acttail/") for n in graph.graph.node) == 14


def test_fused_kernel_export_runs_with_the_op_library(tiny_llama_dir, tmp_path):
    out = _export(tiny_llama_dir, tmp_path / "fused", sparsity=0.5, mode="topk", kernel="fused")
    assert (out / "libacttail_ops.so").is_file()
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    config = ActTailConfig.load(out)
    # one op per projection the budgets sparsify (the greedy search may leave a projection dense: no op there)
    assert sum(n.domain == "com.acttail" for n in graph.graph.node) == sum(p.sparsity > 0 for p in config.projections) > 7
    inputs, want = _reference_generate(tiny_llama_dir, config, PROMPTS[:1])
    assert torch.equal(_onnx_generate(out, inputs), want)


def test_fused_export_carries_the_op_library_under_the_runtime_name(tiny_llama_dir, tmp_path, monkeypatch):
    """A library built under another file name ($ACTTAIL_OPS_LIBRARY) is copied as libacttail_ops.so, and the
    export then loads without any library outside its folder."""
    import shutil

    import acttail_export.ops as ops
    from acttail_export.ops import get_library_path
    from acttail_export.runtime import LIBRARY_FILE, load_session_options

    custom = tmp_path / "lib" / "my_build_of_ops.so"
    custom.parent.mkdir()
    shutil.copyfile(get_library_path(), custom)
    monkeypatch.setattr(ops, "_PACKAGE_LIB", tmp_path / "missing" / "libacttail_ops.so")
    monkeypatch.setenv("ACTTAIL_OPS_LIBRARY", str(custom))
    out = _export(tiny_llama_dir, tmp_path / "fused", sparsity=0.5, kernel="fused", validate=False)
    assert sorted(p.name for p in out.glob("*.so")) == [LIBRARY_FILE]
    assert (out / LIBRARY_FILE).read_bytes() == custom.read_bytes()
    custom.unlink()  # only the export's own copy is left to load
    monkeypatch.delenv("ACTTAIL_OPS_LIBRARY")
    import onnxruntime as ort

    ort.InferenceSession(str(out / "model.onnx"), load_session_options(out), providers=["CPUExecutionProvider"])


def test_overwrite_replaces_and_validation_failure_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    _export(tiny_llama_dir, out, sparsity=0.3, overwrite=True, validate=False)
    assert not (out / "old.txt").exists() and (out / "model.onnx").is_file()
    assert ActTailConfig.load(out).perplexity == {}  # --no-validate: nothing measured
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # a graph that disagrees with the reference (every mask dropped) must be refused, OUTPUT_DIR untouched
    import acttail_export.graph_rewrite as gr

    monkeypatch.setattr(gr, "_mask_nodes", lambda b, p, x, elem, mode: ([], x))
    with pytest.raises(ExportValidationError, match="ONNX model disagrees with PyTorch: projection error"):
        _export(tiny_llama_dir, out, sparsity=0.5, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".acttail-" in p.name]


def _stub_build(write=None):
    """A stand-in for exporter._build (the pipeline proper): writes one file into the temp folder, or calls ``write``."""
    def build(model_ref, tmp, *args, **kwargs):
        (tmp / "model.onnx").write_bytes(b"stub")
        if write is not None:
            write(tmp)
        return ActTailConfig(target_sparsity=0.5)
    return build


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_export_folder_gets_the_umask_mode(tiny_llama_dir, tmp_path, monkeypatch, umask_022):
    import acttail_export.exporter as exporter

    monkeypatch.setattr(exporter, "_build", _stub_build())
    out = _export(tiny_llama_dir, tmp_path / "out", validate=False)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    # replacing an existing export (--overwrite) too
    out = _export(tiny_llama_dir, out, validate=False, overwrite=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and (out / "model.onnx").read_bytes() == b"stub"


def test_bad_mapping_through_the_api_fails_before_loading(tiny_llama_dir, tmp_path, monkeypatch):
    import acttail_export.modeling as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad mapping was refused")
    monkeypatch.setattr(modeling, "load_model", refuse)
    out = tmp_path / "np" / "out"
    for allocation in ("acttail", "uniform"):
        with pytest.raises(ActTailError, match="mapping must be one of .*; got 'no-such-mapping'") as err:
            _export(tiny_llama_dir, out, allocation=allocation, mapping="no-such-mapping")
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [ActTailError("calibration failed"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_export_removes_the_parent_folders_it_created(error, tiny_llama_dir, tmp_path, monkeypatch):
    import acttail_export.exporter as exporter

    def fail(tmp):
        raise error
    monkeypatch.setattr(exporter, "_build", _stub_build(fail))
    with pytest.raises(type(error)):
        _export(tiny_llama_dir, tmp_path / "np" / "sub" / "exp", validate=False)
    assert list(tmp_path.iterdir()) == []
    # a parent that existed before stays; one that something else wrote into during the run stays too
    (tmp_path / "mine").mkdir()
    monkeypatch.setattr(exporter, "_build", _stub_build(lambda tmp: ((tmp.parent.parent / "other.txt").write_text("x"), fail(tmp))))
    with pytest.raises(type(error)):
        _export(tiny_llama_dir, tmp_path / "mine" / "a" / "b" / "exp", validate=False)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["mine", "mine/a", "mine/a/other.txt"]
    # a successful export keeps the parents it made
    monkeypatch.setattr(exporter, "_build", _stub_build())
    assert (_export(tiny_llama_dir, tmp_path / "ok" / "sub" / "exp", validate=False) / "model.onnx").is_file()


def test_output_written_meanwhile_is_not_replaced_without_overwrite(tiny_llama_dir, tmp_path, monkeypatch):
    """Two exports to one new OUTPUT_DIR both pass the early check; the one finishing second must not replace
    the first one's folder (the final rename re-checks), and must leave no temporary folder."""
    import acttail_export.exporter as exporter

    out = tmp_path / "out"

    def concurrent_export_finishes(tmp):
        out.mkdir()
        (out / "model.onnx").write_text("the other export")
    monkeypatch.setattr(exporter, "_build", _stub_build(concurrent_export_finishes))
    with pytest.raises(ActTailError, match="created by another process during the export") as err:
        _export(tiny_llama_dir, out, validate=False)
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_text() == "the other export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # an empty folder made meanwhile may be used (as the early check allows), and --overwrite replaces a full one
    import shutil

    shutil.rmtree(out)
    monkeypatch.setattr(exporter, "_build", _stub_build(lambda tmp: out.mkdir()))
    assert (_export(tiny_llama_dir, out, validate=False) / "model.onnx").read_bytes() == b"stub"
    shutil.rmtree(out)
    monkeypatch.setattr(exporter, "_build", _stub_build(concurrent_export_finishes))
    assert (_export(tiny_llama_dir, out, validate=False, overwrite=True) / "model.onnx").read_bytes() == b"stub"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_compare_logits_is_robust_to_one_flip():
    from acttail_export.exporter import compare_logits

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 50, 100)).astype(np.float32)
    flipped = ref.copy()
    flipped[0, 40:] += 0.05 * rng.standard_normal((10, 100))  # a boundary flip perturbs the positions after it
    stats = compare_logits(ref, flipped)
    assert stats["median_rel_error"] == 0 and stats["max_abs_diff"] > 0.05
    broken = ref + 0.05 * rng.standard_normal(ref.shape)  # a wrong mask moves every position
    assert compare_logits(ref, broken)["median_rel_error"] > 1e-2


def test_fp16_export_validates(tiny_llama_dir, tmp_path):
    out = _export(tiny_llama_dir, tmp_path / "fp16", sparsity=0.5, mode="topk", dtype="fp16", eval_tokens=0)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    validation = ActTailConfig.load(out).perplexity["validation"]
    assert validation["tolerance"] == 2e-2
    assert max(validation["forced_mask_rel_error"], validation["projection_rel_error"], validation["cached_step_rel_error"]) <= 2e-2
    # no perplexity was asked for (eval_tokens=0): the config and the card say so, not "--no-validate"
    assert ActTailConfig.load(out).perplexity["skipped"] == "not requested: eval_tokens=0"
    card = (out / "README.md").read_text()
    assert "eval_tokens=0" in card and "--no-validate" not in card


def test_smollm2_alias_resolves_to_the_bundled_gguf():
    from acttail_export.exporter import resolve_model
    from acttail_export.modeling import default_model_path

    assert resolve_model("smollm2") == resolve_model("SmolLM2") == default_model_path()
    assert resolve_model(default_model_path()).endswith(".gguf")
