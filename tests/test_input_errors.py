"""Bad input to ``analyze`` / ``evaluate`` (and the model checks ``export`` shares): exit code 2 and one
line naming the problem and the fix, never a traceback. Companion of test_cli_errors.py (export flags)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from acttail_export.cli import main
from acttail_export.config import CONFIG_NAME


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def check_one_line(rc: int, err: str, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one ``acttail-export: error:`` line holding every needle."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("acttail-export: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _model_copy(src: Path, dst: Path, config: bytes) -> Path:
    """``src`` (a tiny HF folder) with ``config.json`` replaced by ``config``."""
    shutil.copytree(src, dst)
    (dst / "config.json").write_bytes(config)
    return dst


@pytest.fixture(scope="module")
def sharded_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama saved as a sharded safetensors checkpoint (index + several shards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharded") / "tiny-sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(folder, max_shard_size="4MB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert (folder / "model.safetensors.index.json").is_file() and len(shards) >= 2
    return folder


# --- model folders ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["analyze", "evaluate", "export"])
def test_sharded_checkpoint_with_a_missing_shard(command, sharded_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_dir, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (broken / gone).unlink()
    extra = {"analyze": ["--no-progress"], "evaluate": ["--no-progress", "--sparsity", "0"],
             "export": [str(tmp_path / "out")]}[command]
    check_one_line(*run_cli(capsys, command, "--model", str(broken), *extra), gone, "is missing", "re-download")
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_complete_still_loads(sharded_dir, capsys):
    rc, err = run_cli(capsys, "evaluate", "--model", str(sharded_dir), "--sparsity", "0", "--max-tokens", "64",
                      "--sequence-length", "32", "--no-progress")
    assert rc == 0, err


@pytest.mark.parametrize("content, needles", [
    (b"[]", ("config.json holds a JSON list, not an object",)),
    (b'"LlamaForCausalLM"', ("config.json holds a JSON str, not an object",)),
    (b'{"architectures": ["LlamaForCausalLM"], "name": "\xff\xfe"}', ("config.json is not UTF-8 text", "re-save")),
])
@pytest.mark.parametrize("command", ["analyze", "evaluate"])
def test_config_json_that_is_not_a_utf8_json_object(command, content, needles, tiny_llama_dir, tmp_path, capsys):
    folder = _model_copy(tiny_llama_dir, tmp_path / "model", content)
    check_one_line(*run_cli(capsys, command, "--model", str(folder), "--no-progress"), *needles)


# --- export folders -----------------------------------------------------------------------------
@pytest.mark.parametrize("content, needle", [
    (b"[]", "holds a JSON list, not an object"),
    (b"42", "holds a JSON int, not an object"),
    (b'{"target_sparsity": 0.5, "model": "\xff"}', "is not UTF-8 text"),
])
def test_acttail_config_that_is_not_a_utf8_json_object(content, needle, tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / CONFIG_NAME).write_bytes(content)
    check_one_line(*run_cli(capsys, "evaluate", "--model", str(export), "--no-progress"), CONFIG_NAME, needle)


# --- devices ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, needle", [
    ("bogus", "--device must be cpu, cuda or cuda:N; got 'bogus'"),  # analyze takes cuda:N too, so it names it
    ("cuda:x", "--device must be cpu, cuda or cuda:N; got 'cuda:x'"),
    ("gpu:0", "--device must be cpu, cuda or cuda:N"),
])
def test_analyze_unknown_device(device, needle, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setattr("acttail_export.modeling.load_model", _no_load)
    check_one_line(*run_cli(capsys, "analyze", "--model", str(tiny_llama_dir), "--device", device), needle)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_analyze_cuda_without_a_gpu(device, tiny_llama_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("acttail_export.modeling.load_model", _no_load)
    check_one_line(*run_cli(capsys, "analyze", "--model", str(tiny_llama_dir), "--device", device),
                   "PyTorch sees no CUDA GPU", "--device cpu")


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad flag (--device, --epsilon) was refused")


# --- sequence lengths ---------------------------------------------------------------------------
def test_evaluate_sequence_length_above_the_context(tiny_llama_dir, wikitext_test, capsys):
    """The tiny model has max_position_embeddings 256: longer windows are refused, not silently extrapolated."""
    check_one_line(*run_cli(capsys, "evaluate", "--model", str(tiny_llama_dir), "--data", str(wikitext_test),
                            "--sparsity", "0", "--sequence-length", "300", "--max-tokens", "600", "--no-progress"),
                   "--sequence-length 300 exceeds", "max_position_embeddings 256", "--sequence-length 256 or less")
    check_one_line(*run_cli(capsys, "evaluate", "--model", str(tiny_llama_dir), "--data", str(wikitext_test),
                            "--sparsity", "0.5", "--mode", "threshold", "--calibration-sequence-length", "512",
                            "--sequence-length", "32", "--max-tokens", "64", "--no-progress"),
                   "--calibration-sequence-length 512 exceeds", "max_position_embeddings 256")


@pytest.mark.parametrize("flag", ["--sequence-length", "--calibration-sequence-length"])
def test_evaluate_window_of_one_token(flag, tiny_llama_dir, wikitext_test, capsys):
    check_one_line(*run_cli(capsys, "evaluate", "--model", str(tiny_llama_dir), "--data", str(wikitext_test),
                            flag, "1", "--no-progress"), f"{flag} must be at least 2")


# --- argparse's own errors and flag combinations ------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["export", "--model", "m", "--mode", "topp", "out"], ["argument --mode: invalid choice: 'topp'", "acttail-export export --help"]),
    (["export", "--model", "m"], ["required: OUTPUT_DIR", "acttail-export export --help"]),
    (["export", "--model", "m", "--foo", "out"], ["unrecognized arguments: --foo"]),
    (["analyze", "--allocation", "bogus"], ["argument --allocation: invalid choice"]),
    ([], ["required: command", "acttail-export --help"]),
    (["convert"], ["invalid choice: 'convert'"]),
])
def test_argparse_errors_are_one_line(argv, needles, capsys):
    """argparse reports these itself (before any command runs): one line, exit 2, no usage block."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    check_one_line(exit_.value.code, capsys.readouterr().err, *needles)


@pytest.mark.parametrize("flags, needle", [
    (["--allocation", "uniform", "--epsilon", "0.1"], "from HT-SR alphas: drop them or use --allocation htsr"),
    (["--epsilon", "abc"], "--epsilon must be a number, got 'abc'"),
    (["--epsilon", "2"], "--epsilon must be in [0, 1), got 2.0"),
])
def test_analyze_epsilon_checked_before_loading(flags, needle, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setattr("acttail_export.modeling.load_model", _no_load)
    line = check_one_line(*run_cli(capsys, "analyze", "--model", str(tiny_llama_dir), *flags), needle)
    assert "acttail-greedy" not in line  # analyze refuses the greedy allocations: the fix must not name one


def test_validation_text_too_short_fails_before_the_build(tiny_llama_dir, tmp_path, capsys, caplog, monkeypatch):
    """Without WikiText-2's test split the export's validation reads the calibration text: one long enough for the
    calibration windows (2 x 32 tokens) but not for the validation's (2 x 64) fails before any stage after loading,
    with a message that names what the validation reads and the two ways out; ``--no-validate`` exports."""
    import logging

    from acttail_export import data

    monkeypatch.setattr(data, "DEFAULT_EVAL_DATA", tmp_path / "absent" / "wiki.test.raw")
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"word{i % 7} and" for i in range(30)))  # 90 tokens: 2 x 32 fit, 2 x 64 do not
    caplog.set_level(logging.INFO, logger="acttail_export")
    argv = ["export", "--model", str(tiny_llama_dir), "--allocation", "uniform", "--calibration-data", str(text),
            "--calibration-samples", "2", "--sequence-length", "32"]
    assert main([*argv, str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert err[-1].startswith("acttail-export: error: the export's validation reads 2 windows of 64 tokens of the "
                              f"calibration text {text} (")
    assert err[-1].endswith("which is shorter: pass a longer --calibration-data, or --no-validate")
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage ")]
    assert [s.split(":")[0] for s in stages] == ["stage load model"]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".acttail-" in p.name]
    assert main([*argv, "--no-validate", str(tmp_path / "out")]) == 0
