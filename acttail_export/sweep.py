"""Perplexity of a base model over a grid of (allocation, mode, sparsity), or of one export folder.

For a base model, every (allocation, sparsity, mode) combination is built with
:func:`acttail_export.allocation.build_config` (alphas fitted once per call) and, in threshold mode,
calibrated with :func:`acttail_export.calibration.calibrate_many` (one dense pass for all of them).
Sparsity 0 is the dense model, evaluated once. An export folder is evaluated at its recorded config:
``backend="torch"`` rebuilds it in PyTorch on the base model named in the config, ``"onnxruntime"``
runs the exported graph. Records are the rows of ``acttail-export evaluate --json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from .config import CONFIG_NAME, ActTailConfig
from .errors import ActTailError

logger = logging.getLogger(__name__)

Backend = Literal["torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")
DEFAULT_MAX_TOKENS = 16384
DEFAULT_SEQUENCE_LENGTH = 1024


def check_context(length: int, limit: int | None, flag: str, where: str) -> None:
    """ActTailError when windows of ``length`` tokens exceed the model's ``max_position_embeddings`` (if known)."""
    if limit is not None and length > limit:
        raise ActTailError(f"{flag} {length} exceeds the context of {where} (max_position_embeddings {limit}): "
                           f"use {flag} {limit} or less")


def model_context(model) -> int | None:
    """``max_position_embeddings`` of a transformers model's config, None when unknown."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def record(allocation: str, sparsity: float, mode: str, backend: str, result: dict[str, Any],
           method: str | None = None) -> dict[str, Any]:
    """One result row: allocation, method (what ``allocation`` resolved to; default: itself), sparsity, mode, backend,
    perplexity, tokens, effective_sparsity."""
    effective = result.get("effective_sparsity")
    return {
        "allocation": allocation, "method": method or allocation, "sparsity": sparsity, "mode": mode, "backend": backend,
        "perplexity": float(result["perplexity"]), "tokens": int(result["tokens"]),
        "effective_sparsity": None if effective is None else float(effective),
    }


def evaluate_export(export_dir: str | Path, data: str | Path, backend: Backend = "torch", *,
                    sequence_length: int = DEFAULT_SEQUENCE_LENGTH, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                    dtype: str = "fp32", device: str = "cpu", batch_size: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """The record of an export folder's recorded config on ``data`` (ONNX Runtime, or PyTorch on its base model)."""
    export_dir = Path(export_dir)
    config = ActTailConfig.load(export_dir)
    if backend == "onnxruntime":
        from .runtime import max_positions, perplexity_onnx

        check_context(sequence_length, max_positions(export_dir), "--sequence-length", str(export_dir))
        result = perplexity_onnx(export_dir, data, sequence_length, max_tokens, progress=progress)
        result.setdefault("effective_sparsity", config.effective_sparsity)
    else:
        from .evaluation import perplexity
        from .modeling import load_model

        if not config.model:
            raise ActTailError(f"{export_dir / CONFIG_NAME} records no base model ('model' field): re-export it")
        model, tokenizer = load_model(config.model, dtype, device)
        check_context(sequence_length, model_context(model), "--sequence-length", config.model)
        result = perplexity(model, tokenizer, data, sequence_length, max_tokens, config=config, mode=config.mode,
                            progress=progress, batch_size=batch_size)
    dense = config.target_sparsity == 0
    return record("dense" if dense else config.allocation, config.target_sparsity, "dense" if dense else config.mode,
                  backend, result, None if dense else config.allocation_method)


def _build_configs(model, tokenizer, sparse: list[float], allocations: Sequence[str], modes: Sequence[str], *,
                   epsilon: float | None, mapping: str | None, fits: dict | None, calibration_data: str | Path | None,
                   progress: bool) -> list[tuple[str, float, str, ActTailConfig]]:
    """(allocation, sparsity, mode, config) of every combination; alphas fitted and greedy searches run once."""
    from .allocation import build_config, needs_alphas, needs_search
    from .spectral import analyze_model

    if fits is None and any(needs_alphas(allocation, sparse, mode) for allocation in allocations for mode in modes):
        fits = analyze_model(model, progress=progress)  # once per call, shared by every config
    trajectories = {}
    for allocation in dict.fromkeys(allocations):
        from .greedy import search_for

        for mode in (m for m in modes if needs_search(allocation, sparse, m)):  # one cached search per mode: every level
            trajectories[allocation, mode] = search_for(model, tokenizer, allocation, sparse, mode, calibration_data,
                                                        fits=fits, epsilon=epsilon, mapping=mapping, progress=progress)
    return [(allocation, s, mode, build_config(model, s, allocation, mode, epsilon=epsilon, mapping=mapping, fits=fits,
                                               trajectories=trajectories.get((allocation, mode))))
            for allocation in allocations for mode in modes for s in sparse]


def evaluate_base(
    model_ref: str | None,
    data: str | Path,
    sparsities: Sequence[float],
    allocations: Sequence[str],
    modes: Sequence[str],
    *,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    dtype: str = "fp32",
    device: str = "cpu",
    batch_size: int | None = None,
    progress: bool = True,
    epsilon: float | None = None,
    mapping: str | None = None,
    calibration_data: str | Path | None = None,
    calibration_samples: int = 64,
    calibration_sequence_length: int = 512,
    sequential: bool = False,
    fits: dict | None = None,
) -> list[dict[str, Any]]:
    """Records for dense (if 0 in ``sparsities``) and every (allocation, mode, sparsity > 0).

    ``fits`` (from ``spectral.analyze_model``) skips the spectral analysis when already computed.
    """
    from .calibration import calibrate_many
    from .data import DEFAULT_CALIBRATION_DATA, EVALUATE_CALIBRATION_FLAGS, EVALUATE_DATA_FLAGS, load_windows
    from .evaluation import perplexity_windows
    from .modeling import default_model_path, load_model, resolve_model

    model_ref = resolve_model(model_ref or default_model_path())  # alias expanded, a local path absolute
    model, tokenizer = load_model(model_ref, dtype, device)
    context = model_context(model)
    check_context(sequence_length, context, "--sequence-length", model_ref)
    windows = load_windows(tokenizer, data, sequence_length, max_tokens=max_tokens, flags=EVALUATE_DATA_FLAGS)
    sparse = [s for s in sparsities if s > 0]
    calibration_windows = None
    if "threshold" in modes and sparse:  # cut here, before the spectral analysis, with evaluate's flag names
        check_context(calibration_sequence_length, context, "--calibration-sequence-length", model_ref)
        source = DEFAULT_CALIBRATION_DATA if calibration_data is None else calibration_data
        calibration_windows = load_windows(tokenizer, source, calibration_sequence_length,
                                           samples=calibration_samples, flags=EVALUATE_CALIBRATION_FLAGS)
    records: list[dict[str, Any]] = []
    if 0.0 in sparsities:
        dense = perplexity_windows(model, windows, progress=progress, batch_size=batch_size)
        records.append(record("dense", 0.0, "dense", "torch", dense))
    if not sparse:
        return records
    configs = _build_configs(model, tokenizer, sparse, allocations, modes, epsilon=epsilon, mapping=mapping, fits=fits,
                             calibration_data=calibration_data, progress=progress)
    thresholded = [c for _, _, mode, c in configs if mode == "threshold"]
    if thresholded:
        calibrate_many(model, tokenizer, thresholded, calibration_data, calibration_samples,
                       calibration_sequence_length, progress, sequential=sequential, windows=calibration_windows)
    for allocation, s, mode, config in configs:
        config.model = str(model_ref)
        result = perplexity_windows(model, windows, config, mode, progress=progress, batch_size=batch_size)
        records.append(record(allocation, s, mode, "torch", result, config.allocation_method))
    return records
