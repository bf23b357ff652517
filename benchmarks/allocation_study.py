"""Allocation study: uniform / htsr / teal-greedy / acttail-greedy / acttail, top-k, PyTorch reference (SmolLM2-135M).

``acttail`` is the project's default, a method per level (``config.DEFAULT_POLICY["topk"]``); its rows record the method
(``allocation_method``). Files written before that default existed (no ``meta.allocation_names``) used ``acttail``
for the HT-SR allocation, now ``htsr``: ``--table`` labels their rows ``htsr``.

The greedy searches run on calibration text (``--calibration``: WikiText-2 validation) and are cached
(``greedy.default_cache_dir()``); choices are made on ``--split valid``, the test split is read once for the
final table. Rows are appended to ``--output`` as they finish (an interrupted run continues with the same
command; finished rows are skipped)::

    nice -n 10 .venv/bin/python benchmarks/allocation_study.py --data DATA/wiki.valid.raw --split valid \\
        --calibration DATA/wiki.valid.raw --max-tokens 2048 --levels 0.5 0.7 \\
        --methods acttail-greedy:block-abs acttail-greedy:block-rev-abs --output docs/results/allocation/study_valid.json
    nice -n 10 .venv/bin/python benchmarks/allocation_study.py --data DATA/wiki.test.raw --split test \\
        --calibration DATA/wiki.valid.raw --max-tokens 16384 --levels 0.4 0.5 0.6 0.7 0.8 0.9 \\
        --methods uniform htsr teal-greedy acttail-greedy --output docs/results/allocation/study_test.json
    .venv/bin/python benchmarks/allocation_study.py --table docs/results/allocation/study_test*.json \
        --prior docs/results/allocation_confirm_test_16k.json

``acttail-greedy:<mapping>`` sets the HT-SR mapping of the block targets (default greedy.COMBINED_MAPPING; any
mapping of ``acttail_export._research_mappings.ALL_MAPPINGS``). A method ending in ``@wina`` evaluates the same budgets
with weight-informed scores (keep x_i by ``|x_i| * ||W[:, i]||``, :func:`acttail_export.sparsify.apply_sparsity`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acttail_export import _research_mappings, greedy  # noqa: E402
from acttail_export.allocation import build_config, greedy_levels, needs_search  # noqa: E402
from acttail_export.data import load_windows  # noqa: E402
from acttail_export.evaluation import perplexity_windows  # noqa: E402
from acttail_export.modeling import default_model_path, load_model  # noqa: E402
from acttail_export.spectral import analyze_model  # noqa: E402

logger = logging.getLogger("allocation_study")
_research_mappings.enable()  # acttail-greedy:<mapping> may name any mapping of the sweep space


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"] if path.is_file() else []


def _save(path: Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")


def _split_scores(method: str) -> tuple[str, str]:
    """(allocation spec, ranking scores) of a method name: ``teal-greedy@wina`` -> ("teal-greedy", "wina")."""
    spec, _, scores = method.partition("@")
    return spec, scores or "abs"


def _config(model, spec: str, level: float, fits, trajectories):
    allocation, _, mapping = spec.partition(":")
    if allocation == "dense":
        return None
    if allocation == "waterfill":
        return _waterfill_config(model, level, mapping, fits, trajectories)
    return build_config(model, level, allocation, "topk", mapping=mapping or None, fits=fits, trajectories=trajectories)


def _waterfill_config(model, level: float, spec: str, fits, trajectories):
    """``waterfill:<abs|rel>[:<headroom>]``: block levels from the search's own error curves
    (:func:`greedy.waterfill_levels`; ``rel`` is the method ``waterfill-greedy``), no block above ``level + headroom``
    (default 0.2, section 6d's study); inside each block the search's budgets at its level."""
    weighting, _, headroom = spec.partition(":")
    targets = greedy.waterfill_levels(model, trajectories, level, float(headroom or 0.2), weighting)
    config = config_at_block_levels(model, level, targets, trajectories, fits)
    config.allocation_method = f"waterfill:{spec}"
    logger.info("waterfill %s at %.2f: block levels %s", spec, level, np.round(targets, 3).tolist())
    return config


def config_at_block_levels(model, level: float, targets: list[float], trajectories, fits=None):
    """Top-k config at ``level`` with block ``l`` at level ``targets[l]``, the search's budgets inside each block."""
    import dataclasses

    from acttail_export.config import topk_keep

    by_name = greedy.greedy_budgets(model, trajectories, targets)
    config = build_config(model, level, "teal-greedy", "topk", fits=fits, trajectories=trajectories)
    config.projections = [dataclasses.replace(p, sparsity=by_name[p.name], k=topk_keep(by_name[p.name], p.in_features))
                          for p in config.projections]
    return config


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(default_model_path())
    skip = args.skip_tokens // 1024  # windows of 1024 left out at the start (e.g. the search's own text)
    windows = load_windows(tokenizer, args.data, 1024, max_tokens=args.max_tokens + skip * 1024)[skip:]
    settings = greedy.GreedySettings(mode="topk", step=args.step, samples=args.samples, sequence_length=args.search_length,
                                     max_increment=args.max_increment, rank=args.rank, lazy=args.lazy,
                                     refresh=args.refresh, delta_limit=args.delta_limit)
    start = time.perf_counter()
    fits = analyze_model(model, progress=False)
    fit_seconds = time.perf_counter() - start
    trajectories, search_seconds = None, None
    methods = [_split_scores(m)[0] for m in args.methods]
    greedy_methods = [m for m in methods if m.startswith("waterfill") or needs_search(m.partition(":")[0], args.levels, "topk")]
    if greedy_methods:
        levels = np.max([greedy_levels(model, m.partition(":")[0], args.levels, "topk", mapping=m.partition(":")[2] or None, fits=fits)
                         for m in greedy_methods if not m.startswith("waterfill")] + [[args.search_level] * len(model.model.layers)],
                        axis=0)
        calib = load_windows(tokenizer, args.calibration, settings.sequence_length, samples=settings.samples)
        trajectories = greedy.search(model, calib, [float(v) for v in levels], settings)
        search_seconds = greedy.search.seconds
    meta = {"model": "SmolLM2-135M-Instruct (GGUF, fp32)", "split": args.split, "tokens": int(windows.numel()),
            "first_token": skip * 1024,
            "sequence_length": 1024, "mode": "topk", "greedy_settings": vars(settings) if hasattr(settings, "__dict__") else str(settings),
            "spectral_fit_seconds": fit_seconds, "greedy_search_seconds": search_seconds, "threads": args.threads,
            "delta_limit": args.delta_limit,
            "allocation_names": "acttail = config.DEFAULT_POLICY['topk'], htsr = the HT-SR allocation"}
    rows = _rows(args.output)
    done = {(r["method"], r["level"]) for r in rows}
    jobs = [("dense", 0.0)] if args.dense else []
    jobs += [(m, level) for level in args.levels for m in args.methods]
    for method, level in jobs:
        if (method, level) in done:
            continue
        start = time.perf_counter()
        spec, scores = _split_scores(method)
        config = _config(model, spec, level, fits, trajectories)
        alloc_seconds = time.perf_counter() - start
        result = perplexity_windows(model, windows, config, "topk", progress=False, scores=scores)
        row = {"method": method, "level": level, "split": args.split, "perplexity": result["perplexity"],
               "effective_sparsity": result["effective_sparsity"], "tokens": result["tokens"],
               "allocation_seconds": alloc_seconds, "eval_seconds": time.perf_counter() - start - alloc_seconds}
        if config is not None:
            row["allocation_method"] = config.allocation_method
            row["budgets"] = [round(p.sparsity, 6) for p in config.projections]
        rows.append(row)
        _save(args.output, meta, rows)
        logger.info("%s %.2f: perplexity %.3f (%.0f s)", method, level, row["perplexity"], row["eval_seconds"])


def prior_rows(path: Path, tokens: int) -> list[dict]:
    """uniform / HT-SR (default mapping) rows of a ``benchmarks/allocation_search.py`` file (same split, same tokens)."""
    from acttail_export.allocation import DEFAULT_EPSILON, DEFAULT_MAPPING

    out = []
    for r in json.loads(path.read_text())["results"]:
        default = r["mapping"] == DEFAULT_MAPPING and r["epsilon"] == DEFAULT_EPSILON
        if r["tokens"] == tokens and (r["mapping"] == "uniform" or default):
            out.append({"method": "uniform" if r["mapping"] == "uniform" else "htsr", "level": r["sparsity"],
                        "perplexity": r["perplexity"]})
    return out


def table(paths: list[Path], prior: Path | None = None) -> None:
    """Markdown table of the rows of ``paths`` (same split and tokens); the best perplexity per level in bold."""
    data = json.loads(paths[0].read_text())
    rows = []
    for path in paths:  # greedy rows are labelled with the search step and calibration windows of their file
        content = json.loads(path.read_text())
        g = content["meta"]["greedy_settings"]
        cap = f", increment ≤ {g['max_increment']:g}" if g.get("max_increment") is not None else ""
        cap += ", ranked by error per rise" if g.get("rank", "error") != "error" else ""
        label = f"step {g['step']:g}{cap}, {g['samples']} × {g['sequence_length']} tokens"
        legacy = "allocation_names" not in content["meta"]  # its acttail rows are the HT-SR allocation
        for r in content["results"]:
            method = "htsr" if legacy and r["method"] == "acttail" else r["method"]
            if method == "acttail":
                method = "acttail (the default)"
            greedy = "greedy" in method or "greedy" in (r.get("allocation_method") or "")
            rows.append({**r, "method": f"{method} ({label})" if greedy and "acttail (" not in method else method})
    if prior is not None:
        rows = prior_rows(prior, data["meta"]["tokens"]) + rows
    levels = sorted({r["level"] for r in rows if r["method"] != "dense"})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    value = {(r["method"], r["level"]): r["perplexity"] for r in rows}
    meta = data["meta"]
    print(f"{meta['split']}, {meta['tokens']} tokens, windows of {meta['sequence_length']}, top-k")
    print("| method | " + " | ".join(f"{s:.0%}" for s in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for m in methods:
        cells = []
        for s in levels:
            v = value.get((m, s))
            best = min((value[(o, s)] for o in methods if (o, s) in value), default=None)
            cell = "" if v is None else f"{v:.4g}"
            cells.append(f"**{cell}**" if v is not None and v == best else cell)
        print(f"| {m} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="evaluation text (wiki.valid.raw or wiki.test.raw)")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--calibration", type=Path, help="greedy search text (validation split)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--skip-tokens", type=int, default=0,
                        help="evaluate from this token on (whole windows of 1024), e.g. past the search's own text")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--methods", nargs="+", default=["uniform", "htsr", "teal-greedy", "acttail-greedy", "acttail"])
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--search-level", type=float, default=0.0,
                        help="search every block at least to this level (waterfill:<abs|rel>[:<headroom>] methods need "
                             "level + headroom)")
    parser.add_argument("--step", type=float, default=0.05, help="greedy step (block weighted sparsity per step)")
    parser.add_argument("--max-increment", type=float, default=None,
                        help="greedy GreedySettings.max_increment: cap on one step's increase of a projection (default: none)")
    parser.add_argument("--lazy", action="store_true",
                        help="GreedySettings.lazy: lazy evaluation of the candidates (default: every candidate every step)")
    parser.add_argument("--refresh", type=int, default=0,
                        help="GreedySettings.refresh: with --lazy, every n-th step evaluates every candidate (default 0: never)")
    parser.add_argument("--rank", choices=greedy.RANKS, default="error",
                        help="greedy GreedySettings.rank: how a step ranks its candidates (default: error, TEAL's rule)")
    parser.add_argument("--samples", type=int, default=2, help="greedy search windows")
    parser.add_argument("--search-length", type=int, default=64, help="greedy search window length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--delta-limit", type=float, default=0.0,
                        help="GreedySettings.delta_limit of the search (default 0: every product in full; docs/allocation.md 6c)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown table of results files and exit")
    parser.add_argument("--prior", type=Path, help="with --table: uniform / htsr rows of an allocation_search.py file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.table:
        table(args.table, args.prior)
        return
    if not (args.data and args.calibration and args.output):
        parser.error("--data, --calibration and --output are required (or --table)")
    run(args)


if __name__ == "__main__":
    main()
