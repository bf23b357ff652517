"""Calibration / evaluation text: read a UTF-8 text file, tokenize it once, cut non-overlapping windows."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ActTailError

logger = logging.getLogger(__name__)

#: Folder of the default texts: ``$ACTTAIL_WIKITEXT_DIR`` (``wiki.valid.raw``, ``wiki.test.raw``), else a cache that
#: :func:`fetch_default_text` fills from the Hub dataset ``wikitext`` / ``wikitext-2-raw-v1`` when online.
DEFAULT_TEXT_DIR = Path(os.environ.get("ACTTAIL_WIKITEXT_DIR") or Path.home() / ".cache" / "acttail-export" / "wikitext-2")
#: Default calibration text (WikiText-2 validation split, raw).
DEFAULT_CALIBRATION_DATA = DEFAULT_TEXT_DIR / "wiki.valid.raw"
#: Default evaluation text (WikiText-2 test split, raw; hyperparameters are chosen on the validation split).
DEFAULT_EVAL_DATA = DEFAULT_TEXT_DIR / "wiki.test.raw"
_HUB_SPLITS = {"wiki.valid.raw": "validation", "wiki.test.raw": "test"}

# Characters per token assumed when only a prefix of a long text is tokenized (English BPE is ~4;
# the prefix is doubled and retried when it turns out too short, so this only affects speed).
_CHARS_PER_TOKEN = 6


@dataclass(frozen=True)
class DataFlags:
    """The command-line flags that error messages name, so that each caller's messages name its own flags.

    The defaults are those of ``export`` (calibration: ``--calibration-data``, ``--calibration-samples``,
    ``--sequence-length``) and of ``evaluate``'s evaluation text (``--data``, ``--max-tokens``,
    ``--sequence-length``). ``data=None``: named from the file when it is a default WikiText-2 file.
    """

    data: str | None = None
    sequence_length: str = "--sequence-length"
    samples: str = "--calibration-samples"
    max_tokens: str = "--max-tokens"


#: ``evaluate``'s evaluation text.
EVALUATE_DATA_FLAGS = DataFlags(data="--data")
#: ``evaluate``'s calibration text (threshold mode).
EVALUATE_CALIBRATION_FLAGS = DataFlags(data="--calibration-data", sequence_length="--calibration-sequence-length")
#: ``export``'s calibration text.
EXPORT_CALIBRATION_FLAGS = DataFlags(data="--calibration-data")


def _file_flag(path: Path | None, flags: DataFlags) -> str | None:
    if flags.data is not None:
        return flags.data
    if path is not None and path == DEFAULT_CALIBRATION_DATA:
        return "--calibration-data"
    if path is not None and path == DEFAULT_EVAL_DATA:
        return "--data"
    return None


def read_text(path: str | Path | None, flags: DataFlags = DataFlags()) -> str:
    """Read a UTF-8 text file; ActTailError for a missing, empty or binary file (naming ``flags.data``)."""
    if path is None:
        flag = _file_flag(None, flags)
        raise ActTailError(f"no data file given: pass {flag + ' FILE' if flag else 'the path of'} a UTF-8 text file (e.g. wiki.valid.raw)")
    path = Path(path)
    flag = _file_flag(path, flags)
    if not path.exists():
        if path in (DEFAULT_CALIBRATION_DATA, DEFAULT_EVAL_DATA):
            fetch_default_text(path, flag)
        else:
            raise ActTailError(f"{flag or 'data file'} {path} not found: pass an existing UTF-8 text file")
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


def fetch_default_text(path: Path, flag: str | None) -> None:
    """Write the WikiText-2 raw split behind the default ``path`` from the Hub (``datasets``); one-line error offline."""
    hint = f"pass {flag or 'a'} FILE (a UTF-8 text file) or set ACTTAIL_WIKITEXT_DIR to a folder with WikiText-2 raw"
    try:
        import datasets
    except ImportError:
        raise ActTailError(f"no default text at {path} and the datasets package is not installed: {hint}") from None
    logger.info("downloading WikiText-2 raw (%s) from the Hub into %s", _HUB_SPLITS[path.name], path.parent)
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=_HUB_SPLITS[path.name])
    except Exception as exc:  # noqa: BLE001 - offline, no such dataset, ...: one line naming the flag
        raise ActTailError(f"no default text at {path} and the Hub dataset wikitext-2-raw-v1 could not be loaded "
                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): {hint}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(rows["text"]), encoding="utf-8")
    tmp.replace(path)


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
    flags: DataFlags = DataFlags(),
) -> torch.LongTensor:
    """Tokenize ``text`` once and return non-overlapping windows ``[n, sequence_length]``.

    ``samples`` asks for exactly that many windows (ActTailError if the text is too short);
    ``max_tokens`` caps the total (n = max_tokens // sequence_length, at least one window).
    Without either, all complete windows are returned. A trailing partial window is dropped.
    Error messages name the caller's ``flags``.
    """
    _check_positive(sequence_length, "sequence length")
    _check_positive(max_tokens, "max tokens")
    _check_positive(samples, "samples")
    if max_tokens is not None and max_tokens < sequence_length:
        raise ActTailError(
            f"max tokens ({max_tokens}) is smaller than the sequence length ({sequence_length}): "
            f"raise {flags.max_tokens} or lower {flags.sequence_length}"
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
        if n:
            fix = f"use at most {n} samples ({flags.samples} {n}), a smaller {flags.sequence_length}, or a longer file"
        elif len(ids) >= 2:
            fewer = f" and fewer samples ({flags.samples})" if samples > 1 else ""
            fix = f"use at most {len(ids)} tokens per window (a smaller {flags.sequence_length}){fewer}, or a longer file"
        else:
            fix = "use a longer file"
        raise ActTailError(f"text has {len(ids)} tokens, too short for {samples} samples of {sequence_length} tokens: {fix}")
    if n == 0:
        raise ActTailError(
            f"text has {len(ids)} tokens, fewer than one window of {sequence_length}: "
            f"lower {flags.sequence_length} or use a longer file"
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
    flags: DataFlags = DataFlags(),
) -> torch.LongTensor:
    """``token_windows(tokenizer, read_text(path), ...)``; error messages name ``flags``."""
    return token_windows(tokenizer, read_text(path, flags), sequence_length, max_tokens=max_tokens, samples=samples, flags=flags)

