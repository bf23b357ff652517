"""``acttail-export evaluate``: perplexity of dense and sparsified models (PyTorch or ONNX Runtime).

Parses and checks the flags, then calls :func:`acttail_export.sweep.evaluate_base` (a base model: every
allocation × mode × sparsity) or :func:`acttail_export.sweep.evaluate_export` (an export folder: its
recorded config) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..config import ALLOCATIONS, CONFIG_NAME, MODES, check_sparsity
from ..errors import ActTailError
from ._values import epsilon_flag

logger = logging.getLogger(__name__)

DEFAULT_SPARSITIES = ("0", "0.5")


def register(subparsers) -> None:
    from ..allocation import DEFAULT_MAPPING, MAPPINGS
    from ..sweep import BACKENDS, DEFAULT_MAX_TOKENS, DEFAULT_SEQUENCE_LENGTH

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
                          help="budget allocations to compare (default: acttail, the project's default: a method per level and mode, "
                               "docs/allocation.md)")
    sparsity.add_argument("--mode", nargs="+", default=None, choices=MODES,
                          help="topk (per-token top-k, the paper's mode) and/or threshold (calibrated, TEAL's) (default: topk)")
    sparsity.add_argument("--epsilon", default=None, help="ActTail spread epsilon (default: allocation.DEFAULT_EPSILON)")
    sparsity.add_argument("--mapping", default=None,
                          help=f"alpha-to-budget mapping: {', '.join(MAPPINGS)} (default: {DEFAULT_MAPPING})")

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


def run(args: argparse.Namespace) -> None:
    from ..data import (
        DEFAULT_CALIBRATION_DATA,
        DEFAULT_EVAL_DATA,
        EVALUATE_CALIBRATION_FLAGS,
        EVALUATE_DATA_FLAGS,
        read_text,
    )

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
        epsilon = epsilon_flag(args.epsilon)
        if args.mapping is not None:
            from ..allocation import check_mapping

            check_mapping(args.mapping, "--mapping")
        if epsilon is not None or args.mapping is not None:
            from ..options import check_allocation_shape

            for allocation in allocations:
                if allocation != "uniform":  # uniform rows ignore them (a baseline beside the others)
                    for s in sparsities:
                        for mode in modes:
                            check_allocation_shape(allocation, s, mode, epsilon, args.mapping)
        from ..sweep import evaluate_base

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


def _evaluate_export(args, export_dir: Path, data: Path, sequence_length: int, max_tokens: int | None,
                     batch_size: int | None, progress: bool) -> list[dict[str, Any]]:
    from ..sweep import evaluate_export

    if args.sparsity or args.allocation or args.mode:
        logger.info("%s is an export folder: evaluating its recorded config (--sparsity/--allocation/--mode ignored)", export_dir)
    return [evaluate_export(export_dir, data, args.backend, sequence_length=sequence_length, max_tokens=max_tokens,
                            dtype=args.dtype, device=args.device, batch_size=batch_size, progress=progress)]


def _print_table(records: list[dict[str, Any]]) -> None:
    print(f"{'allocation':<14} {'method':<14} {'mode':<9} {'sparsity':>8} {'effective':>9} {'perplexity':>11} {'tokens':>7}  "
          "backend")
    for r in records:
        eff = "-" if r["effective_sparsity"] is None else f"{r['effective_sparsity']:.4f}"
        method = r.get("method") or "-"
        print(f"{r['allocation']:<14} {method:<14} {r['mode']:<9} {r['sparsity']:>8.2f} {eff:>9} {r['perplexity']:>11.3f} "
              f"{r['tokens']:>7}  {r['backend']}")
