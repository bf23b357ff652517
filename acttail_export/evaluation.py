"""Perplexity in PyTorch, dense or with the sparsity hooks of :mod:`acttail_export.sparsify`.

Text is cut into non-overlapping windows of ``sequence_length`` tokens (no context carried across
windows); every position of every window goes through the sparsified projections, and the
perplexity is ``exp`` of the mean next-token NLL over positions ``1..L-1`` of all windows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import ActTailConfig
from .data import load_windows
from .errors import ActTailError
from .offload import input_device
from .sparsify import apply_sparsity

logger = logging.getLogger(__name__)

#: Positions per chunk when projecting hidden states to the vocabulary (bounds the logits memory).
_LOGIT_CHUNK = 256
#: Default tokens per forward batch.
DEFAULT_BATCH_TOKENS = 4096


def window_nll(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) over positions ``1..L-1`` of a batch of windows ``[B, L]``, and the count."""
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, ids.shape[1] - 1, _LOGIT_CHUNK):
        stop = min(start + _LOGIT_CHUNK, ids.shape[1] - 1)
        logits = head(hidden[:, start:stop]).float()
        target = ids[:, start + 1 : stop + 1].to(logits.device)  # the head may sit on another GPU (device_map)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total += nll.double().cpu()
    return float(total), ids.shape[0] * (ids.shape[1] - 1)


def perplexity_windows(
    model: torch.nn.Module,
    windows: torch.Tensor,
    config: ActTailConfig | None = None,
    mode: str | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    scores: str = "abs",
) -> dict[str, Any]:
    """Perplexity on token windows ``[n, L]``; sparsified with ``config`` when given (``scores``: the ranking of
    :func:`acttail_export.sparsify.apply_sparsity`)."""
    n, length = windows.shape
    if length < 2:
        raise ActTailError(f"sequence length must be at least 2 to predict a token, got {length}")
    batch_size = batch_size or max(1, DEFAULT_BATCH_TOKENS // length)
    device = input_device(model)
    hooks = apply_sparsity(model, config, mode, scores=scores) if config is not None else None
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            desc = "perplexity" if config is None else f"perplexity {config.allocation} {config.target_sparsity:g} {mode or config.mode}"
            for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
                nll, c = window_nll(model, windows[start : start + batch_size].to(device))
                total, count = total + nll, count + c
    finally:
        if hooks is not None:
            hooks.remove()
    effective = 0.0
    if hooks is not None:
        hooks.record(config)
        effective = hooks.weighted_effective_sparsity()
    ppl = math.exp(total / count)
    logger.info("perplexity %.3f on %d windows of %d tokens (effective sparsity %.4f)", ppl, n, length, effective)
    return {"perplexity": ppl, "tokens": n * length, "effective_sparsity": effective, "windows": n, "sequence_length": length}


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    data: str | Path,
    sequence_length: int = 1024,
    max_tokens: int | None = None,
    config: ActTailConfig | None = None,
    mode: str | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on the text file ``data`` (keys: perplexity, tokens, effective_sparsity, ...)."""
    windows = load_windows(tokenizer, data, sequence_length, max_tokens=max_tokens)
    result = perplexity_windows(model, windows, config, mode, progress, batch_size)
    result["data"] = str(data)
    return result
