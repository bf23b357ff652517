"""data.py: reading text files and cutting token windows."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from acttail_export import data
from acttail_export.data import (
    DEFAULT_CALIBRATION_DATA,
    DEFAULT_EVAL_DATA,
    EVALUATE_CALIBRATION_FLAGS,
    EVALUATE_DATA_FLAGS,
    EXPORT_CALIBRATION_FLAGS,
    DataFlags,
    read_text,
    token_windows,
)
from acttail_export.errors import ActTailError


class WordTokenizer:
    """Deterministic stand-in tokenizer: one id per whitespace-separated word (id = word length)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [len(w) for w in text.split()]}


def test_defaults_point_at_wikitext():
    assert DEFAULT_CALIBRATION_DATA.name == "wiki.valid.raw"
    assert DEFAULT_EVAL_DATA.name == "wiki.test.raw"
    # the test session passes the local WikiText-2 folder (tests/conftest.py sets ACTTAIL_WIKITEXT_DIR)
    assert DEFAULT_CALIBRATION_DATA.exists()


def test_read_text_roundtrip(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")
    assert read_text(path) == "héllo wörld\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"  \n\t\n", "empty"),
        (b"abc\x00def", "binary"),
        (b"\xff\xfe\xfa bad", "not UTF-8"),
    ],
)
def test_read_text_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ActTailError, match=message):
        read_text(path)


def test_read_text_missing(tmp_path):
    with pytest.raises(ActTailError, match="not found"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(ActTailError, match="directory"):
        read_text(tmp_path)


def test_windows_are_consecutive_non_overlapping():
    text = " ".join("x" * (1 + i % 9) for i in range(103))
    ids = WordTokenizer()(text)["input_ids"]
    windows = token_windows(WordTokenizer(), text, sequence_length=10)
    assert windows.dtype == torch.long and windows.shape == (10, 10)
    assert windows.flatten().tolist() == ids[:100]


def test_windows_samples_and_max_tokens():
    text = " ".join("y" * (1 + i % 7) for i in range(1000))
    ids = WordTokenizer()(text)["input_ids"]
    w = token_windows(WordTokenizer(), text, sequence_length=16, samples=5)
    assert w.shape == (5, 16) and w.flatten().tolist() == ids[:80]
    w = token_windows(WordTokenizer(), text, sequence_length=16, max_tokens=100)
    assert w.shape == (6, 16) and w.flatten().tolist() == ids[:96]
    w = token_windows(WordTokenizer(), text, sequence_length=16, max_tokens=100, samples=3)
    assert w.shape == (3, 16)


def test_windows_too_short():
    text = "a b c d e f g"
    with pytest.raises(ActTailError, match="too short for 2 samples"):
        token_windows(WordTokenizer(), text, sequence_length=4, samples=2)
    with pytest.raises(ActTailError, match="fewer than one window"):
        token_windows(WordTokenizer(), text, sequence_length=8)
    with pytest.raises(ActTailError, match="sequence length must be a positive integer"):
        token_windows(WordTokenizer(), text, sequence_length=0)
    with pytest.raises(ActTailError, match="smaller than the sequence length"):
        token_windows(WordTokenizer(), text, sequence_length=4, max_tokens=2)


# --- error messages name the caller's real flags -----------------------------------------------
def test_no_file_names_the_flag_not_a_nonexistent_one():
    with pytest.raises(ActTailError) as info:
        read_text(None)
    assert "--data" not in str(info.value)  # export has no --data flag; only the caller knows its flag
    with pytest.raises(ActTailError, match="pass --calibration-data FILE"):
        read_text(None, EXPORT_CALIBRATION_FLAGS)
    with pytest.raises(ActTailError, match="pass --data FILE"):
        read_text(None, EVALUATE_DATA_FLAGS)


@pytest.mark.parametrize("which, flag, name", [("DEFAULT_CALIBRATION_DATA", "--calibration-data", "wiki.valid.raw"),
                                               ("DEFAULT_EVAL_DATA", "--data", "wiki.test.raw")])
def test_missing_default_text_offline_names_the_flag(which, flag, name, tmp_path, monkeypatch):
    missing = tmp_path / "wikitext-2" / name
    monkeypatch.setattr(data, which, missing)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: import fails
    with pytest.raises(ActTailError) as info:
        read_text(missing)
    message = str(info.value)
    assert f"pass {flag} FILE" in message and "ACTTAIL_WIKITEXT_DIR" in message and "\n" not in message
    assert not missing.parent.exists()  # nothing half-written


def test_missing_default_text_comes_from_the_hub_dataset(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"text": [" = Title = \n", " some text \n"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    missing = tmp_path / "cache" / "wiki.test.raw"
    monkeypatch.setattr(data, "DEFAULT_EVAL_DATA", missing)
    assert read_text(missing) == " = Title = \n some text \n"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert [p.name for p in missing.parent.iterdir()] == ["wiki.test.raw"]  # written atomically, no temp left
    read_text(missing)
    assert len(calls) == 1  # cached


def test_missing_file_names_the_callers_flag(tmp_path):
    with pytest.raises(ActTailError, match="^--calibration-data .*nope.txt not found"):
        read_text(tmp_path / "nope.txt", EVALUATE_CALIBRATION_FLAGS)
    with pytest.raises(ActTailError, match="^--data .*nope.txt not found"):
        data.load_windows(WordTokenizer(), tmp_path / "nope.txt", 4, flags=EVALUATE_DATA_FLAGS)


def test_window_errors_name_the_callers_flags():
    text = "a b c d e f g"
    # export's calibration: --sequence-length / --calibration-samples (the defaults)
    with pytest.raises(ActTailError, match=r"use at most 1 samples \(--calibration-samples 1\), a smaller --sequence-length, or a longer file"):
        token_windows(WordTokenizer(), text, sequence_length=4, samples=2)
    # evaluate's calibration: the window flag is --calibration-sequence-length
    flags = EVALUATE_CALIBRATION_FLAGS
    with pytest.raises(ActTailError, match=r"use at most 1 samples \(--calibration-samples 1\), a smaller --calibration-sequence-length,"):
        token_windows(WordTokenizer(), text, sequence_length=4, samples=2, flags=flags)
    with pytest.raises(ActTailError, match=r"fewer than one window of 8: lower --calibration-sequence-length or"):
        token_windows(WordTokenizer(), text, sequence_length=8, flags=flags)
    with pytest.raises(ActTailError, match=r"too short for 1 samples of 8 tokens: use at most 7 tokens per window "
                                           r"\(a smaller --calibration-sequence-length\), or a longer file"):
        token_windows(WordTokenizer(), text, sequence_length=8, samples=1, flags=flags)  # not "use at most 0 samples"
    with pytest.raises(ActTailError, match=r"\(a smaller --calibration-sequence-length\) and fewer samples \(--calibration-samples\)"):
        token_windows(WordTokenizer(), text, sequence_length=8, samples=3, flags=flags)
    with pytest.raises(ActTailError, match=r"raise --max-tokens or lower --sequence-length"):
        token_windows(WordTokenizer(), text, sequence_length=4, max_tokens=2, flags=EVALUATE_DATA_FLAGS)
    custom = DataFlags(sequence_length="--len", max_tokens="--budget")
    with pytest.raises(ActTailError, match=r"raise --budget or lower --len"):
        token_windows(WordTokenizer(), text, sequence_length=4, max_tokens=2, flags=custom)


def test_prefix_tokenization_matches_full(tiny_llama_dir, wikitext_valid):
    """Tokenizing only a prefix for a few windows gives the same ids as tokenizing the whole text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = read_text(wikitext_valid)[:200_000]
    full = tok(text, add_special_tokens=False)["input_ids"]
    w = token_windows(tok, text, sequence_length=128, samples=7)
    assert w.flatten().tolist() == full[: 7 * 128]
