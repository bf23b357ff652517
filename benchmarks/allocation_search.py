"""Search the alpha→sparsity mapping: top-k perplexity of SmolLM2-135M for (mapping, ε, sparsity).

Hyperparameters are chosen on WikiText-2 *validation*; the chosen one is then confirmed on *test*:

    # validation sweep (8k tokens = 8 windows of 1024; resumable: finished rows are skipped)
    .venv/bin/python benchmarks/allocation_search.py --split valid --max-tokens 8192 \\
        --sparsity 0.8 --mapping uniform linear linear-rev block-rev --epsilon 0.3 0.6 \\
        --output docs/results/allocation_search_valid.json
    # confirmation on test (16k tokens)
    .venv/bin/python benchmarks/allocation_search.py --split test --max-tokens 16384 \\
        --sparsity 0.5 0.6 0.7 0.8 0.9 --mapping uniform group-sched-rev-abs --epsilon 0.1 \\
        --output docs/results/allocation_confirm_test_16k.json

    # markdown table of a results file (rows: mapping, ε; columns: sparsity; % change vs uniform)
    .venv/bin/python benchmarks/allocation_search.py --table docs/results/allocation_search_valid_4k.json

    # sensitivity probe: uniform except one projection kind kept at twice the channels (others
    # raised to keep the weighted mean); mapping names "probe:<kind>"
    .venv/bin/python benchmarks/allocation_search.py --split valid --max-tokens 4096 --sparsity 0.8 \\
        --mapping probe:q_proj probe:v_proj probe:up_proj --output docs/results/allocation_search_valid_4k.json

    # finer probe: uniform except the named kinds' sparsity moved by delta (the others shifted by the
    # opposite parameter-weighted amount); mapping names "move:<kind>[+<kind>...]@<delta>"
    .venv/bin/python benchmarks/allocation_search.py --split valid --max-tokens 8192 --sparsity 0.5 \\
        --mapping move:o_proj@0.1 move:gate_proj+up_proj@-0.1 --output docs/results/allocation_search_valid_8k.json

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

from acttail_export import _research_mappings, allocation  # noqa: E402
from acttail_export.config import PROJECTION_KINDS, topk_keep  # noqa: E402
from acttail_export.data import DEFAULT_TEXT_DIR, load_windows  # noqa: E402
from acttail_export.evaluation import perplexity_windows  # noqa: E402
from acttail_export.modeling import default_model_path, load_model  # noqa: E402
from acttail_export.spectral import PowerLawFit, analyze_model  # noqa: E402

_research_mappings.enable()  # the whole sweep space, not only allocation.MAPPINGS
WIKITEXT = DEFAULT_TEXT_DIR  # $ACTTAIL_WIKITEXT_DIR (wiki.valid.raw, wiki.test.raw)
FITS_CACHE = Path.home() / ".cache" / "acttail-export" / "allocation_search_fits.json"


def load_fits(model, model_ref: str) -> dict[str, PowerLawFit]:
    """HT-SR fits, cached under ~/.cache/acttail-export between runs of this script (keyed by the model reference)."""
    if FITS_CACHE.is_file():
        cached = json.loads(FITS_CACHE.read_text())
        if cached.get("model") == model_ref:
            return {name: PowerLawFit(**fit) for name, fit in cached["fits"].items()}
    fits = analyze_model(model, progress=False)
    FITS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    FITS_CACHE.write_text(json.dumps({"model": model_ref, "fits": {n: f.to_dict() for n, f in fits.items()}}))
    return fits


def row_key(row: dict) -> tuple:
    return (row["split"], row["tokens"], row["sequence_length"], row["mapping"], row["epsilon"], row["sparsity"])


def print_table(path: Path) -> None:
    """Markdown table: perplexity per (mapping, ε) and sparsity, with the change vs uniform."""
    rows = json.loads(path.read_text())["results"]
    for tokens in sorted({r["tokens"] for r in rows}):
        subset = [r for r in rows if r["tokens"] == tokens]
        sparsities = sorted({r["sparsity"] for r in subset if r["mapping"] != "dense"})
        uniform = {r["sparsity"]: r["perplexity"] for r in subset if r["mapping"] == "uniform"}
        dense = [r["perplexity"] for r in subset if r["mapping"] == "dense"]
        print(f"\n{subset[0]['split']}, {tokens} tokens, windows of {subset[0]['sequence_length']}"
              + (f", dense {dense[0]:.2f}" if dense else ""))
        print("| mapping | ε | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
        print("|---|---|" + "---|" * len(sparsities))
        keys = sorted({(r["mapping"], r["epsilon"]) for r in subset if r["mapping"] not in ("dense",)},
                      key=lambda k: (k[0] != "uniform", k[0], k[1]))
        for mapping, eps in keys:
            cells = []
            for s in sparsities:
                hit = [r for r in subset if (r["mapping"], r["epsilon"], r["sparsity"]) == (mapping, eps, s)]
                if not hit:
                    cells.append("")
                    continue
                ppl = hit[-1]["perplexity"]
                change = f" ({(ppl / uniform[s] - 1):+.0%})" if mapping != "uniform" and s in uniform else ""
                cells.append(f"{ppl:.4g}{change}")
            eps_cell = "" if mapping == "uniform" or mapping.startswith(("probe:", "move:")) else f"{eps:g}"
            print(f"| {mapping} | {eps_cell} | " + " | ".join(cells) + " |")


def probe_config(model, sparsity: float, kind: str):
    """Uniform budgets except ``kind``, whose kept fraction is doubled; the rest share the remaining budget."""
    config = allocation.build_config(model, sparsity, allocation="uniform", mode="topk")
    if kind not in PROJECTION_KINDS:
        raise SystemExit(f"unknown kind in probe:{kind}")
    total = sum(p.parameters for p in config.projections)
    probed = sum(p.parameters for p in config.projections if p.kind == kind)
    low = max(0.0, 1.0 - 2.0 * (1.0 - sparsity))
    high = (sparsity * total - low * probed) / (total - probed)
    for p in config.projections:
        p.sparsity = low if p.kind == kind else high
        p.k = topk_keep(p.sparsity, p.in_features)
    return config


def move_config(model, sparsity: float, spec: str):
    """Uniform budgets except the projection kinds in ``spec`` = ``<kind>[+<kind>…]@<delta>`` (e.g.
    ``gate_proj+up_proj@-0.1``), whose sparsity is moved by delta; the others share the opposite
    parameter-weighted shift so the mean stays exact. Mapping name ``move:<spec>``: a sensitivity probe."""
    config = allocation.build_config(model, sparsity, allocation="uniform", mode="topk")
    kinds, delta = spec.split("@")
    kinds = kinds.split("+")
    if not set(kinds) <= set(PROJECTION_KINDS):
        raise SystemExit(f"unknown kind in move:{spec}")
    total = sum(p.parameters for p in config.projections)
    moved = sum(p.parameters for p in config.projections if p.kind in kinds)
    rest = sparsity - float(delta) * moved / (total - moved)
    for p in config.projections:
        p.sparsity = sparsity + float(delta) if p.kind in kinds else rest
        if not 0.0 <= p.sparsity < 1.0:
            raise SystemExit(f"move:{spec} gives budget {p.sparsity} outside [0, 1)")
        p.k = topk_keep(p.sparsity, p.in_features)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M GGUF")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--sequence-length", type=int, default=1024)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.8])
    parser.add_argument("--mapping", nargs="+", default=["uniform", allocation.DEFAULT_MAPPING],
                        help="uniform, probe:<kind>, move:<kinds>@<delta>, or a mapping of "
                             "acttail_export._research_mappings.ALL_MAPPINGS")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[allocation.DEFAULT_EPSILON])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=None, help="results JSON (appended to, resumable)")
    parser.add_argument("--table", type=Path, default=None, help="print a markdown table of this results file and exit")
    args = parser.parse_args()
    if args.table:
        print_table(args.table)
        return
    if args.output is None:
        parser.error("--output is required (or --table)")
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
            for epsilon in ([0.0] if mapping == "uniform" or mapping.startswith(("probe:", "move:")) else args.epsilon):
                row = {"split": args.split, "tokens": tokens, "sequence_length": args.sequence_length,
                       "mapping": mapping, "epsilon": epsilon, "sparsity": sparsity}
                if row_key(row) in done:
                    continue
                if mapping == "uniform":
                    config = allocation.build_config(model, sparsity, allocation="uniform", mode="topk")
                elif mapping.startswith("probe:"):
                    config = probe_config(model, sparsity, mapping.split(":", 1)[1])
                elif mapping.startswith("move:"):
                    config = move_config(model, sparsity, mapping.split(":", 1)[1])
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
