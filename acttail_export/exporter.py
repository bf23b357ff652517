"""The whole export pipeline: load -> alphas -> budgets -> calibrate -> base -> validate -> model card -> folder.

The base (:mod:`acttail_export.bases`, chosen by ``ExportOptions.base``) builds the decoder graph and applies the
ActTail rewrite; every other step is here and the same for every base.

Everything is written into a temporary sibling of OUTPUT_DIR (``.NAME.acttail-tmp-PID-XXXX``, same
filesystem) and renamed into place at the very end, so a failure or Ctrl-C leaves OUTPUT_DIR as it
was. Temporary folders of killed runs (their PID is gone) are removed at the next run.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .bases import ExportBase, get_base, library_versions  # noqa: F401  (library_versions: old import path)
from .config import ActTailConfig, mode_policy_text
from .errors import ActTailError
from .modeling import expand_model_alias, resolve_model
from .options import ExportOptions
from .output_folder import (  # noqa: F401
    OLD_MARK,
    TMP_MARK,
    _make_parents,
    _make_temp,
    _move_into_place,
    _remove_empty,
    _sigterm_as_interrupt,
    _umask,
    check_output_dir,
    clean_stale_temp,
    remove_own_temp,
    restore_signals,
)
from .progress import library_progress
from .validate import SPARSITY_TOLERANCE, TOLERANCE, TOP1_FLOOR, ValidationReport, _gate, check_loadable, compare_logits, rule_mask, validate_export  # noqa: F401

logger = logging.getLogger(__name__)

VALIDATION_WINDOWS, VALIDATION_LENGTH = 2, 64
DEFAULT_SEQUENCE_LENGTH = 512  # calibration window when --sequence-length is not given (at most the context)
EVAL_LENGTH = 512


# --------------------------------------------------------------------------------------------
# input checks (cheap, before any model is loaded)
# --------------------------------------------------------------------------------------------
def check_inputs_outside(output_dir: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """No input (model folder or file, data file) may be OUTPUT_DIR or lie inside it: the export would replace it.

    ``inputs`` maps a description ("model") to a path; paths that do not exist locally (Hub ids) are skipped.
    """
    try:
        out = Path(output_dir).expanduser().resolve()
    except (RuntimeError, OSError):  # a symlink loop or an over-long name: check_output_dir says which
        return
    for what, path in inputs.items():
        if path is None or str(path).strip() == "":
            continue
        where = Path(path).expanduser()
        if not where.exists():
            continue
        where = where.resolve()
        if where == out or out in where.parents:
            relation = "is" if where == out else "contains"
            kind = "folder" if where.is_dir() else "file"
            raise ActTailError(f"OUTPUT_DIR {out} {relation} the {what} {kind} {where}, which the export would replace: "
                               f"choose another output folder")


def _model_path(model: str | Path | None) -> str | Path | None:
    """The local path ``model`` names (the bundled GGUF for an alias), without checking it."""
    return None if model is None or str(model).strip() == "" else expand_model_alias(model)


def check_kernel(kernel: str, int4: bool = False) -> str | None:
    """The op library path for ``kernel="fused"`` (ActTailError naming ``make ops`` if absent), None for ``mask``.

    ``kernel`` is one of :data:`acttail_export.options.KERNELS` (checked by :class:`ExportOptions`); ``int4``: the
    4-bit export, whose default is the fused kernel (the error then names ``--kernel mask`` as the way without the
    library).
    """
    if kernel == "mask":
        return None
    from .ops import get_library_path

    try:
        return get_library_path()
    except ActTailError as exc:
        if not int4:
            raise
        raise ActTailError(f"{exc}; --weights int4 takes the fused kernel by default: pass --kernel mask for standard "
                           "ops without the library (its MatMulNBits decode is about 10x slower on the CPU)") from None


def check_context(sequence_length: int | None, limit, where) -> int:
    """Calibration windows must fit the model's context (``max_position_embeddings``), as ``evaluate`` requires;
    returns the window length (None: the default 512, shortened to the context when that is shorter)."""
    known = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
    if sequence_length is None:
        return min(DEFAULT_SEQUENCE_LENGTH, limit) if known else DEFAULT_SEQUENCE_LENGTH
    if known and limit < sequence_length:
        raise ActTailError(f"--sequence-length {sequence_length} exceeds the context of {where} (max_position_embeddings "
                           f"{limit}): use --sequence-length {limit} or less")
    return sequence_length


def check_hub_token(token: str | None) -> str:
    """A Hub token from the option, ``HF_TOKEN`` or the stored login (never logged)."""
    from .hub import resolve_token

    return resolve_token(token)


def _check_hub(o: ExportOptions) -> str | None:
    """With ``--push-to-hub``: the repository id checked and the token found (None without it)."""
    if not o.push_to_hub:
        return None
    from .hub import check_repo_id

    check_repo_id(o.push_to_hub)
    return check_hub_token(o.token)



@contextmanager
def _stage(name: str):
    """Log the wall time and peak memory of one pipeline stage.

    The log record carries them as ``record.acttail_stage`` (name, seconds, peak host RSS during
    the stage, per-GPU peak allocated memory) for tools such as ``benchmarks/scale_memory.py``.
    """
    from .offload import PeakMemory

    start = time.perf_counter()
    with PeakMemory.sampled() as peak:
        yield
    stats = {"stage": name, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak.host_rss_mib),
             "gpu_peak_mib": {k: round(v) for k, v in peak.gpu_peak_mib.items()}}
    gpu = "".join(f", {k} peak {v} MiB" for k, v in stats["gpu_peak_mib"].items())
    logger.info("stage %s: %.1f s, peak RSS %d MiB%s", name, stats["seconds"], stats["peak_rss_mib"], gpu,
                extra={"acttail_stage": stats})


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------
def export(model: str | Path, output_dir: str | Path, options: ExportOptions | None = None, **kwargs: Any) -> Path:
    """Export ``model`` with ActTail sparsity to ``output_dir`` (see the module docstring); returns the folder.

    ``base`` picks the graph builder from :data:`acttail_export.bases.BASES` (``optimum``: optimum-onnx's trace;
    ``genai``: onnxruntime-genai's model builder, :mod:`acttail_export.bases.genai`); the analysis, calibration,
    validation and atomic output are the same for every base.

    The settings are an :class:`~acttail_export.options.ExportOptions` (``options``), or its fields as keyword
    arguments (``export(model, out, sparsity=0.8, mode="threshold")``; with ``options`` too, they replace its
    fields); a bad value raises a one-line :class:`ActTailError` before anything is loaded or written.
    ``weights="int4"`` writes 4-bit projections (:mod:`acttail_export.int4_rewrite`); float weights are ``dtype``.
    """
    from .data import DEFAULT_CALIBRATION_DATA, DEFAULT_EVAL_DATA, EXPORT_CALIBRATION_FLAGS, read_text
    from .onnx_export import check_device

    # ---- 1. cheap checks: every bad input fails here, before minutes of work --------------------
    o = ExportOptions.validated(options, **kwargs)  # values and combinations
    if o.head == "int8" and o.device == "cuda":
        logger.warning("--lm-head int8 with --device cuda: ONNX Runtime's CUDA kernel for the 8-bit lm_head is not "
                       "measured by this project (docs/quantization.md); --lm-head float is the CUDA default")
    int4 = o.weights == "int4"
    if int4 and o.device == "cpu" and (o.kernel == "mask" or o.sparsity == 0):
        what, cost = (("--kernel mask", "SmolLM2 at 50 %: about 10x the decode time of --kernel fused, the int4 default")
                      if o.sparsity > 0 else ("--sparsity 0", "either kernel: nothing is sparse to fuse"))
        logger.warning("%s with --weights int4: the projections become ONNX Runtime's MatMulNBits with float zero "
                       "points, which its CPU kernel dequantizes on every call (%s; docs/quantization.md)", what, cost)
    library = check_kernel(o.kernel, int4)
    check_device(o.device)
    calibration_path = o.calibration_data if o.calibration_data is not None else DEFAULT_CALIBRATION_DATA
    # before the not-empty check, which would suggest --overwrite (and so deleting the model)
    check_inputs_outside(output_dir, {"model": _model_path(model), "calibration data": calibration_path,
                                      "evaluation data": DEFAULT_EVAL_DATA if o.validate else None})
    output_dir = check_output_dir(output_dir, o.overwrite)
    model_ref = resolve_model(model)
    read_text(calibration_path, EXPORT_CALIBRATION_FLAGS)
    hub_token = _check_hub(o)
    base = get_base(o.base)
    base.check(o)  # last: the genai base imports its model builder in a subprocess (seconds)

    # last of the cheap checks: a folder's config.json or a GGUF's metadata; a Hub model is checked right after loading
    if Path(model_ref).is_dir() or model_ref.lower().endswith(".gguf"):
        from .modeling import gguf_context_length
        from .runtime import max_positions

        limit = max_positions(model_ref) if Path(model_ref).is_dir() else gguf_context_length(model_ref)
        length = check_context(o.sequence_length, limit, model_ref)
        if limit is not None or o.sequence_length is not None:  # unknown here: the loaded config shortens the default
            o = ExportOptions.validated(o, sequence_length=length)
    if o.mode_from_target:  # after the checks: a bad input still gets its one line alone
        logger.info("--mode %s: the default at sparsity %g (%s: docs/allocation.md section 6q)", o.mode, o.sparsity,
                    mode_policy_text())
    clean_stale_temp(output_dir)
    previous = _sigterm_as_interrupt()
    created, tmp = [], None
    try:
        created = _make_parents(output_dir.parent)  # removed again if the export fails
        tmp = _make_temp(output_dir, TMP_MARK)
        with library_progress(o.progress):
            config = _build(model_ref, tmp, o, calibration_path, library, DEFAULT_EVAL_DATA, base)
        _move_into_place(tmp, output_dir, o.overwrite)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            remove_own_temp(output_dir, TMP_MARK)
        _remove_empty(created)
        raise
    finally:
        restore_signals(previous)
    logger.info("export written to %s (target sparsity %.2f, effective %s)", output_dir, config.target_sparsity,
                f"{config.effective_sparsity:.3f}" if config.effective_sparsity is not None else "n/a")
    if o.push_to_hub:
        from .hub import push_to_hub as _push

        _push(output_dir, o.push_to_hub, token=hub_token, private=o.private)
    return output_dir


def _build(model_ref, tmp: Path, o: ExportOptions, calibration_path: Path, library: str | None, eval_data: Path,
           base: ExportBase) -> ActTailConfig:
    """Everything between the checks and the final rename, written into ``tmp`` (the graph by ``base``)."""
    from .model_card import write_model_card
    from .modeling import load_model

    with _stage("load model"):
        model, tokenizer = load_model(model_ref, dtype=o.dtype, device=o.device)
    sequence_length = check_context(o.sequence_length, getattr(model.config, "max_position_embeddings", None), model_ref)
    from .data import EXPORT_CALIBRATION_FLAGS, load_windows

    # the calibration windows, tokenized once for the 4-bit Hessians and the thresholds: a text too short for them
    # fails here, before any quantization, analysis or search
    windows = load_windows(tokenizer, calibration_path, sequence_length, samples=o.calibration_samples,
                           flags=EXPORT_CALIBRATION_FLAGS)
    # the texts the later stages read, checked now: the greedy search's windows, the validation's
    from .allocation import needs_search

    if needs_search(o.allocation, [o.sparsity], o.mode):
        from .greedy import search_windows

        search_windows(tokenizer, o.allocation, [o.sparsity], o.mode, calibration_path)
    validation = _validation_windows(model, tokenizer, calibration_path, eval_data) if o.validate else None
    quantized = None
    if o.int4 is not None:  # before analysis and calibration: thresholds are calibrated on the deployed weights
        from .int4_rewrite import input_hessians, quantize_model
        from .quantize import GPTQ_QUANTIZERS

        with _stage("4-bit quantization"):
            hessians = None
            if o.int4[1] in GPTQ_QUANTIZERS:  # GPTQ-style rounding: the dense model's inputs on the calibration text
                from .offload import input_device

                hessians = input_hessians(model, windows.to(input_device(model)), progress=o.progress)
            quantized = quantize_model(model, *o.int4, dtype=o.dtype, progress=o.progress, hessians=hessians)
            del hessians
    config = _budgets(model, tokenizer, model_ref, o, calibration_path, windows)
    config.versions = base.versions()
    base.build(model, tokenizer, tmp, config, o, quantized, library)
    config.save(tmp)  # the runtime loader checks the graph against this file
    if o.validate:
        _validate(model, tmp, config, o, validation, eval_data, base, quantized is not None)
    if config.effective_sparsity is None and o.mode == "topk":  # exact without measuring: k per token
        for p in config.projections:
            p.effective_sparsity = 1.0 - p.keep_k() / p.in_features
        config.effective_sparsity = sum(p.effective_sparsity * p.parameters for p in config.projections) / sum(
            p.parameters for p in config.projections)
    config.save(tmp)
    check_loadable(tmp)
    card = write_model_card(tmp, config, o.push_to_hub)
    base.finalize(card, o, o.push_to_hub)
    return config


def _budgets(model, tokenizer, model_ref, o: ExportOptions, calibration_path: Path, windows) -> ActTailConfig:
    """Alphas (when the allocation needs them) -> per-projection budgets -> thresholds / k calibrated on ``windows``
    (the export's calibration windows of ``calibration_path``)."""
    import torch

    from . import allocation as alloc
    from .calibration import calibrate
    from .spectral import analyze_model

    fits = None
    if alloc.needs_alphas(o.allocation, [o.sparsity], o.mode):  # uniform and teal-greedy budgets need no alphas
        with _stage("spectral analysis"):
            # on a GPU the Gram-matrix eigenvalues are ~5x faster than svdvals (docs/scale.md), same alphas
            fits = analyze_model(model, device=o.device, progress=o.progress,
                                 method="gram" if o.device == "cuda" else "svd")
    trajectories = None
    if alloc.needs_search(o.allocation, [o.sparsity], o.mode):
        from .greedy import search_for

        with _stage("greedy allocation search"), torch.no_grad():
            trajectories = search_for(model, tokenizer, o.allocation, [o.sparsity], o.mode, calibration_path, fits=fits,
                                      epsilon=o.epsilon, mapping=o.mapping, progress=o.progress)
    config = alloc.build_config(model, o.sparsity, allocation=o.allocation, mode=o.mode, epsilon=o.epsilon,
                                mapping=o.mapping, fits=fits, trajectories=trajectories)
    for p in config.projections if fits is not None else ():
        p.alpha_fallback = fits[p.name].fallback  # degenerate spectrum: where its alpha came from
    config.kernel = o.kernel
    config.model = str(model_ref)
    config.architecture = type(model).__name__
    config.weights, (config.block_size, config.quantizer) = ("int4", o.int4) if o.int4 else (o.dtype, (None, None))
    config.lm_head = o.head if o.int4 else None  # float exports: no key value (what older releases read)
    with _stage("calibration"), torch.no_grad():
        calibrate(model, tokenizer, config, windows=windows, source=str(calibration_path), progress=o.progress)
    return config


def _validation_windows(model, tokenizer, calibration_path: Path, eval_data: Path):
    """The validation's windows: ``VALIDATION_WINDOWS`` of ``VALIDATION_LENGTH`` tokens of WikiText-2's test split, or
    of the calibration text where that file is absent; a text too short fails with what the validation needs."""
    from .data import read_text, token_windows

    fallback = not Path(eval_data).is_file()
    text_source = calibration_path if fallback else eval_data
    context = getattr(model.config, "max_position_embeddings", None) or VALIDATION_LENGTH
    length = min(VALIDATION_LENGTH, context)
    text = read_text(text_source)  # an unreadable file fails with its own message
    try:
        return token_windows(tokenizer, text, length, samples=VALIDATION_WINDOWS)
    except ActTailError:
        if fallback:
            where, fix = f"the calibration text {text_source} ({eval_data} was not found)", "pass a longer --calibration-data, or --no-validate"
        else:
            where, fix = str(text_source), "restore that file (WikiText-2's test split), or pass --no-validate"
        raise ActTailError(f"the export's validation reads {VALIDATION_WINDOWS} windows of {length} tokens of {where}, "
                           f"which is shorter: {fix}") from None


def _validate(model, tmp: Path, config: ActTailConfig, o: ExportOptions, windows, eval_data: Path, base: ExportBase,
              int4: bool) -> None:
    """Export validation (:func:`validate_export`) on ``windows`` (:func:`_validation_windows`) and the export-time
    perplexity, recorded in ``config``."""
    with _stage("validation"):
        from .lm_head import emulated_head, head_of_folder

        # an 8-bit lm_head: PyTorch computes what the node computes on ONNX Runtime's CPU, where validation runs
        with emulated_head(model, head_of_folder(tmp) if config.lm_head == "int8" else None):
            report = validate_export(model, tmp, config, windows, o.dtype)
        if int4:
            from .int4_rewrite import check_int4_export

            config.perplexity["validation_int4_weight_rel_error"] = check_int4_export(model, tmp, config,
                                                                                      TOLERANCE[o.dtype])
    config.perplexity["validation"] = {
        "max_abs_logit_diff": report.max_abs_diff, "median_rel_error": report.median_rel_error,
        "top1_agreement": report.top1_agreement, "positions": report.positions,
        "forced_mask_rel_error": report.forced_rel_error, "projection_rel_error": report.projection_rel_error,
        "cached_step_rel_error": report.cached_step_rel_error, "tolerance": report.tolerance,
        "forced_top1_agreement": report.forced_top1_agreement, "forced_top1_floor": TOP1_FLOOR[o.dtype]}
    eval_tokens = o.eval_tokens
    if eval_tokens and Path(eval_data).is_file():
        from .runtime import perplexity_onnx

        length = min(EVAL_LENGTH, eval_tokens, getattr(model.config, "max_position_embeddings", None) or EVAL_LENGTH)
        length = min(length, base.max_eval_length(tmp) or length)
        with _stage("export-time perplexity"):
            config.perplexity.update(perplexity_onnx(tmp, eval_data, sequence_length=length, max_tokens=eval_tokens,
                                                     progress=o.progress))
    elif eval_tokens:
        logger.warning("%s not found: the model card will not report a perplexity", eval_data)
        config.perplexity["skipped"] = f"the evaluation text {eval_data} was not found"
    else:
        config.perplexity["skipped"] = "not requested: eval_tokens=0"
