"""``acttail-export generate``: continue a prompt with an export folder, streaming the text as it comes.

Runs the folder with ``onnxruntime_genai.Model`` when it has ``genai_config.json`` and ``onnxruntime_genai``
imports, else with ONNX Runtime (CPU, or CUDA with ``--device cuda``) through the project's loader, with the
KV cache (one token per step after the prompt). The text goes to stdout as it is generated; one line of
statistics goes to stderr at the end: ``N tokens in S s, X tokens/s (decode), prompt P tokens``.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ActTailError
from ._values import finite_float


def register(subparsers) -> None:
    from ..generation import DEFAULT_MAX_NEW_TOKENS

    parser = subparsers.add_parser("generate", help="generate text from an export folder (streamed, with tokens/s)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, metavar="EXPORT_DIR", help="an acttail-export output folder")
    parser.add_argument("--prompt", required=True, help="text to continue (or, with --chat, the user message)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message through the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", default=str(DEFAULT_MAX_NEW_TOKENS), metavar="N",
                        help=f"stop after N new tokens, or earlier at EOS (default: {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="execution provider (default: cpu)")
    parser.add_argument("--temperature", default="0", help="0 = greedy (the default); > 0 samples from softmax(logits / T)")
    parser.add_argument("--seed", default=None, help="random seed for sampling")
    parser.set_defaults(func=run)


def _int(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ActTailError(f"{flag} must be an integer, got {value!r}") from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> None:
    from ..generation import check_request, generate

    max_new_tokens = _int(args.max_new_tokens, "--max-new-tokens")
    temperature = finite_float(args.temperature, "--temperature")
    seed = _int(args.seed, "--seed")
    check_request(args.prompt, max_new_tokens, args.device, temperature)  # before loading anything
    result = generate(args.model, args.prompt, max_new_tokens, device=args.device, temperature=temperature, seed=seed,
                      stream=_write, chat=args.chat)
    _write("\n")
    print(result.stats_line(), file=sys.stderr)
