"""4-bit quantizer study: SmolLM2-135M perplexity on WikiText-2 validation text, PyTorch, dense and ActTail 50 %.

Compares the float weights (the dequantized GGUF) with 4-bit ``rtn`` and ``mse`` (:mod:`acttail_export.quantize`) at
blocks of 32 / 64 / 128 input channels, all on the same token windows; then ActTail threshold sparsity (50 %,
acttail allocation, calibrated on the quantized model) on top of the float weights and of both quantizers at
``--sparse-block``. The text is split at an article boundary: the first half is evaluated (``--tokens``), the
second half calibrates the thresholds. Writes ``docs/results/quantization/quantizer_study.json``::

    python benchmarks/quantizer_study.py --data PATH/wikitext-2/wiki.valid.raw

``--quantizers`` / ``--blocks`` pick rows; ``gptq`` and ``gptq-mse`` are :func:`acttail_export.quantize.quantize_gptq`
with rtn / mse block ranges, its Hessians ``Σ x xᵀ`` collected once per projection from the float model on the
calibration half (``--hessian-samples`` windows, default ``--calibration-samples``; one pass over the float model,
or ``--sequential``: layer by layer through the already quantized layers,
:func:`acttail_export.int4_rewrite.quantize_model_sequential`); ``gptq-act`` / ``gptq-mse-act`` process the input
channels in act-order (static groups). ``--damp`` and ``--refit`` are :func:`~acttail_export.quantize.quantize_gptq`'s
options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "docs" / "results" / "quantization" / "quantizer_study.json"

logger = logging.getLogger("quantizer_study")


def _split(text_path: Path, folder: Path) -> tuple[Path, Path]:
    """(evaluation half, calibration half) of the text, cut at an article boundary (`` = Title =`` line)."""
    text = text_path.read_text(encoding="utf-8")
    cut = text.index("\n = ", len(text) // 2)
    evaluation, calibration = folder / "eval.txt", folder / "calib.txt"
    evaluation.write_text(text[:cut])
    calibration.write_text(text[cut:])
    return evaluation, calibration


def _gptq(model, tokenizer, calibration: Path, quantizer: str, block: int, args) -> None:
    """GPTQ-style quantization of ``model`` in place with ``Σ x xᵀ`` (float64) of every projection's input over the
    calibration windows: from the float model (one sum per shared input: q/k/v, gate/up) or, ``--sequential``,
    layer by layer from the already quantized model."""
    import torch

    from acttail_export.data import load_windows
    from acttail_export.int4_rewrite import input_hessians, quantize_model, quantize_model_sequential

    windows = load_windows(tokenizer, calibration, args.sequence_length,
                           samples=args.hessian_samples or args.calibration_samples)
    options = {"damp": args.damp, "refit": args.refit}
    if args.sequential:
        quantize_model_sequential(model, windows, block, quantizer, hessian_dtype=torch.float64, **options)
    else:
        quantize_model(model, block, quantizer, hessians=input_hessians(model, windows, dtype=torch.float64), **options)


def _measure(args, evaluation: Path, calibration: Path, quantizer: str | None, block: int | None, sparsity: float) -> dict:
    """Perplexity of one configuration (fresh model: quantization works in place)."""
    import torch

    from acttail_export import allocation
    from acttail_export.calibration import calibrate
    from acttail_export.evaluation import perplexity
    from acttail_export.int4_rewrite import quantize_model
    from acttail_export.modeling import default_model_path, load_model
    from acttail_export.quantize import GPTQ_QUANTIZERS
    from acttail_export.spectral import analyze_model

    model, tokenizer = load_model(default_model_path())
    start = time.perf_counter()
    if quantizer in GPTQ_QUANTIZERS:  # gptq / gptq-mse: quantize_gptq with the calibration text's input Hessians
        _gptq(model, tokenizer, calibration, quantizer, block, args)
    elif quantizer is not None:
        quantize_model(model, block, quantizer)
    seconds_quantize = time.perf_counter() - start
    config = None
    if sparsity:
        fits = analyze_model(model, progress=False)
        config = allocation.build_config(model, sparsity, allocation="htsr", mode="threshold", fits=fits)
        with torch.no_grad():
            calibrate(model, tokenizer, config, data=calibration, samples=args.calibration_samples,
                      sequence_length=args.sequence_length, progress=False)
    result = perplexity(model, tokenizer, evaluation, sequence_length=args.sequence_length, max_tokens=args.tokens,
                        config=config, mode="threshold" if config else None, progress=False)
    row = {"weights": "float" if quantizer is None else "int4", "quantizer": quantizer, "block_size": block,
           "gptq": _gptq_options(args) if quantizer in GPTQ_QUANTIZERS else None, "sparsity": sparsity,
           "perplexity": result["perplexity"], "tokens": result["tokens"],
           "effective_sparsity": result.get("effective_sparsity"), "quantize_seconds": round(seconds_quantize, 1)}
    logger.info("%s", row)
    return row


def main() -> None:
    from acttail_export.quantize import WEIGHT_QUANTIZERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="WikiText-2 wiki.valid.raw")
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--sparse-block", type=int, default=None, help="block of the sparse runs (default: from the table)")
    parser.add_argument("--quantizers", nargs="+", default=["rtn", "mse"], choices=WEIGHT_QUANTIZERS)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128], choices=(32, 64, 128))
    parser.add_argument("--sequential", action="store_true", help="GPTQ Hessians layer by layer from the quantized model")
    parser.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, times the mean of diag(H) (default 0.01)")
    parser.add_argument("--refit", action="store_true", help="GPTQ: least-squares refit of scales/offsets under H")
    parser.add_argument("--hessian-samples", type=int, default=None,
                        help="calibration windows of the GPTQ Hessians (default: --calibration-samples)")
    parser.add_argument("--output", type=Path, default=OUT)
    parser.add_argument("--render", action="store_true", help="only print the markdown table of --output")
    args = parser.parse_args()
    if args.render:
        print("\n".join(table(json.loads(args.output.read_text())["results"])))
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.data is None:
        parser.error("--data PATH/wiki.valid.raw is required (unless --render)")
    import torch

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        evaluation, calibration = _split(args.data, Path(tmp))
        rows.append(_measure(args, evaluation, calibration, None, None, 0.0))
        for block in args.blocks:
            for quantizer in args.quantizers:
                rows.append(_measure(args, evaluation, calibration, quantizer, block, 0.0))
        # the sparse runs at the block where the quantizers differ most (block 32 reproduces the GGUF exactly)
        block = args.sparse_block or max((128, 64), key=lambda b: _ppl(rows, "rtn", b) - _ppl(rows, "mse", b))
        rows.append(_measure(args, evaluation, calibration, None, None, 0.5))
        for quantizer in args.quantizers:
            rows.append(_measure(args, evaluation, calibration, quantizer, block, 0.5))
    argv = [a for a in sys.argv[1:] if a not in ("--data", str(args.data))]  # no machine paths in the record
    command = "python benchmarks/quantizer_study.py " + " ".join(shlex.quote(a) for a in argv + ["--data", "PATH/wiki.valid.raw"])
    meta = {"command": command, "data": args.data.name, "evaluated": "first half of the file (cut at an article)",
            "calibrated_on": "second half", "seconds": round(time.perf_counter() - start, 1),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "torch": torch.__version__}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"results": rows, "meta": meta}, indent=2) + "\n")
    logger.info("wrote %s in %.0f s", args.output, meta["seconds"])


def _gptq_options(args) -> dict:
    return {"sequential": args.sequential, "damp": args.damp, "refit": args.refit,
            "hessian_samples": args.hessian_samples or args.calibration_samples}


def _ppl(rows: list[dict], quantizer: str, block: int) -> float:
    return next(r["perplexity"] for r in rows if r["quantizer"] == quantizer and r["block_size"] == block and not r["sparsity"])


def _label(row: dict) -> str:
    """The quantizer, with the GPTQ options that differ from the defaults (rows of older JSON have none)."""
    if row["quantizer"] is None:
        return "–"
    g = row.get("gptq") or {}
    notes = (["layer by layer"] if g.get("sequential") else []) + (["refit"] if g.get("refit") else [])
    notes += [f"damp {g['damp']}"] if g.get("damp", 0.01) != 0.01 else []
    notes += [f"{g['hessian_samples']} Hessian windows"] if g.get("hessian_samples", 16) != 16 else []
    return row["quantizer"] + (f" ({', '.join(notes)})" if notes else "")


def table(rows: list[dict]) -> list[str]:
    """Markdown table: perplexity (and its ratio to the float weights) per weights / quantizer / block / sparsity."""
    base = {r["sparsity"]: r["perplexity"] for r in rows if r["weights"] == "float"}
    out = ["| weights | quantizer | block | ActTail threshold sparsity | perplexity | × float |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        eff = f" ({r['effective_sparsity']:.3f} eff.)" if r["sparsity"] else ""
        out.append(f"| {r['weights']} | {_label(r)} | {r['block_size'] or '–'} | {r['sparsity']:.0%}{eff} | "
                   f"{r['perplexity']:.3f} | {r['perplexity'] / base[r['sparsity']]:.3f} |")
    return out


if __name__ == "__main__":
    main()
