"""Bad input to ``acttail-export export``: exit code 2, one line naming problem and fix, no traceback,
no partial output. One test per row of the table in docs/export.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acttail_export.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--calibration-samples", "2", "--sequence-length", "32"]


def _no_leftovers(out: Path) -> None:
    assert not out.exists(), f"partial output left in {out}"
    if out.parent.is_dir():
        assert not [p.name for p in out.parent.iterdir() if ".acttail-" in p.name]


def _check(rc: int, err: str, *needles: str, single_line: bool = True) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith(("acttail-export: error: ", "optimum-cli export acttail: error: ")), err
    if single_line:
        assert len(lines) == 1, err
    for needle in needles:
        assert needle in last, last
    return last


def run_subprocess(*args: str, env: dict | None = None, tool: str = "acttail-export") -> tuple[int, str]:
    """Run the real CLI in a fresh interpreter (what a user sees)."""
    cmd = [sys.executable, "-m", "acttail_export.cli", "export"] if tool == "acttail-export" else \
        [str(Path(sys.executable).parent / "optimum-cli"), "export", "acttail"]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=full_env, cwd=REPO, timeout=300)
    return proc.returncode, proc.stderr


def run_inprocess(capsys, *args: str) -> tuple[int, str]:
    """Same ``main()`` in this process (fast, allows monkeypatching the environment)."""
    capsys.readouterr()  # only the command's own output (not transformers' bars of the test's model writes)
    rc = main(["export", *args])
    return rc, capsys.readouterr().err


# --- model argument -----------------------------------------------------------------------------
def test_nonexistent_model_path(tmp_path):
    out = tmp_path / "out"
    rc, err = run_subprocess("--model", str(tmp_path / "nope"), str(out))
    _check(rc, err, "does not exist", "pass an existing folder")
    _no_leftovers(out)


def test_no_model_given(tmp_path, capsys):
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, str(out)), "no model given", "--model")
    _no_leftovers(out)


def test_empty_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tmp_path / "empty"), str(out)), "has no config.json", "save_pretrained")
    _no_leftovers(out)


def test_folder_without_weights(tmp_path, capsys, tiny_llama_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(folder), str(out)), "has no model weights", "save_pretrained")
    _no_leftovers(out)


def test_truncated_safetensors(tmp_path, capsys, tiny_llama_dir):
    import shutil

    folder = tmp_path / "trunc"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(folder), str(out)), "truncated or corrupted", "re-download")
    _no_leftovers(out)


def test_corrupted_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(200))
    out = tmp_path / "out"
    rc, err = run_subprocess("--model", str(bad), str(out))
    _check(rc, err, "not a readable GGUF file", "pass a .gguf model")
    _no_leftovers(out)


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(folder), str(out)), "unsupported architecture GPT2LMHeadModel",
           "supported: LlamaForCausalLM")
    _no_leftovers(out)


# --- numeric flags ------------------------------------------------------------------------------
@pytest.mark.parametrize("value, needle", [("-0.1", "must be in [0, 1)"), ("1.0", "must be in [0, 1)"), ("abc", "must be a number")])
def test_bad_sparsity(value, needle, tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--sparsity", value, str(out)), "--sparsity", needle)
    _no_leftovers(out)


def test_bad_sparsity_subprocess(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    _check(*run_subprocess("--model", str(tiny_llama_dir), "--sparsity", "abc", str(out)), "--sparsity must be a number")
    _no_leftovers(out)


@pytest.mark.parametrize("value", ["1.5", "-0.2"])
def test_epsilon_out_of_range(value, tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--epsilon", value, str(out)), "epsilon must be in [0, 1)")
    _no_leftovers(out)


def test_flag_combinations(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--allocation", "uniform", "--epsilon", "0.1", str(out)),
           "only apply to the allocations from HT-SR alphas")
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--private", str(out)), "only apply with --push-to-hub")
    _no_leftovers(out)


def test_sparsity_above_the_acttail_limit_fails_before_loading(tmp_path, capsys, tiny_llama_dir, monkeypatch):
    _no_model_load(monkeypatch)
    out = tmp_path / "out"
    last = _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--sparsity", "0.995", *FAST, str(out)),
                  "sparsity 0.995 is above 0.99", "use --sparsity 0.99 or lower", "--allocation uniform")
    assert "s_max" not in last  # not a flag the user could pass
    _no_leftovers(out)


def test_gguf_context_read_before_loading(tmp_path, capsys, smollm2, wikitext_valid, monkeypatch):
    """A GGUF model's context comes from its metadata, so a window longer than it fails before the 10-20 s load."""
    from acttail_export.modeling import default_model_path, gguf_context_length

    context = smollm2[0].config.max_position_embeddings  # what transformers makes of the same file
    assert gguf_context_length(default_model_path()) == context
    _no_model_load(monkeypatch)
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", "smollm2", "--calibration-data", str(wikitext_valid), "--sequence-length",
                          str(context + 1), str(out)),
           f"--sequence-length {context + 1} exceeds the context", f"use --sequence-length {context} or less")
    _no_leftovers(out)


# --- calibration data ---------------------------------------------------------------------------
def test_calibration_file_empty(tmp_path, capsys, tiny_llama_dir):
    (tmp_path / "empty.txt").write_text("  \n")
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--calibration-data", str(tmp_path / "empty.txt"), str(out)),
           "is empty", "pass a file with text")
    _no_leftovers(out)


def test_calibration_file_binary(tmp_path, capsys, tiny_llama_dir):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary\x00" * 100)
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--calibration-data", str(tmp_path / "blob.bin"), str(out)),
           "is binary", "UTF-8 text file")
    _no_leftovers(out)


def test_calibration_file_too_short(tmp_path, capsys, tiny_llama_dir):
    (tmp_path / "short.txt").write_text("A short text that has far fewer tokens than requested. " * 5)
    out = tmp_path / "out"
    rc, err = run_inprocess(capsys, "--model", str(tiny_llama_dir), "--calibration-data", str(tmp_path / "short.txt"),
                            "--calibration-samples", "64", "--sequence-length", "128", str(out))
    _check(rc, err, "too short for 64 samples", "use at most", single_line=False)  # progress logs precede it
    _no_leftovers(out)


# --- output folder ------------------------------------------------------------------------------
def test_output_exists_without_overwrite(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _check(*run_subprocess("--model", str(tiny_llama_dir), str(out)), "exists and is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_output_not_writable(tmp_path, tiny_llama_dir):
    # /proc accepts no new folders, even for root (permission bits would not stop root)
    out = Path("/proc/acttail-test-output/out")
    _check(*run_subprocess("--model", str(tiny_llama_dir), str(out)), "cannot write to", "choose a writable OUTPUT_DIR")
    assert not out.parent.exists()
    # a path below a regular file
    (tmp_path / "file").write_text("x")
    _check(*run_subprocess("--model", str(tiny_llama_dir), str(tmp_path / "file" / "out")), "is a file", "choose another OUTPUT_DIR")


def _no_model_load(monkeypatch):
    """Make loading a model fail the test: the error must come from the cheap checks."""
    import acttail_export.modeling as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(modeling, "load_model", refuse)


@pytest.mark.parametrize("where", ["equal", "parent"])
def test_overwrite_refuses_output_dir_holding_the_model(tmp_path, capsys, tiny_llama_dir, monkeypatch, where):
    import shutil

    _no_model_load(monkeypatch)
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_llama_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = model if where == "equal" else model.parent
    rc, err = run_inprocess(capsys, "--model", str(model), "--overwrite", *FAST, str(out))
    _check(rc, err, f"{'is' if where == 'equal' else 'contains'} the model folder {model}", "choose another output folder")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not [p for p in tmp_path.rglob("*") if ".acttail-" in p.name]


def test_overwrite_refuses_output_dir_holding_the_calibration_data(tmp_path, capsys, tiny_llama_dir, monkeypatch):
    _no_model_load(monkeypatch)
    data = tmp_path / "data" / "calib.txt"
    data.parent.mkdir()
    data.write_text("Some calibration text. " * 200)
    rc, err = run_inprocess(capsys, "--model", str(tiny_llama_dir), "--calibration-data", str(data), "--overwrite", *FAST,
                            str(data.parent))
    _check(rc, err, f"contains the calibration data file {data}", "choose another output folder")
    assert data.read_text() == "Some calibration text. " * 200
    assert [p.name for p in data.parent.iterdir()] == ["calib.txt"]


# --- environment --------------------------------------------------------------------------------
def test_device_cuda_without_gpu(tmp_path, capsys, tiny_llama_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--device", "cuda", str(out)), "no CUDA GPU", "use --device cpu")
    _no_leftovers(out)


def test_fused_kernel_without_op_library(tmp_path, capsys, tiny_llama_dir, monkeypatch):
    import acttail_export.ops as ops

    monkeypatch.setattr(ops, "_PACKAGE_LIB", tmp_path / "missing" / "libacttail_ops.so")
    monkeypatch.delenv("ACTTAIL_OPS_LIBRARY", raising=False)
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--kernel", "fused", str(out)), "not built", "make ops")
    _no_leftovers(out)
    # --weights int4 takes the fused kernel by default: the line also names the way without the library
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--weights", "int4", str(out)), "not built",
           "pass --kernel mask")
    _no_leftovers(out)


def test_hub_push_without_token(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_TOKEN_PATH": str(tmp_path / "hf" / "token")}
    _check(*run_subprocess("--model", str(tiny_llama_dir), "--push-to-hub", "me/tiny", str(out), env=env),
           "needs a token", "--token")
    _no_leftovers(out)


@pytest.mark.parametrize("repo", ["a/b/c", "me/two--dashes", "me/with space"])
def test_hub_push_invalid_repo_id_fails_before_loading(repo, tmp_path, capsys, tiny_llama_dir, monkeypatch):
    _no_model_load(monkeypatch)
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--push-to-hub", repo, "--token", "hf_dummy", *FAST, str(out)),
           f"invalid Hub repo id {repo!r}", "use NAME or ORG/NAME")
    _no_leftovers(out)


def test_hub_push_without_network(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    secret = "hf_networkTestSECRETtoken123"
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    rc, err = run_subprocess("--model", str(tiny_llama_dir), *FAST, "--no-validate", "--push-to-hub", "me/tiny",
                             "--token", secret, str(out), env=env)
    last = _check(rc, err, "push to me/tiny failed", f"huggingface-cli upload me/tiny {out}", single_line=False)
    assert secret not in err
    # the export itself finished and is kept for the retry
    assert (out / "model.onnx").is_file() and secret not in (out / "acttail_config.json").read_text()
    assert secret not in (out / "README.md").read_text() and json.loads((out / "acttail_config.json").read_text())
    assert "kept" in last


# --- --base genai ---------------------------------------------------------------------------------
def _fake_genai(folder: Path, message: str, where: str = "__init__") -> Path:
    """A package named onnxruntime_genai whose ``where`` module raises ImportError (shadows a real install)."""
    pkg = folder / "onnxruntime_genai"
    (pkg / "models").mkdir(parents=True)
    for name in ("__init__", "models/__init__", "models/builder"):
        (pkg / f"{name}.py").write_text(f"raise ImportError({message!r})\n" if name == where else "")
    return folder


def test_genai_base_without_onnxruntime_genai(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    fake = _fake_genai(tmp_path / "fake", "No module named 'onnxruntime_genai'")
    _check(*run_subprocess("--model", str(tiny_llama_dir), "--base", "genai", str(out), env={"PYTHONPATH": str(fake)}),
           "--base genai needs onnxruntime-genai", "pip install onnxruntime-genai", "--base optimum")
    _no_leftovers(out)


def test_genai_builder_not_importable(tmp_path, tiny_llama_dir):
    """The runtime imports but its model builder does not (e.g. transformers 4.x): the default base names the fix."""
    out = tmp_path / "out"
    fake = _fake_genai(tmp_path / "fake", "transformers>=5 is required by the model builder", where="models/builder")
    _check(*run_subprocess("--model", str(tiny_llama_dir), str(out), env={"PYTHONPATH": str(fake)}),
           "model builder does not import", "transformers>=5 is required", "pip install 'transformers>=5' onnx-ir", "--base optimum")
    _no_leftovers(out)


def test_optimum_base_without_the_extra(tmp_path, capsys, tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # import fails, as without the optimum extra
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--base", "optimum", str(out)),
           "--base optimum needs optimum-onnx", "pip install 'acttail-export[optimum]'", "--base genai")
    _no_leftovers(out)


def test_genai_base_fp16_on_cpu(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "out"
    _check(*run_inprocess(capsys, "--model", str(tiny_llama_dir), "--base", "genai", "--dtype", "fp16", str(out)),
           "--base genai --dtype fp16 needs the CUDA provider", "add --device cuda", "--dtype fp32")
    _no_leftovers(out)


@pytest.mark.optimum  # the optimum-cli plugin
def test_optimum_cli_reports_errors_the_same_way(tmp_path):
    out = tmp_path / "out"
    _check(*run_subprocess("--model", str(tmp_path / "nope"), str(out), tool="optimum-cli"), "does not exist")
    _no_leftovers(out)


@pytest.mark.optimum  # the optimum-cli plugin
def test_optimum_cli_defaults_to_the_optimum_base():
    """optimum-cli runs in the optimum extra's environment: its export defaults to --base optimum, the CLI's to genai."""
    import argparse

    from acttail_export.cli import build_parser
    from optimum.commands.register.register_acttail import ActTailExportCommand

    parser = argparse.ArgumentParser()
    ActTailExportCommand.parse_args(parser)
    assert parser.parse_args(["--model", "m", "out"]).base == "optimum"
    assert build_parser().parse_args(["export", "--model", "m", "out"]).base == "genai"
