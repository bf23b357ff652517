"""Perplexity of SmolLM2-135M on WikiText-2 test: dense, uniform and the HT-SR allocation at 50% and 80% (top-k).

    .venv/bin/python examples/evaluate_uniform_vs_acttail.py [--max-tokens 8192]

Same as ``acttail-export evaluate --sparsity 0 0.5 0.8 --allocation uniform htsr
--mode topk --max-tokens 8192`` (``--allocation acttail``, the default, runs TEAL's greedy search at 50 % and the
combination at 80 %: see docs/allocation.md section 6c).
"""

import argparse

from acttail_export import allocation, spectral
from acttail_export.data import DEFAULT_EVAL_DATA
from acttail_export.evaluation import perplexity
from acttail_export.modeling import default_model_path, load_model

parser = argparse.ArgumentParser()
parser.add_argument("--max-tokens", type=int, default=8192)
args = parser.parse_args()

model, tokenizer = load_model(default_model_path())
fits = spectral.analyze_model(model)  # alphas once, shared by every configuration
print(f"dense: {perplexity(model, tokenizer, DEFAULT_EVAL_DATA, 1024, args.max_tokens)['perplexity']:.2f}")
for sparsity in (0.5, 0.8):
    for name in ("uniform", "htsr"):
        config = allocation.build_config(model, sparsity, allocation=name, mode="topk", fits=fits)
        result = perplexity(model, tokenizer, DEFAULT_EVAL_DATA, 1024, args.max_tokens, config=config)
        print(f"{name} {sparsity:.0%}: {result['perplexity']:.2f} (effective sparsity {result['effective_sparsity']:.3f})")
