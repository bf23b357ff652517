"""Where the greedy allocation search (``acttail_export.greedy``) spends its time on one block of SmolLM2-135M, and what
``GreedySettings.delta_limit`` changes there (docs/allocation.md, section 6c)::

    python benchmarks/greedy_profile.py --data PATH/wikitext-2/wiki.valid.raw --allocation acttail --level 0.8 \\
        --block 10 --output docs/results/allocation/greedy_profile_block10_80.json
    python benchmarks/greedy_profile.py --data PATH/wikitext-2/wiki.valid.raw --allocation acttail --level 0.8 \\
        --block 5 --compare 0.2 --output docs/results/allocation/greedy_compare_block5_80.json

The block is searched to the level ``--allocation`` gives it at ``--level`` (the combination: its HT-SR block target),
no cache, at ``--threads`` torch threads (default 1: one shard, so that cProfile sees every call). The row records the
wall time, the seconds of the main callees (float32 products, the masks' sorts, the updates' EmbeddingBag sums), and per
step the products computed in full and updated from the dropped entries, per projection. ``--compare LIMIT`` runs the
block twice, every product in full and with ``delta_limit`` LIMIT, and records the first step whose choice differs,
with every candidate's error in both runs (none: the same trajectory).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import time
from pathlib import Path

CALLEES = {"linear": "{built-in method torch._C._nn.linear}", "sort": "{method 'sort' of 'numpy.ndarray' objects}",
           "embedding_bag": "{built-in method torch.embedding_bag}"}


def run_block(model, tokenizer, args, block: int, level: float, limit: float, profile: bool) -> dict:
    import torch

    from acttail_export import greedy
    from acttail_export.data import EXPORT_CALIBRATION_FLAGS, read_text, token_windows

    windows = token_windows(tokenizer, read_text(args.data, EXPORT_CALIBRATION_FLAGS), greedy.DEFAULT_SEQUENCE_LENGTH,
                            max_tokens=greedy.DEFAULT_SAMPLES * greedy.DEFAULT_SEQUENCE_LENGTH)
    levels = [0.0] * len(model.model.layers)
    levels[block] = level
    full, updated, steps = collections.Counter(), collections.Counter(), []
    linear, step = greedy._Shard._linear, greedy.BlockSearch.step

    def counted_linear(shard, kind, data, keys):
        usable = data.outputs.get(kind) is not None and shard.search.weight_t(kind) is not None
        (updated if usable else full)[kind] += 1
        return linear(shard, kind, data, keys)

    def recorded_step(search):
        chosen, error, errors = step(search)
        steps.append({"chosen": greedy.PROJECTION_KINDS[chosen], "errors": errors})
        return chosen, error, errors

    greedy._Shard._linear, greedy.BlockSearch.step = counted_linear, recorded_step
    profiler = cProfile.Profile() if profile else None
    try:
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        with torch.inference_mode():
            trajectories = greedy.search(model, windows, levels, greedy.GreedySettings(mode=args.mode, delta_limit=limit),
                                         cache_dir=False, progress=False)
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - start
    finally:
        greedy._Shard._linear, greedy.BlockSearch.step = linear, step
    n = len(trajectories[block]) - 1
    row = {"delta_limit": limit, "seconds": round(seconds, 2), "steps": n,
           "full_products_per_step": {k: round(v / n, 2) for k, v in full.items()},
           "updated_products_per_step": {k: round(v / n, 2) for k, v in updated.items()}, "trajectory": trajectories[block],
           "step_records": steps}
    if profiler:
        stats = pstats.Stats(profiler).stats
        by_name = {pstats.func_std_string(func): (calls, total) for func, (_, calls, total, _, _) in stats.items()}
        row["callee_seconds"] = {name: round(by_name.get(key, (0, 0.0))[1], 2) for name, key in CALLEES.items()}
        row["callee_calls"] = {name: by_name.get(key, (0, 0.0))[0] for name, key in CALLEES.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="calibration text (WikiText-2 wiki.valid.raw)")
    ap.add_argument("--allocation", default="teal-greedy", help="allocation whose search is profiled (default: teal-greedy)")
    ap.add_argument("--level", type=float, default=0.5, help="target level (the block searches to its level there)")
    ap.add_argument("--mode", default="topk", choices=("topk", "threshold"))
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one shard, all calls profiled)")
    ap.add_argument("--delta-limit", type=float, default=0.0, help="GreedySettings.delta_limit of the profiled run (default 0)")
    ap.add_argument("--compare", type=float, default=None, metavar="LIMIT",
                    help="run the block in full and with delta_limit LIMIT; record the first step that chooses otherwise")
    ap.add_argument("--output", type=Path, default=None, help="JSON row (printed either way, without the step records)")
    args = ap.parse_args()

    import torch

    from acttail_export.allocation import greedy_levels, needs_alphas
    from acttail_export.modeling import default_model_path, load_model
    from acttail_export.spectral import analyze_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(default_model_path())
    fits = analyze_model(model, progress=False) if needs_alphas(args.allocation, [args.level], args.mode) else None
    level = greedy_levels(model, args.allocation, [args.level], args.mode, fits=fits)[args.block]
    row = {"model": "SmolLM2-135M-Instruct", "allocation": args.allocation, "mode": args.mode, "level": args.level,
           "block": args.block, "block_level": round(level, 6), "threads": args.threads}
    if args.compare is None:
        row["run"] = run_block(model, tokenizer, args, args.block, level, args.delta_limit, profile=True)
    else:
        runs = [run_block(model, tokenizer, args, args.block, level, limit, profile=False) for limit in (0.0, args.compare)]
        row["runs"] = runs
        first = next((i for i, (a, b) in enumerate(zip(runs[0]["step_records"], runs[1]["step_records"]))
                      if a["chosen"] != b["chosen"]), None)
        row["first_difference"] = None if first is None else {
            "step": first + 1, "full": runs[0]["step_records"][first], "updated": runs[1]["step_records"][first]}
    shown = {k: v for k, v in row.items() if k not in ("run", "runs")}
    for run in [row["run"]] if "run" in row else row["runs"]:
        print(json.dumps({k: v for k, v in run.items() if k not in ("trajectory", "step_records")}))
    print(json.dumps(shown))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
