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

    buffers = {n for n, b in model.named_buffers() if b.is_floating_point()}
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in buffers]
    with torch.no_grad():
        for name, tensor in tensors:
            if tensor.device.type == "meta":  # offloaded (accelerate): checked where it is materialized
                continue
            finite = torch.isfinite(tensor)
            if bool(finite.all()):
                continue
            nan = int(torch.isnan(tensor).sum())
            inf = int(finite.numel() - finite.sum()) - nan
            if name in buffers:  # computed at load, not read from the checkpoint
                fix = "it is computed from config.json (e.g. rope_theta, rope_scaling): check those values"
            elif tensor.dtype == torch.float16:
                fix = "values above 65504 overflow in fp16: use --dtype fp32"
            else:
                fix = ("the checkpoint is corrupted or was saved after a diverged training step; re-download or re-save "
                       "the model with finite weights")
            raise ActTailError(f"{'buffer' if name in buffers else 'weight'} {name} has {nan} NaN and {inf} Inf values of {tensor.numel()}: {fix}")


def check_forward(model, where: str) -> None:
    """A 2-token forward pass must run and give finite logits (config values such as ``rms_norm_eps: null`` only
    fail here; finite weights can still overflow)."""
    import torch

    from .offload import input_device

    ids = torch.ones(1, 2, dtype=torch.long, device=input_device(model))
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise ActTailError(f"{where} fails a 2-token forward pass ({type(exc).__name__}: {detail}): check config.json "
                           "against the model") from None
    if not bool(torch.isfinite(logits).all()):
        raise ActTailError(f"{where} gives non-finite logits on a 2-token input although its weights are finite: it "
                           "overflows (use --dtype fp32 if it is fp16) or config.json is wrong")


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
