"""``acttail-export evaluate``: perplexity of dense and sparsified models (PyTorch or ONNX Runtime).

For a base model, every (allocation, sparsity, mode) combination is built with
``allocation.build_config`` (alphas fitted once per run) and, in threshold mode, calibrated with
``calibration.calibrate_many`` (one dense pass for all of them). Sparsity 0 is the dense model,
evaluated once. For an export folder (it holds ``acttail_config.json``), its recorded config is
evaluated: ``--backend torch`` rebuilds it in PyTorch on the base model named in the config,
``--backend onnxruntime`` runs the exported graph.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from ..config import ALLOCATIONS, CONFIG_NAME, MODES, check_epsilon, check_sparsity
from ..errors import ActTailError

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
DEFAULT_SPARSITIES = ("0", "0.5")
DEFAULT_MAX_TOKENS = 16384
DEFAULT_SEQUENCE_LENGTH = 1024


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="perplexity of the dense and sparsified model on a text file",
        description="Perplexity of dense and sparsified models (PyTorch or ONNX Runtime) on non-overlapping token windows.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="HF folder, .gguf file, Hub id, 'smollm2' for the bundled SmolLM2-135M-Instruct (the default), "
                            "or an acttail-export output folder")
    model.add_argument("--backend", default="torch", choices=BACKENDS,
                       help="torch: PyTorch sparse reference; onnxruntime: run an export folder (default: torch)")
    model.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="PyTorch weights dtype (default: fp32)")
    model.add_argument("--device", default="cpu", help="PyTorch device (default: cpu)")

    sparsity = parser.add_argument_group("sparsity (base models only)")
    sparsity.add_argument("--sparsity", nargs="+", default=None, metavar="S",
                          help="target sparsities in [0, 1); 0 = dense (default: 0 0.5)")
    sparsity.add_argument("--allocation", nargs="+", default=None, choices=ALLOCATIONS,
                          help="budget allocations to compare (default: acttail)")
    sparsity.add_argument("--mode", nargs="+", default=None, choices=MODES,
                          help="topk (per-token top-k, the paper's mode) and/or threshold (calibrated, TEAL's) (default: topk)")
    sparsity.add_argument("--epsilon", default=None, help="ActTail spread epsilon (default: allocation.DEFAULT_EPSILON)")
    sparsity.add_argument("--mapping", default=None, help="alpha-to-budget mapping (default: allocation.DEFAULT_MAPPING)")

    calib = parser.add_argument_group("calibration (threshold mode)")
    calib.add_argument("--calibration-data", default=None, help="calibration text (default: WikiText-2 wiki.valid.raw)")
    calib.add_argument("--calibration-samples", default="64", help="calibration windows (default: 64)")
    calib.add_argument("--calibration-sequence-length", default="512", help="tokens per calibration window (default: 512)")
    calib.add_argument("--sequential-calibration", action="store_true",
                       help="calibrate layer by layer on already-thresholded inputs instead of dense activations")

    data = parser.add_argument_group("evaluation data")
    data.add_argument("--data", default=None, help="evaluation text (default: WikiText-2 wiki.test.raw)")
    data.add_argument("--max-tokens", default=str(DEFAULT_MAX_TOKENS), help=f"evaluate at most this many tokens (default: {DEFAULT_MAX_TOKENS})")
    data.add_argument("--sequence-length", default=str(DEFAULT_SEQUENCE_LENGTH),
                      help=f"tokens per non-overlapping window (default: {DEFAULT_SEQUENCE_LENGTH})")
    data.add_argument("--batch-size", default=None, help="windows per forward pass (default: 4096 tokens worth)")

    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="OUT", help="write {\"results\": [...]} to this file")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _positive_int(value: str | int | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ActTailError(f"{flag} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ActTailError(f"{flag} must be a positive integer, got {value!r}")
    return number


def _window_length(value: str | int | None, flag: str) -> int:
    """A window length: an integer >= 2 (position 0 predicts nothing, so 1 would score no token)."""
    number = _positive_int(value, flag)
    if number < 2:
        raise ActTailError(f"{flag} must be at least 2 (a window of 1 token has no next token to predict), got {value!r}")
    return number


def _check_context(length: int, limit: int | None, flag: str, where: str) -> None:
    """ActTailError when windows of ``length`` tokens exceed the model's ``max_position_embeddings`` (if known)."""
    if limit is not None and length > limit:
        raise ActTailError(f"{flag} {length} exceeds the context of {where} (max_position_embeddings {limit}): "
                           f"use {flag} {limit} or less")


def _model_context(model) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _sparsities(values) -> list[float]:
    out: list[float] = []
    for value in values:
        s = check_sparsity(value, "--sparsity")
        if s not in out:
            out.append(s)
    return out


def _check_json_target(path: str | None) -> Path | None:
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise ActTailError(f"--json {target} is a directory: pass a file path")
    if not target.parent.exists():
        raise ActTailError(f"--json folder {target.parent} does not exist: create it first")
    return target


def _record(allocation: str, sparsity: float, mode: str, backend: str, result: dict[str, Any]) -> dict[str, Any]:
    effective = result.get("effective_sparsity")
    return {
        "allocation": allocation, "sparsity": sparsity, "mode": mode, "backend": backend,
        "perplexity": float(result["perplexity"]), "tokens": int(result["tokens"]),
        "effective_sparsity": None if effective is None else float(effective),
    }


def run(args: argparse.Namespace) -> None:
    from ..data import DEFAULT_CALIBRATION_DATA, DEFAULT_EVAL_DATA, EVALUATE_CALIBRATION_FLAGS, EVALUATE_DATA_FLAGS, read_text

    progress = not args.no_progress
    data = Path(args.data) if args.data else DEFAULT_EVAL_DATA
    read_text(data, EVALUATE_DATA_FLAGS)  # fail fast on a bad file, before loading anything heavy
    sequence_length = _window_length(args.sequence_length, "--sequence-length")
    max_tokens = _positive_int(args.max_tokens, "--max-tokens")
    batch_size = _positive_int(args.batch_size, "--batch-size")
    json_path = _check_json_target(args.json)

    model_ref = args.model
    if model_ref is not None and Path(model_ref).is_dir() and (Path(model_ref) / CONFIG_NAME).exists():
        records = _evaluate_export(args, Path(model_ref), data, sequence_length, max_tokens, batch_size, progress)
    else:
        if args.backend == "onnxruntime":
            raise ActTailError(
                "--backend onnxruntime needs an export folder (with acttail_config.json): run `acttail-export export` first"
            )
        sparsities = _sparsities(args.sparsity or DEFAULT_SPARSITIES)
        allocations = args.allocation or ["acttail"]
        modes = args.mode or ["topk"]
        calibration_data = Path(args.calibration_data) if args.calibration_data else DEFAULT_CALIBRATION_DATA
        calibration_samples = _positive_int(args.calibration_samples, "--calibration-samples")
        calibration_length = _window_length(args.calibration_sequence_length, "--calibration-sequence-length")
        if "threshold" in modes and any(s > 0 for s in sparsities):
            read_text(calibration_data, EVALUATE_CALIBRATION_FLAGS)
        epsilon = None if args.epsilon is None else check_epsilon(_float(args.epsilon, "--epsilon"))
        if args.mapping is not None:
            from ..allocation import check_mapping

            check_mapping(args.mapping)
        records = evaluate_base(
            model_ref, data, sparsities, allocations, modes, sequence_length=sequence_length, max_tokens=max_tokens,
            dtype=args.dtype, device=args.device, batch_size=batch_size, progress=progress, epsilon=epsilon,
            mapping=args.mapping, calibration_data=calibration_data, calibration_samples=calibration_samples,
            calibration_sequence_length=calibration_length, sequential=args.sequential_calibration,
        )
    _print_table(records)
    if json_path is not None:
        json_path.write_text(json.dumps({"results": records}, indent=2) + "\n")
        logger.info("wrote %s", json_path)


def _float(value: str, flag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ActTailError(f"{flag} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ActTailError(f"{flag} must be finite, got {value!r}")
    return number


def _evaluate_export(args, export_dir: Path, data: Path, sequence_length: int, max_tokens: int | None,
                     batch_size: int | None, progress: bool) -> list[dict[str, Any]]:
    from ..config import ActTailConfig

    config = ActTailConfig.load(export_dir)
    if args.sparsity or args.allocation or args.mode:
        logger.info("%s is an export folder: evaluating its recorded config (--sparsity/--allocation/--mode ignored)", export_dir)
    if args.backend == "onnxruntime":
        from ..runtime import max_positions, perplexity_onnx

        _check_context(sequence_length, max_positions(export_dir), "--sequence-length", str(export_dir))
        result = perplexity_onnx(export_dir, data, sequence_length, max_tokens, progress=progress)
        result.setdefault("effective_sparsity", config.effective_sparsity)
    else:
        from ..evaluation import perplexity
        from ..modeling import load_model

        if not config.model:
            raise ActTailError(f"{export_dir / CONFIG_NAME} records no base model ('model' field): re-export it")
        model, tokenizer = load_model(config.model, args.dtype, args.device)
        _check_context(sequence_length, _model_context(model), "--sequence-length", config.model)
        result = perplexity(model, tokenizer, data, sequence_length, max_tokens, config=config, mode=config.mode,
                            progress=progress, batch_size=batch_size)
    allocation = config.allocation if config.target_sparsity > 0 else "dense"
    mode = config.mode if config.target_sparsity > 0 else "dense"
    return [_record(allocation, config.target_sparsity, mode, args.backend, result)]


def evaluate_base(
    model_ref: str | None,
    data: str | Path,
    sparsities: list[float],
    allocations: list[str],
    modes: list[str],
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
    """Records (see ``--json``) for dense (if 0 in ``sparsities``) and every (allocation, mode, sparsity > 0).

    ``fits`` (from ``spectral.analyze_model``) skips the spectral analysis when already computed.
    """
    from ..allocation import build_config
    from ..calibration import calibrate_many
    from ..data import DEFAULT_CALIBRATION_DATA, EVALUATE_CALIBRATION_FLAGS, EVALUATE_DATA_FLAGS, load_windows
    from ..evaluation import perplexity_windows
    from ..modeling import default_model_path, load_model, resolve_model
    from ..spectral import analyze_model

    model_ref = resolve_model(model_ref or default_model_path())  # alias expanded, a local path absolute
    model, tokenizer = load_model(model_ref, dtype, device)
    context = _model_context(model)
    _check_context(sequence_length, context, "--sequence-length", model_ref)
    windows = load_windows(tokenizer, data, sequence_length, max_tokens=max_tokens, flags=EVALUATE_DATA_FLAGS)
    calibration_windows = None
    if "threshold" in modes and any(s > 0 for s in sparsities):
        # cut here (before the spectral analysis) with evaluate's flag names: --calibration-sequence-length, not export's
        _check_context(calibration_sequence_length, context, "--calibration-sequence-length", model_ref)
        calibration_windows = load_windows(tokenizer, DEFAULT_CALIBRATION_DATA if calibration_data is None else calibration_data,
                                           calibration_sequence_length, samples=calibration_samples, flags=EVALUATE_CALIBRATION_FLAGS)
    records: list[dict[str, Any]] = []
    if 0.0 in sparsities:
        records.append(_record("dense", 0.0, "dense", "torch", perplexity_windows(model, windows, progress=progress, batch_size=batch_size)))
    sparse = [s for s in sparsities if s > 0]
    if not sparse:
        return records
    if fits is None and {"acttail", "acttail-greedy"} & set(allocations):
        fits = analyze_model(model, progress=progress)  # once per run, shared by every config
    trajectories = {}
    for allocation in {"teal-greedy", "acttail-greedy"} & set(allocations):
        from ..greedy import search_for

        for mode in modes:  # one cached search per mode reaches every level asked for
            trajectories[allocation, mode] = search_for(model, tokenizer, allocation, sparse, mode, calibration_data, fits=fits,
                                                        epsilon=epsilon, mapping=mapping, progress=progress)
    configs = [
        (allocation, s, mode, build_config(model, s, allocation, mode, epsilon=epsilon, mapping=mapping, fits=fits,
                                           trajectories=trajectories.get((allocation, mode))))
        for allocation in allocations for mode in modes for s in sparse
    ]
    thresholded = [c for _, _, mode, c in configs if mode == "threshold"]
    if thresholded:
        calibrate_many(model, tokenizer, thresholded, calibration_data, calibration_samples, calibration_sequence_length,
                       progress, sequential=sequential, windows=calibration_windows)
    for allocation, s, mode, config in configs:
        config.model = str(model_ref)
        result = perplexity_windows(model, windows, config, mode, progress=progress, batch_size=batch_size)
        records.append(_record(allocation, s, mode, "torch", result))
    return records


def _print_table(records: list[dict[str, Any]]) -> None:
    print(f"{'allocation':<10} {'mode':<9} {'sparsity':>8} {'effective':>9} {'perplexity':>11} {'tokens':>7}  backend")
    for r in records:
        eff = "-" if r["effective_sparsity"] is None else f"{r['effective_sparsity']:.4f}"
        print(f"{r['allocation']:<10} {r['mode']:<9} {r['sparsity']:>8.2f} {eff:>9} {r['perplexity']:>11.3f} {r['tokens']:>7}  {r['backend']}")
