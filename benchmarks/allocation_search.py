"""Search the alpha→sparsity mapping: top-k perplexity of SmolLM2-135M for (mapping, ε, sparsity).

Hyperparameters are chosen on WikiText-2 *validation*; the chosen one is then confirmed on *test*:

    # validation sweep (8k tokens = 8 windows of 1024; resumable: finished rows are skipped)
    .venv/bin/python benchmarks/allocation_search.py --split valid --max-tokens 8192 \\
        --sparsity 0.8 --mapping uniform linear linear-rev block-rev --epsilon 0.3 0.6 \\
        --output docs/results/allocation_search_valid.json
    # confirmation on test (16k tokens)
    .venv/bin/python benchmarks/allocation_search.py --split test --max-tokens 16384 \\
        --sparsity 0.5 0.6 0.7 0.8 0.9 --mapping uniform type-block-rev --epsilon 0.5 \\
        --output docs/results/allocation_confirm_test.json

``uniform`` in ``--mapping`` means the uniform allocation (ε ignored). Rows are appended to the
JSON file as they finish, so an interrupted sweep can be continued with the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acttail_export import allocation  # noqa: E402
from acttail_export.data import load_windows  # noqa: E402
from acttail_export.evaluation import perplexity_windows  # noqa: E402
from acttail_export.modeling import default_model_path, load_model  # noqa: E402
from acttail_export.spectral import PowerLawFit, analyze_model  # noqa: E402

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
FITS_CACHE = Path("/tmp/acttail_allocation_search_fits.json")


def load_fits(model, model_ref: str) -> dict[str, PowerLawFit]:
    """HT-SR fits, cached in /tmp between runs of this script (keyed by the model reference)."""
    if FITS_CACHE.is_file():
        cached = json.loads(FITS_CACHE.read_text())
        if cached.get("model") == model_ref:
            return {name: PowerLawFit(**fit) for name, fit in cached["fits"].items()}
    fits = analyze_model(model, progress=False)
    FITS_CACHE.write_text(json.dumps({"model": model_ref, "fits": {n: f.to_dict() for n, f in fits.items()}}))
    return fits


def row_key(row: dict) -> tuple:
    return (row["split"], row["tokens"], row["sequence_length"], row["mapping"], row["epsilon"], row["sparsity"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M GGUF")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--sequence-length", type=int, default=1024)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.8])
    parser.add_argument("--mapping", nargs="+", default=["uniform", allocation.DEFAULT_MAPPING])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[allocation.DEFAULT_EPSILON])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    model_ref = args.model or default_model_path()
    model, tokenizer = load_model(model_ref)
    fits = load_fits(model, model_ref)
    windows = load_windows(tokenizer, WIKITEXT / f"wiki.{args.split}.raw", args.sequence_length, max_tokens=args.max_tokens)
    tokens = int(windows.numel())

    rows: list[dict] = json.loads(args.output.read_text())["results"] if args.output.is_file() else []
    done = {row_key(r) for r in rows}

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": Path(model_ref).name, "split": args.split, "mode": "topk", "command": " ".join(sys.argv)}
        args.output.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")

    if ("dense" not in [r["mapping"] for r in rows if r["tokens"] == tokens and r["split"] == args.split]):
        start = time.perf_counter()
        result = perplexity_windows(model, windows, None, progress=False)
        rows.append({"split": args.split, "tokens": tokens, "sequence_length": args.sequence_length, "mapping": "dense",
                     "epsilon": 0.0, "sparsity": 0.0, "perplexity": result["perplexity"], "seconds": round(time.perf_counter() - start, 1)})
        print(f"dense: {result['perplexity']:.3f}", flush=True)
        save()

    for sparsity in args.sparsity:
        for mapping in args.mapping:
            for epsilon in ([0.0] if mapping == "uniform" else args.epsilon):
                row = {"split": args.split, "tokens": tokens, "sequence_length": args.sequence_length,
                       "mapping": mapping, "epsilon": epsilon, "sparsity": sparsity}
                if row_key(row) in done:
                    continue
                if mapping == "uniform":
                    config = allocation.build_config(model, sparsity, allocation="uniform", mode="topk")
                else:
                    config = allocation.build_config(model, sparsity, mode="topk", epsilon=epsilon, mapping=mapping, fits=fits)
                start = time.perf_counter()
                result = perplexity_windows(model, windows, config, mode="topk", progress=False)
                budgets = [p.sparsity for p in config.projections]
                row.update(perplexity=result["perplexity"], effective_sparsity=result["effective_sparsity"],
                           budget_min=min(budgets), budget_max=max(budgets), seconds=round(time.perf_counter() - start, 1))
                rows.append(row)
                done.add(row_key(row))
                save()
                print(f"{mapping:>16} eps={epsilon:.2f} s={sparsity:.2f}: ppl {result['perplexity']:.3f} "
                      f"(eff {result['effective_sparsity']:.4f}, budgets {min(budgets):.3f}..{max(budgets):.3f}, {row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
