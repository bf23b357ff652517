"""Checks that a loaded model and its tokenizer are usable: finite weights, tokenizer files, matching vocabulary.

Run once at load (:func:`acttail_export.modeling.load_model`), so that a NaN in a norm or an embedding
is one line naming the tensor instead of a silently broken export or a linear-algebra traceback later.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ActTailError

logger = logging.getLogger(__name__)

#: Files of which a saved tokenizer has at least one (fast tokenizer, sentencepiece, BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_finite_weights(model) -> None:
    """Every parameter and floating-point buffer of ``model`` must be finite (no NaN / Inf)."""
    import torch

    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    with torch.no_grad():
        for name, tensor in tensors:
            if tensor.device.type == "meta":  # offloaded (accelerate): checked where it is materialized
                continue
            finite = torch.isfinite(tensor)
            if bool(finite.all()):
                continue
            nan = int(torch.isnan(tensor).sum())
            inf = int(finite.numel() - finite.sum()) - nan
            fix = ("values above 65504 overflow in fp16: use --dtype fp32" if tensor.dtype == torch.float16 else
                   "the checkpoint is corrupted or was saved after a diverged training step; re-download or re-save "
                   "the model with finite weights")
            raise ActTailError(f"weight {name} has {nan} NaN and {inf} Inf values of {tensor.numel()}: {fix}")


def check_tokenizer_files(folder: str | Path) -> None:
    """A local HF folder must hold tokenizer files (before minutes of work; the export writes them into its folder)."""
    folder = Path(folder)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ActTailError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}): save the tokenizer next to "
                           "the model with tokenizer.save_pretrained(FOLDER)")


def check_tokenizer(tokenizer, model, where: str):
    """``tokenizer`` must be a tokenizer whose ids all index the model's embedding; returns it."""
    if tokenizer is None or isinstance(tokenizer, bool) or not callable(getattr(tokenizer, "encode", None)):
        raise ActTailError(f"{where} has no usable tokenizer (got {type(tokenizer).__name__}): save the tokenizer next to "
                           "the model with tokenizer.save_pretrained(FOLDER)")
    rows = model.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    if size > rows:
        raise ActTailError(f"the tokenizer of {where} has {size} tokens but the model's embedding has {rows} rows: token ids "
                           f">= {rows} would index past it; save the tokenizer that belongs to the model")
    return tokenizer


def finite_or_error(value: float, what: str, fix: str) -> float:
    """``value`` when finite, else a one-line ActTailError naming ``what`` and ``fix``."""
    import math

    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ActTailError(f"{what} is {value!r}, not a finite number: {fix}")
    return float(value)
