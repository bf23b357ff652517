"""``acttail-export export`` (and ``optimum-cli export acttail``): one argument definition for both."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..bases import BASES
from ..errors import ActTailError

if TYPE_CHECKING:
    from ..options import ExportOptions

logger = logging.getLogger(__name__)

HELP = "Export a LLaMA/Mistral model with ActTail activation sparsity to ONNX (KV cache)"


def add_export_arguments(parser: argparse.ArgumentParser, default_base: str = "genai") -> None:
    """Define the export flags on ``parser`` (shared by acttail-export and optimum-cli, whose environment is the
    optimum extra's: there ``default_base="optimum"``)."""
    from ..allocation import MAPPINGS  # the --mapping help lists the supported mappings
    from ..config import ALLOCATIONS

    required = parser.add_argument_group("Required arguments")
    required.add_argument("-m", "--model", default=None,
                          help="HF model folder, .gguf file, Hub id, or 'smollm2' for the bundled SmolLM2-135M-Instruct")
    required.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="folder to write the export to (created)")

    sparsity = parser.add_argument_group("Sparsity")
    sparsity.add_argument("--sparsity", default="0.5", help="target parameter-weighted activation sparsity in [0, 1) (default 0.5)")
    sparsity.add_argument("--allocation", choices=ALLOCATIONS, default="acttail",
                          help="per-projection budgets: acttail (the default: the best method per level and mode on "
                               "validation; top-k: TEAL's greedy search up to 65 %%, water-filled block levels up to 85 %%, "
                               "HT-SR above; threshold: HT-SR up to 45 %%, the greedy search up to 65 %%, HT-SR block "
                               "targets with it above; docs/allocation.md), htsr (from the HT-SR alphas), teal-greedy, "
                               "acttail-greedy, waterfill-greedy, uniform")
    sparsity.add_argument("--mode", choices=("topk", "threshold"), default=None,
                          help="keep the k largest |x| per token (topk) or |x| above a threshold calibrated on the "
                               "calibration text (default: threshold up to 65 %% sparsity, topk above: the lower "
                               "validation perplexity at the level, and on a GPU threshold decodes faster; docs/export.md)")
    sparsity.add_argument("--kernel", choices=("mask", "fused"), default=None,
                          help="standard ONNX masking ops (mask; the default for float weights) or the com.acttail custom ops "
                               "(fused; the default for --weights int4; the library ships in the wheel, `make ops` in a checkout)")
    sparsity.add_argument("--epsilon", default=None, help="allocation spread in [0, 1) (default: the allocation's)")
    sparsity.add_argument("--mapping", default=None,
                          help=f"alpha-to-budget mapping: {', '.join(MAPPINGS)} (default: the allocation's)")

    calib = parser.add_argument_group("Calibration")
    calib.add_argument("--calibration-data", type=Path, default=None, metavar="FILE",
                       help="UTF-8 text file (default: WikiText-2 wiki.valid.raw)")
    calib.add_argument("--calibration-samples", default="64", help="number of token windows (default 64)")
    calib.add_argument("--sequence-length", default=None,
                       help="tokens per calibration window (default 512, or the model's context when shorter)")

    run = parser.add_argument_group("Export")
    run.add_argument("--base", choices=tuple(BASES), default=default_base,
                     help=f"(default {default_base}) graph to rewrite: onnxruntime-genai's model builder graph (genai; the fast decode "
                          "base, loads with onnxruntime_genai.Model(OUTPUT_DIR); --device selects the builder's cpu/cuda "
                          "provider) or optimum-onnx's trace (optimum; loads with ORTModelForCausalLM; needs the optimum "
                          "extra: pip install 'acttail-export[optimum]', which pins transformers 4.57)")
    run.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and activations of the ONNX graph")
    run.add_argument("--weights", default=None, metavar="{fp32,fp16,int4}",
                     help="projection weights: the --dtype (default) or int4 (4-bit blocks along the input dimension; "
                          "fused kernel: com.acttail::SparseMatMulNBits, mask kernel / dense: com.microsoft::MatMulNBits)")
    run.add_argument("--block-size", default=None, metavar="{32,64,128}", help="int4: input channels per scale/offset (default 32)")
    run.add_argument("--quantizer", default=None, metavar="{rtn,mse,gptq,gptq-mse,gptq-act,gptq-mse-act}",
                     help="int4: round to nearest on the block range (rtn), MSE-searched range + least-squares refit (mse, "
                          "data-free), or GPTQ-style rounding with either rule, its errors spread by the input Hessian of "
                          "the calibration text (gptq, gptq-mse; in act-order with static groups: gptq-act, "
                          "gptq-mse-act, the default)")
    run.add_argument("--lm-head", default=None, metavar="{float,int8}",
                     help="int4: the lm_head as float or 8-bit MatMulNBits with int8 activations (default: int8 for "
                          "--device cpu, float for cuda)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for analysis, calibration and tracing")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    run.add_argument("--no-validate", action="store_true",
                     help="skip the ONNX Runtime vs PyTorch check and the export-time perplexity")

    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the finished export to this Hub repo")
    hub.add_argument("--private", action="store_true", help="create the Hub repo as private")
    hub.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")


def _number(value: str, what: str, cast):
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ActTailError(f"--{what} must be {'a number' if cast is float else 'an integer'}, got {value!r}") from None


def export_options(args: argparse.Namespace) -> ExportOptions:
    """The :class:`~acttail_export.options.ExportOptions` of parsed flags (numbers parsed here, checked there)."""
    from ..options import ExportOptions

    if not args.model:
        raise ActTailError("no model given: pass --model PATH_OR_HUB_ID (or --model smollm2)")
    sparsity = _number(args.sparsity, "sparsity", float)
    epsilon = None if args.epsilon is None else _number(args.epsilon, "epsilon", float)
    samples = _number(args.calibration_samples, "calibration-samples", int)
    length = None if args.sequence_length is None else _number(args.sequence_length, "sequence-length", int)
    block_size = None if args.block_size is None else _number(args.block_size, "block-size", int)
    return ExportOptions(sparsity=sparsity, allocation=args.allocation, mode=args.mode, kernel=args.kernel,
                         epsilon=epsilon, mapping=args.mapping, calibration_data=args.calibration_data,
                         calibration_samples=samples, sequence_length=length, dtype=args.dtype, device=args.device,
                         overwrite=args.overwrite, push_to_hub=args.push_to_hub, private=args.private, token=args.token,
                         validate=not args.no_validate, progress=sys.stderr.isatty(), base=args.base,
                         weights=args.weights, block_size=block_size, quantizer=args.quantizer, lm_head=args.lm_head)


def run(args: argparse.Namespace) -> None:
    """Run the export (heavy imports happen here)."""
    from ..exporter import export

    options = export_options(args)
    out = export(args.model, args.output, options)
    print(f"ActTail export written to {out}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help=HELP, description=HELP)
    add_export_arguments(parser)
    parser.set_defaults(func=run)
