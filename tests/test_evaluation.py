"""evaluation.py and ``acttail-export evaluate``: perplexity vs the model's own loss, JSON schema, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_sparsify import hand_config, random_budgets

from acttail_export.config import ActTailConfig, topk_keep
from acttail_export.data import read_text, token_windows
from acttail_export.evaluation import perplexity, perplexity_windows
from acttail_export.sparsify import apply_sparsity

RECORD_KEYS = {"allocation", "method", "sparsity", "mode", "backend", "perplexity", "tokens", "effective_sparsity"}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def windows(tiny, wikitext_test):
    return token_windows(tiny[1], read_text(wikitext_test)[:20_000], sequence_length=48, max_tokens=5 * 48)


def reference_ppl(model, windows) -> float:
    """exp(mean NLL) from the model's own shifted-label loss, one window at a time."""
    with torch.inference_mode():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    return math.exp(sum(losses) / len(losses))


def test_dense_perplexity_equals_model_loss(tiny, windows):
    model, _ = tiny
    result = perplexity_windows(model, windows, progress=False, batch_size=2)
    assert result["perplexity"] == pytest.approx(reference_ppl(model, windows), rel=1e-5)
    assert result["tokens"] == windows.numel() and result["effective_sparsity"] == 0.0


def test_sparse_perplexity_equals_model_loss(tiny, windows):
    model, _ = tiny
    config = hand_config(model, random_budgets(model, seed=11), "topk")
    result = perplexity_windows(model, windows, config, progress=False, batch_size=3)
    with apply_sparsity(model, config):
        ref = reference_ppl(model, windows)
    assert result["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert result["perplexity"] != pytest.approx(reference_ppl(model, windows), rel=1e-3)  # sparsity changes it
    params = sum(p.parameters for p in config.projections)
    expected = sum((p.in_features - topk_keep(p.sparsity, p.in_features)) / p.in_features * p.parameters
                   for p in config.projections) / params
    assert result["effective_sparsity"] == pytest.approx(expected, abs=1e-12)
    assert config.effective_sparsity == pytest.approx(expected, abs=1e-12)


def test_perplexity_from_file_batch_invariant(tiny, windows, wikitext_test, tmp_path):
    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text(read_text(wikitext_test)[:20_000])
    a = perplexity(model, tok, text, sequence_length=48, max_tokens=5 * 48, progress=False, batch_size=1)
    b = perplexity_windows(model, windows, progress=False, batch_size=5)
    assert a["tokens"] == 240 and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)


def test_library_evaluate_base_without_the_cli(tiny, tiny_llama_dir, wikitext_test):
    """sweep.evaluate_base (the library behind ``evaluate``): dense row = the model's own loss, one row per config
    with the budgets of build_config, in the order dense, then allocation × mode × sparsity."""
    from acttail_export.allocation import build_config
    from acttail_export.data import load_windows
    from acttail_export.spectral import analyze_model
    from acttail_export.sweep import evaluate_base

    model, tokenizer = tiny
    fits = analyze_model(model, progress=False)
    rows = evaluate_base(str(tiny_llama_dir), wikitext_test, [0.0, 0.5, 0.7], ["uniform", "htsr"], ["topk"],
                         sequence_length=48, max_tokens=4 * 48, progress=False, fits=fits)
    assert [(r["allocation"], r["sparsity"]) for r in rows] == [
        ("dense", 0.0), ("uniform", 0.5), ("uniform", 0.7), ("htsr", 0.5), ("htsr", 0.7)]
    assert [r["method"] for r in rows] == [r["allocation"] for r in rows]
    assert all(set(r) == RECORD_KEYS and r["tokens"] == 4 * 48 and r["backend"] == "torch" for r in rows)
    windows = load_windows(tokenizer, wikitext_test, 48, max_tokens=4 * 48)
    # the model's float32 mean loss vs the float64 NLL sum: the 1e-5 of test_dense_perplexity_equals_model_loss
    assert rows[0]["perplexity"] == pytest.approx(reference_ppl(model, windows), rel=1e-5)
    config = build_config(model, 0.7, "htsr", "topk", fits=fits)
    want = perplexity_windows(model, windows, config, "topk", progress=False)
    # same budgets, windows and code path in one process: equal up to float64 summation order
    assert rows[-1]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-9)
    assert rows[-1]["effective_sparsity"] == pytest.approx(want["effective_sparsity"], rel=1e-12)


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_default_allocation_is_the_policy_method(tiny, tiny_llama_dir, wikitext_test, wikitext_valid, mode):
    """``acttail`` at each level gives the rows of the method ``DEFAULT_POLICY[mode]`` names there, bit for bit (one
    search, one calibration), and records that method; every level of the mode's policy is exercised (at 90 %: HT-SR
    in top-k mode, the combination in threshold mode; at 40 % HT-SR in threshold mode)."""
    from acttail_export.config import DEFAULT_POLICY, resolve_allocation
    from acttail_export.sweep import evaluate_base

    levels = {"topk": [0.5, 0.7, 0.8, 0.9], "threshold": [0.4, 0.5, 0.7, 0.9]}[mode]
    assert [resolve_allocation("acttail", s, mode) for s in levels] == {
        "topk": ["teal-greedy", "waterfill-greedy", "waterfill-greedy", "htsr"],
        "threshold": ["htsr", "teal-greedy", "acttail-greedy", "acttail-greedy"]}[mode]
    assert {resolve_allocation("acttail", s, mode) for s in levels} == {method for _, method in DEFAULT_POLICY[mode]}
    methods = sorted({resolve_allocation("acttail", s, mode) for s in levels})
    rows = evaluate_base(str(tiny_llama_dir), wikitext_test, levels, ["acttail", *methods],
                         [mode], sequence_length=48, max_tokens=2 * 48, progress=False, calibration_data=wikitext_valid,
                         calibration_samples=2, calibration_sequence_length=32)
    by = {(r["allocation"], r["sparsity"]): r for r in rows}
    for s in levels:
        method = resolve_allocation("acttail", s, mode)
        default, reference = by["acttail", s], by[method, s]
        assert default["method"] == method and reference["method"] == method
        assert (default["perplexity"], default["effective_sparsity"]) == (reference["perplexity"],
                                                                          reference["effective_sparsity"])
    # the methods differ on this model, so the equalities above pick out one of them
    for s in levels[1:]:
        assert len({by[m, s]["perplexity"] for m in methods}) == len(methods)


def run_cli(argv, capsys):
    from acttail_export.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_schema_and_values(tiny, tiny_llama_dir, wikitext_test, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    code, stdout, err = run_cli([
        "evaluate", "--model", str(tiny_llama_dir), "--data", str(wikitext_test), "--sparsity", "0", "0.5", "0.7",
        "--allocation", "uniform", "acttail", "--mode", "topk", "threshold", "--max-tokens", "96",
        "--sequence-length", "48", "--calibration-samples", "2", "--calibration-sequence-length", "32",
        "--json", str(out), "--no-progress"], capsys)
    assert code == 0, err
    records = json.loads(out.read_text())["results"]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert [(r["allocation"], r["sparsity"], r["mode"]) for r in records] == [("dense", 0.0, "dense")] + [
        (a, s, m) for a in ("uniform", "acttail") for m in ("topk", "threshold") for s in (0.5, 0.7)]
    model, tok = tiny
    dense = perplexity(model, tok, wikitext_test, sequence_length=48, max_tokens=96, progress=False)
    assert records[0]["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)
    assert all(r["tokens"] == 96 and r["backend"] == "torch" for r in records)
    for r in records[1:]:
        assert r["perplexity"] > 0 and 0 < r["effective_sparsity"] < 1
        if r["mode"] == "topk":  # top-k hits the budget up to rounding of k
            assert r["effective_sparsity"] == pytest.approx(r["sparsity"], abs=0.02)


def test_cli_export_folder_torch_backend(tiny, tiny_llama_dir, wikitext_test, tmp_path, capsys):
    """An export folder is evaluated with its recorded config, rebuilt on the base model in PyTorch."""
    model, tok = tiny
    config = hand_config(model, random_budgets(model, seed=12), "topk")
    config.model = str(tiny_llama_dir)
    export = tmp_path / "export"
    export.mkdir()
    config.save(export)
    out = tmp_path / "r.json"
    code, _, err = run_cli(["evaluate", "--model", str(export), "--data", str(wikitext_test), "--max-tokens", "96",
                            "--sequence-length", "48", "--json", str(out), "--no-progress"], capsys)
    assert code == 0, err
    (record,) = json.loads(out.read_text())["results"]
    expected = perplexity(model, tok, wikitext_test, 48, 96, config=ActTailConfig.load(export), progress=False)
    assert record["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert (record["allocation"], record["mode"], record["backend"]) == ("acttail", "topk", "torch")


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent/file.txt"], "not found"),
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "abc"], "--sparsity must be a number"),
    (["--max-tokens", "ten"], "--max-tokens must be a positive integer"),
    (["--sequence-length", "0"], "--sequence-length must be a positive integer"),
    (["--backend", "onnxruntime"], "needs an export folder"),
    (["--json", "/nonexistent/dir/out.json"], "does not exist"),
    (["--epsilon", "1.5"], "epsilon must be in [0, 1)"),
    (["--mapping", "no-such-mapping"], "mapping"),
    (["--calibration-samples", "-3"], "--calibration-samples must be a positive integer"),
])
def test_cli_bad_input_exits_2_with_one_line(tiny_llama_dir, wikitext_test, capsys, extra, message):
    argv = ["evaluate", "--model", str(tiny_llama_dir), "--data", str(wikitext_test), "--no-progress", *extra]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("acttail-export: error:")


def test_cli_empty_data_file(tiny_llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(["evaluate", "--model", str(tiny_llama_dir), "--data", str(empty)], capsys)
    assert code == 2 and "empty" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_smollm2_perplexity_matches_model_loss(smollm2, wikitext_test):
    model, tok = smollm2
    windows = token_windows(tok, read_text(wikitext_test)[:20_000], sequence_length=256, samples=2)
    dense = perplexity_windows(model, windows, progress=False)
    assert dense["perplexity"] == pytest.approx(reference_ppl(model, windows), rel=1e-4)
    assert 5 < dense["perplexity"] < 100  # a working 135M model on WikiText
    from acttail_export.allocation import build_config

    config = build_config(model, 0.5, "uniform", "topk")
    sparse = perplexity_windows(model, windows, config, progress=False)
    assert sparse["perplexity"] > dense["perplexity"]
    assert sparse["effective_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_cli_export_folder_onnxruntime_matches_torch(tiny_llama_dir, wikitext_test, tmp_path, capsys):
    """The same export evaluated by ONNX Runtime and by the PyTorch reference gives the same perplexity."""
    from acttail_export.exporter import export

    folder = export(str(tiny_llama_dir), tmp_path / "thr", sparsity=0.6, allocation="uniform", mode="threshold",
                    calibration_samples=2, sequence_length=32, eval_tokens=128, progress=False)
    results = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        code, _, err = run_cli(["evaluate", "--model", str(folder), "--backend", backend, "--data", str(wikitext_test),
                                "--max-tokens", "96", "--sequence-length", "48", "--json", str(out), "--no-progress"], capsys)
        assert code == 0, err
        (results[backend],) = json.loads(out.read_text())["results"]
        assert set(results[backend]) == RECORD_KEYS
    assert results["onnxruntime"]["perplexity"] == pytest.approx(results["torch"]["perplexity"], rel=1e-3)
    assert results["onnxruntime"]["tokens"] == results["torch"]["tokens"] == 96
    assert (results["onnxruntime"]["mode"], results["onnxruntime"]["sparsity"]) == ("threshold", 0.6)


def test_export_from_a_relative_path_evaluates_from_another_directory(tiny_llama_dir, wikitext_valid, wikitext_test,
                                                                       tmp_path, capsys, monkeypatch):
    """acttail_config.json records the base model (and calibration text) absolute, so that
    ``evaluate --model EXPORT`` works from any working directory instead of failing (or fetching a Hub repo)."""
    import os
    import shutil

    from acttail_export.exporter import export

    calibration = tmp_path / "calib.txt"
    shutil.copy(wikitext_valid, calibration)
    monkeypatch.chdir(tiny_llama_dir.parent)
    folder = export(tiny_llama_dir.name, tmp_path / "exp", sparsity=0.5, calibration_samples=2, sequence_length=32,
                    calibration_data=os.path.relpath(calibration), validate=False, progress=False)
    recorded = json.loads((folder / "acttail_config.json").read_text())
    for ref, path in ((recorded["model"], tiny_llama_dir), (recorded["calibration"]["data"], calibration)):
        assert os.path.isabs(ref) and os.path.samefile(ref, path), (ref, path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(["evaluate", "--model", str(folder), "--data", str(wikitext_test), "--max-tokens", "64",
                            "--sequence-length", "32", "--no-progress"], capsys)
    assert code == 0, err


def test_cli_smollm2_alias(tiny_llama_dir, wikitext_test, tmp_path, capsys, monkeypatch):
    """``--model smollm2`` is the bundled model in evaluate too (a stand-in replaces the 135M here)."""
    from acttail_export import modeling

    monkeypatch.setattr(modeling, "default_model_path", lambda: str(tiny_llama_dir))
    out = tmp_path / "alias.json"
    code, _, err = run_cli(["evaluate", "--model", "SmolLM2", "--data", str(wikitext_test), "--sparsity", "0",
                            "--max-tokens", "64", "--sequence-length", "32", "--json", str(out), "--no-progress"], capsys)
    assert code == 0, err
    (record,) = json.loads(out.read_text())["results"]
    assert record["allocation"] == "dense" and record["tokens"] == 64


def test_cli_calibration_errors_name_the_calibration_flags(tiny_llama_dir, tmp_path, capsys, wikitext_test):
    short = tmp_path / "short.txt"
    short.write_text("only a handful of words here, far too few for calibration windows " * 3)
    code, _, err = run_cli(["evaluate", "--model", str(tiny_llama_dir), "--data", str(wikitext_test), "--sparsity", "0.5",
                            "--mode", "threshold", "--calibration-data", str(short), "--calibration-samples", "8",
                            "--calibration-sequence-length", "32", "--max-tokens", "64", "--sequence-length", "32",
                            "--no-progress"], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "too short for 8 samples of 32 tokens" in line and "a smaller --calibration-sequence-length" in line
    assert "--calibration-samples" in line and " --sequence-length" not in line
    code, _, err = run_cli(["evaluate", "--model", str(tiny_llama_dir), "--data", str(wikitext_test), "--sparsity", "0.5",
                            "--mode", "threshold", "--calibration-data", str(tmp_path / "nope.txt")], capsys)
    assert code == 2 and err.strip().startswith("acttail-export: error: --calibration-data ") and "nope.txt not found" in err
