"""Runtime loader: damaged export folders fail with one-line ActTailErrors; ORT perplexity equals PyTorch's."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from acttail_export.config import CONFIG_NAME
from acttail_export.errors import ActTailError
from acttail_export.runtime import check_export_dir, load_model, load_session_options, perplexity_onnx


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    from acttail_export.exporter import export

    out = tmp_path_factory.mktemp("rt") / "llama"
    return export(str(tiny_llama_dir), out, sparsity=0.5, mode="topk", kernel="fused", base="optimum",
                  calibration_samples=2, sequence_length=32, validate=False, progress=False)


@pytest.fixture
def copy(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported, dst)
    return dst


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.optimum  # load_model: optimum-onnx's ORTModelForCausalLM
def test_clean_export_loads(exported):
    config, fused = check_export_dir(exported)
    assert fused and config.kernel == "fused" and len(config.projections) == 14
    model = load_model(exported)
    assert model.can_use_cache


@pytest.mark.optimum  # load_model: optimum-onnx's ORTModelForCausalLM
def test_truncated_model_onnx(copy):
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ActTailError, match="truncated, re-run the export") as exc:
        load_model(copy)
    _one_line(exc)


@pytest.mark.optimum  # load_model: optimum-onnx's ORTModelForCausalLM
def test_missing_external_data(copy):
    graph = onnx.load(str(copy / "model.onnx"))
    onnx.save_model(graph, str(copy / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    check_export_dir(copy)  # complete external-data export is fine
    size = (copy / "model.onnx_data").stat().st_size
    with open(copy / "model.onnx_data", "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(ActTailError, match="model.onnx_data is truncated"):
        load_model(copy)
    (copy / "model.onnx_data").unlink()
    with pytest.raises(ActTailError, match="model.onnx_data is missing") as exc:
        load_model(copy)
    assert "re-run the export" in _one_line(exc)


@pytest.mark.optimum  # load_model: optimum-onnx's ORTModelForCausalLM
def test_config_that_disagrees_with_the_graph(copy):
    raw = json.loads((copy / CONFIG_NAME).read_text())
    raw["projections"] = raw["projections"][:-1]
    (copy / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(ActTailError, match="13 projections but the ONNX graph has 14") as exc:
        load_model(copy)
    _one_line(exc)
    raw = json.loads((copy / CONFIG_NAME).read_text())
    (copy / CONFIG_NAME).unlink()
    with pytest.raises(ActTailError, match="acttail_config.json not found"):
        load_model(copy)


@pytest.mark.optimum  # load_model: optimum-onnx's ORTModelForCausalLM
def test_kernel_mismatch(copy):
    raw = json.loads((copy / CONFIG_NAME).read_text())
    raw["kernel"] = "mask"
    (copy / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(ActTailError, match="different exports"):
        load_session_options(copy)


@pytest.mark.optimum  # load_model: optimum-onnx's ORTModelForCausalLM
def test_op_library_missing(copy, monkeypatch, tmp_path):
    import acttail_export.ops as ops

    (copy / "libacttail_ops.so").unlink()
    monkeypatch.setattr(ops, "_PACKAGE_LIB", tmp_path / "nowhere" / "libacttail_ops.so")
    monkeypatch.delenv("ACTTAIL_OPS_LIBRARY", raising=False)
    with pytest.raises(ActTailError, match="make ops") as exc:
        load_model(copy)
    _one_line(exc)


@pytest.mark.optimum  # load_model: optimum-onnx's ORTModelForCausalLM
def test_missing_folder(tmp_path):
    with pytest.raises(ActTailError, match="does not exist: run `acttail-export export"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ActTailError, match="model.onnx not found"):
        load_model(tmp_path / "empty")


@pytest.fixture(scope="module")
def exported_threshold(tiny_llama_dir, tmp_path_factory):
    """Threshold mode: a deterministic rule (top-k ties may be broken differently by torch.topk)."""
    from acttail_export.exporter import export

    out = tmp_path_factory.mktemp("rt") / "llama-threshold"
    return export(str(tiny_llama_dir), out, sparsity=0.5, mode="threshold", kernel="mask",
                  calibration_samples=2, sequence_length=32, validate=False, progress=False)


def test_perplexity_onnx_matches_pytorch_evaluation(exported_threshold, tiny_llama_dir, wikitext_test):
    exported = exported_threshold
    from acttail_export.config import ActTailConfig
    from acttail_export.evaluation import perplexity
    from acttail_export.modeling import load_model as load_torch

    config = ActTailConfig.load(exported)
    model, tokenizer = load_torch(str(tiny_llama_dir))
    want = perplexity(model, tokenizer, wikitext_test, sequence_length=64, max_tokens=256, config=config, progress=False)
    got = perplexity_onnx(exported, wikitext_test, sequence_length=64, max_tokens=256, progress=False)
    assert got["tokens"] == want["tokens"] == 256 and got["windows"] == 4
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)


def test_window_nlls_is_window_nll_of_each_window(exported_threshold, wikitext_test):
    """The per-window loop: window_nll of each window's own logits, which equals torch's cross entropy."""
    import numpy as np
    import torch

    from acttail_export.runtime import create_session, decoder_feeds, export_windows, window_nll, window_nlls

    session = create_session(exported_threshold)
    windows = export_windows(exported_threshold, wikitext_test, 24, max_tokens=72)
    got = window_nlls(session, windows)
    assert len(got) == len(windows) == 3
    for (nll, count), ids in zip(got, windows):
        logits = session.run(["logits"], decoder_feeds(session, ids[None]))[0][0]
        assert (nll, count) == window_nll(logits, ids)  # same session, same input: bit-identical
        ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]).double(), torch.from_numpy(ids[1:]),
                                               reduction="sum")
        # float64 both ways; 1e-9 relative covers the order of the log-sum-exp terms
        assert count == len(ids) - 1 and nll == pytest.approx(float(ce), rel=1e-9)
    result = perplexity_onnx(exported_threshold, wikitext_test, sequence_length=24, max_tokens=72, progress=False)
    assert result["perplexity"] == pytest.approx(np.exp(sum(n for n, _ in got) / sum(c for _, c in got)), rel=1e-12)


# --- window lengths -----------------------------------------------------------------------------
def test_perplexity_onnx_needs_windows_of_two_tokens(exported_threshold, wikitext_test):
    for length in (1, 0, True):
        with pytest.raises(ActTailError, match="sequence length must be an integer >= 2") as info:
            perplexity_onnx(exported_threshold, wikitext_test, sequence_length=length, max_tokens=64, progress=False)
        _one_line(info)


def test_perplexity_onnx_records_the_data_path_absolute(exported_threshold, wikitext_test, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(wikitext_test.parent)
    result = perplexity_onnx(exported_threshold, wikitext_test.name, sequence_length=32, max_tokens=64, progress=False)
    assert Path(result["data"]).is_absolute() and Path(result["data"]).resolve() == wikitext_test.resolve()
    assert result["tokens"] == 64


@pytest.mark.parametrize("length, needle", [
    ("1", "--sequence-length must be at least 2"),
    ("300", "--sequence-length 300 exceeds the context of"),  # the tiny model has max_position_embeddings 256
])
def test_evaluate_onnxruntime_bad_window_length(exported_threshold, wikitext_test, capsys, length, needle):
    from acttail_export.cli import main

    code = main(["evaluate", "--model", str(exported_threshold), "--backend", "onnxruntime", "--data", str(wikitext_test),
                 "--sequence-length", length, "--max-tokens", "600", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("acttail-export: error: ") and needle in line


def test_max_positions_of_an_export(exported_threshold, tmp_path):
    from acttail_export.runtime import max_positions

    assert max_positions(exported_threshold) == 256
    assert max_positions(tmp_path) is None  # no config.json: unknown, not an error
    (tmp_path / "config.json").write_text("[1, 2]")
    assert max_positions(tmp_path) is None
