"""Probe (docs/allocation.md section 6l): TEAL's greedy search with the block error measured where the next block reads
the output, after its RMSNorm, instead of on the raw residual stream.

TEAL's objective is the L2 distance of a block's output to the dense output. The next block reads that output only
through ``input_layernorm`` (RMSNorm times its weight; the last block: the model's final norm), which divides every token
by its own RMS and weights the channels, so an error in a token with a large residual norm, or in a channel the norm
weight shrinks, matters less downstream than its raw L2 size says. ``--objective next-norm`` measures
``||norm(out) − norm(dense out)||`` per token instead (the rest of the search unchanged: TEAL's rule, the default's
settings in top-k mode, ``greedy.TEAL_SEARCH``); both searches run here, and TEAL-greedy's budgets from each are
evaluated on the first ``--max-tokens`` validation tokens in windows of 1024::

    nice -n 5 .venv/bin/python benchmarks/greedy_objective_probe.py --data DATA/wiki.valid.raw --levels 0.4 \
        --output docs/results/allocation/greedy_objective_probe_valid_40.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from acttail_export import greedy
from acttail_export.allocation import build_config
from acttail_export.data import load_windows
from acttail_export.evaluation import perplexity_windows
from acttail_export.modeling import default_model_path, load_model


def next_norm_objective(model) -> None:
    """Make the search's per-token distance that of the next block's normalized input (wraps ``_Shard.output``: the
    block output as the search computes and memoizes it, the distance taken after the next norm)."""
    layers = model.model.layers
    post = {id(layer): (layers[i + 1].input_layernorm if i + 1 < len(layers) else model.model.norm)
            for i, layer in enumerate(layers)}
    original = greedy._Shard.output

    def output(self, keys):
        norm = post[id(self.search.layer)]
        if not hasattr(self, "normed_target"):
            self.normed_target = norm(self.target)
        out = original(self, keys)[0]
        return out, (norm(out) - self.normed_target).double().norm(dim=-1)

    greedy._Shard.output = output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="WikiText-2 wiki.valid.raw (search and evaluation)")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.4])
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(default_model_path())
    settings = greedy.default_settings("teal-greedy", "topk")
    calib = load_windows(tokenizer, args.data, settings.sequence_length, samples=settings.samples)
    windows = load_windows(tokenizer, args.data, 1024, max_tokens=args.max_tokens)
    rows = []
    for objective in ("l2", "next-norm"):
        if objective == "next-norm":
            next_norm_objective(model)
        start = time.perf_counter()
        trajectories = greedy.search(model, calib, max(args.levels), settings, cache_dir=False, progress=True)
        seconds = time.perf_counter() - start
        for level in args.levels:
            config = build_config(model, level, "teal-greedy", "topk", trajectories=trajectories)
            result = perplexity_windows(model, windows, config, "topk", progress=False)
            rows.append({"objective": objective, "level": level, "perplexity": result["perplexity"],
                         "search_seconds": round(seconds, 1),
                         "budgets": {p.name: p.sparsity for p in config.projections}})
            print(f"{objective} {level:.2f}: perplexity {result['perplexity']:.3f} (search {seconds:.0f} s)", flush=True)
    out = {"settings": settings.key(), "tokens": int(windows.numel()), "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
