"""Calibration / evaluation text: read a UTF-8 text file, tokenize it once, cut non-overlapping windows."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import ActTailError

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]
_WIKITEXT = _REPO.parent / "shared" / "data" / "wikitext-2"
#: Default calibration text (WikiText-2 validation split, raw).
DEFAULT_CALIBRATION_DATA = _WIKITEXT / "wiki.valid.raw"
#: Default evaluation text (WikiText-2 test split, raw; hyperparameters are chosen on the validation split).
DEFAULT_EVAL_DATA = _WIKITEXT / "wiki.test.raw"

# Characters per token assumed when only a prefix of a long text is tokenized (English BPE is ~4;
# the prefix is doubled and retried when it turns out too short, so this only affects speed).
_CHARS_PER_TOKEN = 6


def read_text(path: str | Path | None) -> str:
    """Read a UTF-8 text file; ActTailError for a missing, empty or binary file."""
    if path is None:
        raise ActTailError("no data file given: pass --data FILE (a UTF-8 text file, e.g. wiki.valid.raw)")
    path = Path(path)
    if not path.exists():
        raise ActTailError(f"data file {path} not found: pass an existing UTF-8 text file")
    if path.is_dir():
        raise ActTailError(f"data file {path} is a directory: pass a UTF-8 text file")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise ActTailError(f"data file {path} is binary (contains NUL bytes): pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ActTailError(f"data file {path} is not UTF-8 text (byte {exc.start}): pass a UTF-8 text file") from None
    if not text.strip():
        raise ActTailError(f"data file {path} is empty: pass a file with text")
    return text


def _check_positive(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ActTailError(f"{what} must be a positive integer, got {value!r}")
    return value


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_windows(
    tokenizer,
    text: str,
    sequence_length: int,
    max_tokens: int | None = None,
    samples: int | None = None,
) -> torch.LongTensor:
    """Tokenize ``text`` once and return non-overlapping windows ``[n, sequence_length]``.

    ``samples`` asks for exactly that many windows (ActTailError if the text is too short);
    ``max_tokens`` caps the total (n = max_tokens // sequence_length, at least one window).
    Without either, all complete windows are returned. A trailing partial window is dropped.
    """
    _check_positive(sequence_length, "sequence length")
    _check_positive(max_tokens, "max tokens")
    _check_positive(samples, "samples")
    if max_tokens is not None and max_tokens < sequence_length:
        raise ActTailError(
            f"max tokens ({max_tokens}) is smaller than the sequence length ({sequence_length}): "
            "raise --max-tokens or lower --sequence-length"
        )
    wanted = None
    if max_tokens is not None:
        wanted = max_tokens // sequence_length
    if samples is not None:
        wanted = samples if wanted is None else min(wanted, samples)

    if wanted is None:
        ids = _encode(tokenizer, text)
    else:
        # Tokenize a prefix big enough for the requested windows; grow it if BPE was denser than assumed.
        need = wanted * sequence_length
        chars = need * _CHARS_PER_TOKEN
        while True:
            ids = _encode(tokenizer, text[:chars])
            if len(ids) > need or chars >= len(text):
                break
            chars *= 2
    n = len(ids) // sequence_length
    if samples is not None and n < wanted:
        raise ActTailError(
            f"text has {len(ids)} tokens, too short for {samples} samples of {sequence_length} tokens: "
            f"use at most {n} samples, a shorter sequence length, or a longer file"
        )
    if n == 0:
        raise ActTailError(
            f"text has {len(ids)} tokens, fewer than one window of {sequence_length}: "
            "lower --sequence-length or use a longer file"
        )
    if wanted is not None:
        n = min(n, wanted)
    windows = torch.tensor(ids[: n * sequence_length], dtype=torch.long).view(n, sequence_length)
    logger.debug("%d windows of %d tokens (%d tokens in text prefix)", n, sequence_length, len(ids))
    return windows


def load_windows(
    tokenizer,
    path: str | Path | None,
    sequence_length: int,
    max_tokens: int | None = None,
    samples: int | None = None,
) -> torch.LongTensor:
    """``token_windows(tokenizer, read_text(path), ...)``."""
    return token_windows(tokenizer, read_text(path), sequence_length, max_tokens=max_tokens, samples=samples)

