"""Wall time of the greedy allocation search (``acttail_export.greedy``) on SmolLM2-135M, no cache (docs/allocation.md,
sections 6a, 6c, 6i, 6k): with the settings the flags give (none: every candidate and every product in full, TEAL's
search), or with ``--search-defaults`` the ones the allocation's method runs by default (``greedy.default_settings``:
the fast search for the default's ``waterfill-greedy`` at 65-85 % in top-k mode). ``teal-greedy`` searches every block
to ``--level``; another ``--allocation`` (e.g. ``acttail``, the default) searches each block to the level it needs
there, after the spectral fits when it reads alphas (timed apart)::

    python benchmarks/greedy_time.py --data PATH/wikitext-2/wiki.valid.raw --level 0.5 \
        --output docs/results/allocation/greedy_time_smollm2_cpu.json
    python benchmarks/greedy_time.py --data PATH/wikitext-2/wiki.valid.raw --allocation acttail --level 0.8 \
        --search-defaults --output docs/results/allocation/greedy_time_smollm2_cpu_default_80_search_defaults.json

The row records the load averages (1, 5, 15 min) before and after the search and, before and after, the float32
GEMM speed of the machine at the same threads (GFLOPS of a block's down_proj shape): on a shared machine the
search time only means something next to them. ``trajectories_sha256`` identifies every step's budgets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path


def gemm_gflops(repeats: int = 20) -> float:
    """float32 GFLOPS of ``linear([1024, 1536], [576, 1536])`` (SmolLM2's down_proj on 8 × 128 tokens)."""
    import torch

    x, w = torch.randn(1024, 1536), torch.randn(576, 1536)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    return round(2 * 1024 * 1536 * 576 * repeats / (time.perf_counter() - start) / 1e9, 1)


def trajectories_digest(trajectories: dict[int, list[list[float]]]) -> str:
    """sha256 (16 hex digits) of the trajectories' JSON: every step's budgets, so two implementations of the search
    that choose alike give the same digest."""
    return hashlib.sha256(json.dumps(trajectories, sort_keys=True).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="calibration text (WikiText-2 wiki.valid.raw)")
    ap.add_argument("--level", type=float, default=0.5, help="block level every block is searched to")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--allocation", default="teal-greedy", help="allocation whose search is timed (default: teal-greedy)")
    ap.add_argument("--mode", default="topk", choices=("topk", "threshold"))
    ap.add_argument("--step", type=float, default=None,
                    help="greedy step (default: the search's, greedy.DEFAULT_STEP)")
    ap.add_argument("--max-increment", type=float, default=None,
                    help="GreedySettings.max_increment: cap on one step's increase of a projection (default: none)")
    ap.add_argument("--lazy", action="store_true",
                    help="GreedySettings.lazy: lazy evaluation of the candidates (default: every candidate every step)")
    ap.add_argument("--refresh", type=int, default=0,
                    help="GreedySettings.refresh: with --lazy, every n-th step evaluates every candidate (default 0: never)")
    ap.add_argument("--rank", choices=("error", "error_per_rise"), default="error",
                    help="GreedySettings.rank: how a step ranks its candidates (default: error, TEAL's rule)")
    ap.add_argument("--delta-limit", type=float, default=0.0,
                    help="GreedySettings.delta_limit (default 0: every product in full; docs/allocation.md 6c)")
    ap.add_argument("--search-defaults", action="store_true",
                    help="time the search the allocation runs without settings (greedy.default_settings of its method at "
                         "--level); the search flags above must then be left out")
    ap.add_argument("--output", type=Path, default=None, help="JSON row (printed either way)")
    args = ap.parse_args()
    flags = ("step", "max_increment", "lazy", "refresh", "rank", "delta_limit")
    if args.search_defaults and any(getattr(args, f) != ap.get_default(f) for f in flags):
        ap.error("--search-defaults times the default search: leave out --step, --max-increment, --lazy, --refresh, "
                 "--rank and --delta-limit")

    import torch

    from acttail_export import greedy
    from acttail_export.allocation import needs_alphas, resolve_allocation
    from acttail_export.modeling import default_model_path, load_model
    from acttail_export.spectral import analyze_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(default_model_path())
    load_before, gflops_before = [round(v, 2) for v in os.getloadavg()], gemm_gflops()
    fits, fit_seconds = None, 0.0
    if needs_alphas(args.allocation, [args.level], args.mode):
        start = time.perf_counter()
        fits = analyze_model(model, progress=False)
        fit_seconds = round(time.perf_counter() - start, 1)
    if args.search_defaults:
        settings = greedy.default_settings(resolve_allocation(args.allocation, args.level, args.mode), args.mode)
    else:
        settings = greedy.GreedySettings(mode=args.mode, **({} if args.step is None else {"step": args.step}),
                                         max_increment=args.max_increment, rank=args.rank, lazy=args.lazy,
                                         refresh=args.refresh, delta_limit=args.delta_limit)
    start = time.perf_counter()
    trajectories = greedy.search_for(model, tokenizer, args.allocation, [args.level], args.mode, args.data, fits=fits,
                                     settings=None if args.search_defaults else settings, cache_dir=False, progress=True)
    seconds = round(time.perf_counter() - start, 1)
    load_after, gflops_after = [round(v, 2) for v in os.getloadavg()], gemm_gflops()
    row = {"model": "SmolLM2-135M-Instruct", "allocation": args.allocation, "mode": args.mode, "level": args.level,
           "seconds": seconds, "spectral_fit_seconds": fit_seconds, "settings": asdict(settings),
           "threads": args.threads, "delta_limit": settings.delta_limit, "blocks": len(trajectories),
           "steps": sum(len(v) - 1 for v in trajectories.values()), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "load_before": load_before, "load_after": load_after,
           "gemm_gflops_before": gflops_before, "gemm_gflops_after": gflops_after,
           "trajectories_sha256": trajectories_digest(trajectories)}
    print(json.dumps(row))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
