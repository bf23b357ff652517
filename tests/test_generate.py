"""``acttail-export generate`` / :func:`acttail_export.generation.generate`: KV-cached generation from an export.

(a) a dense export generates transformers' greedy ids, (b) on a sparse export the KV-cached step logits equal a
full-sequence forward of the same graph, (c) the CLI streams the text and prints the stats line, (d) bad input
exits 2 with one line.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from acttail_export.cli import main
from acttail_export.generation import OrtDecoder, TextStream, generate

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived"]
FAST = {"calibration_samples": 2, "sequence_length": 32, "eval_tokens": 128, "progress": False}
STATS = re.compile(r"^(\d+) tokens in [\d.]+ s, [\d.]+ tokens/s \(decode\), prompt (\d+) tokens$")


@pytest.fixture(scope="module")
def sharp_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with its matrices scaled ×8: the random init's near-flat logits would make greedy decoding
    repeat one token, which would not tell a working KV cache from a broken one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharp")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


def _export(model_dir, out, sparsity, **kw):
    from acttail_export.exporter import export

    return export(str(model_dir), out, sparsity=sparsity, mode="topk", **{**FAST, **kw})


@pytest.fixture(scope="module")
def dense_export(sharp_dir, tmp_path_factory):
    return _export(sharp_dir, tmp_path_factory.mktemp("gen") / "dense", 0.0)


@pytest.fixture(scope="module")
def sparse_export(sharp_dir, tmp_path_factory):
    return _export(sharp_dir, tmp_path_factory.mktemp("gen") / "sparse", 0.5)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_dense_export_generates_transformers_greedy_ids(prompt, dense_export, sharp_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sharp_dir).eval()
    inputs = AutoTokenizer.from_pretrained(sharp_dir)(prompt, return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=2, eos_token_id=None)
    want = want[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(set(want)) > 3  # not one repeated token: the cache really matters
    result = generate(dense_export, prompt, 10, stop_at_eos=False)
    assert result.token_ids == want
    assert result.prompt_tokens == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cached_steps_equal_a_full_forward_of_the_sparse_export(prompt, sparse_export):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(sparse_export)(prompt)["input_ids"]
    tokens = generate(sparse_export, prompt, 12, stop_at_eos=False).token_ids
    cached = OrtDecoder(sparse_export)
    steps = np.stack([cached.forward(np.array(ids))[-1]] + [cached.step(t) for t in tokens[:-1]])
    full = OrtDecoder(sparse_export, session=cached.session).forward(np.array(ids + tokens[:-1]))[len(ids) - 1:]
    # same graph, same per-token masks; only the attention's summation length differs: measured max |diff|
    # 3.5e-6 on logits of magnitude ~6 (fp32), so 1e-4 leaves a 30x margin
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-4)
    assert steps.argmax(-1).tolist() == tokens  # greedy: each step's argmax is the next generated token


def test_chat_prompt_goes_through_the_chat_template(sparse_export):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sparse_export)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    decoder = OrtDecoder(sparse_export)
    want = [int(decoder.forward(np.array(ids))[-1].argmax())]
    for _ in range(5):
        want.append(int(decoder.step(want[-1]).argmax()))
    result = generate(sparse_export, PROMPTS[0], 6, chat=True, stop_at_eos=False)
    assert result.prompt_tokens == len(ids) and result.token_ids == want


def test_generation_stops_at_eos(sparse_export, monkeypatch):
    from acttail_export import generation

    tokens = generate(sparse_export, PROMPTS[0], 6, stop_at_eos=False).token_ids
    stop = tokens[3]
    monkeypatch.setattr(generation, "eos_ids", lambda *a: {stop})
    result = generate(sparse_export, PROMPTS[0], 6)
    assert result.stopped_at_eos and result.token_ids == tokens[:tokens.index(stop)]


def test_sampling_is_reproducible_with_a_seed(sparse_export):
    runs = [generate(sparse_export, PROMPTS[0], 8, temperature=1.0, seed=s, stop_at_eos=False).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_text_stream_pieces_add_up_to_the_decoded_text(sparse_export):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sparse_export)
    ids = tokenizer("naïve café — 東京 😀 words")["input_ids"]  # multi-byte characters split over byte tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_cli_streams_the_text_and_prints_the_stats_line(sparse_export, monkeypatch, capsys):
    want = generate(sparse_export, PROMPTS[1], 12, stop_at_eos=False)
    recorder = _Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    monkeypatch.setattr("acttail_export.generation.eos_ids", lambda *a: set())
    assert main(["generate", "--model", str(sparse_export), "--prompt", PROMPTS[1], "--max-new-tokens", "12"]) == 0
    assert len([w for w in recorder.writes if w.strip()]) > 3  # written piece by piece, not at the end
    assert "".join(recorder.writes) == want.text + "\n"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    match = STATS.match(last)
    assert match, last
    assert int(match[1]) == 12 and int(match[2]) == want.prompt_tokens


def _bad(capsys, *args: str) -> str:
    rc = main(["generate", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("acttail-export: error: "), err
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--max-new-tokens", "ten"], "--max-new-tokens must be an integer"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_bad_arguments(args, needle, sparse_export, capsys):
    defaults = {"--model": str(sparse_export), "--prompt": PROMPTS[0]}
    flags = dict(zip(args[::2], args[1::2]))
    argv = [x for k, v in {**defaults, **flags}.items() for x in (k, v)]
    assert needle in _bad(capsys, *argv)


def test_missing_folder_and_not_an_export(tmp_path, sharp_dir, capsys):
    assert "does not exist" in _bad(capsys, "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert "is not an acttail-export output folder" in _bad(capsys, "--model", str(sharp_dir), "--prompt", "hi")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "acttail_config.json").write_text("{}")
    assert "(no model.onnx or genai_config.json)" in _bad(capsys, "--model", str(config_only), "--prompt", "hi")


def test_truncated_graph(sparse_export, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sparse_export, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[: len(data) // 3])
    assert "re-run the export" in _bad(capsys, "--model", str(broken), "--prompt", "hi")


def _without_genai_config(export_dir, folder):
    """A copy of an export without genai_config.json: generate() runs it on a plain ONNX Runtime session."""
    import shutil

    shutil.copytree(export_dir, folder)
    (folder / "genai_config.json").unlink(missing_ok=True)
    return folder


def test_cuda_unavailable(sparse_export, capsys, monkeypatch, tmp_path):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    ort_folder = _without_genai_config(sparse_export, tmp_path / "ort")
    assert "has no CUDAExecutionProvider" in _bad(capsys, "--model", str(ort_folder), "--prompt", "hi", "--device", "cuda")
    if not torch.cuda.is_available():  # the genai runtime of this environment (CPU) cannot load it on cuda either
        err = _bad(capsys, "--model", str(sparse_export), "--prompt", "hi", "--device", "cuda")
        assert "onnxruntime_genai cannot load" in err and "install onnxruntime-genai-cuda" in err


def test_bad_input_in_a_fresh_interpreter_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "acttail_export.cli", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "hi"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr


def _fake_og(export_dir, calls: dict):
    """A stand-in ``onnxruntime_genai`` whose generator runs the export's graph greedily through :class:`OrtDecoder`
    (onnxruntime_genai is not installed here): checks what :func:`generate` asks of the genai API."""
    import types

    class Generator:
        def __init__(self, model, params) -> None:
            self.decoder, self.params, self.ids, self.logits = OrtDecoder(export_dir), params, [], None

        def append_tokens(self, tokens) -> None:
            self.ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
            self.logits = self.decoder.forward(np.array(self.ids))[-1]

        def is_done(self) -> bool:
            return len(self.ids) >= self.params.options["max_length"]

        def generate_next_token(self) -> None:
            if self.logits is None:
                self.logits = self.decoder.step(self.ids[-1])
            self.ids.append(int(self.logits.argmax()))
            self.logits = None

        def get_next_tokens(self):
            return np.array([self.ids[-1]])

    class GeneratorParams:
        def __init__(self, model) -> None:
            self.options = {}

        def set_search_options(self, **options) -> None:
            calls["options"] = options
            self.options.update(options)

    def model(config):
        calls["config"] = config
        return object()

    return types.SimpleNamespace(Model=model, GeneratorParams=GeneratorParams, Generator=Generator)


def test_a_genai_folder_runs_through_onnxruntime_genai(sparse_export, tmp_path, monkeypatch):
    import json
    import shutil

    from acttail_export import genai_base

    folder = tmp_path / "genai"
    shutil.copytree(sparse_export, folder)
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    ort_folder = _without_genai_config(sparse_export, tmp_path / "ort")
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", _fake_og(folder, calls))
    monkeypatch.setattr(genai_base, "genai_config", lambda d, f, p: ("config", str(d), f, p))
    want = generate(ort_folder, PROMPTS[0], 7, stop_at_eos=False)
    got = generate(folder, PROMPTS[0], 7, stop_at_eos=False)
    assert got.backend == "onnxruntime-genai/cpu" and want.backend.startswith("onnxruntime/")
    assert calls["config"] == ("config", str(folder), "model.onnx", "cpu")
    assert calls["options"] == {"max_length": want.prompt_tokens + 7, "do_sample": False}
    assert got.token_ids == want.token_ids and got.text == want.text
