"""Wall time of the TEAL-greedy allocation search (``acttail_export.greedy``) at its default settings on SmolLM2-135M,
top-k mode, every block searched to one level, no cache (docs/allocation.md, section 6a)::

    python benchmarks/greedy_time.py --data PATH/wikitext-2/wiki.valid.raw --level 0.5 \
        --output docs/results/allocation/greedy_time_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="calibration text (WikiText-2 wiki.valid.raw)")
    ap.add_argument("--level", type=float, default=0.5, help="block level every block is searched to")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--output", type=Path, default=None, help="JSON row (printed either way)")
    args = ap.parse_args()

    import torch

    from acttail_export import greedy
    from acttail_export.modeling import default_model_path, load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(default_model_path())
    start = time.perf_counter()
    trajectories = greedy.search_for(model, tokenizer, "teal-greedy", [args.level], "topk", args.data, cache_dir=False,
                                     progress=True)
    row = {"model": "SmolLM2-135M-Instruct", "level": args.level, "seconds": round(time.perf_counter() - start, 1),
           "settings": asdict(greedy.GreedySettings()), "threads": args.threads, "blocks": len(trajectories),
           "steps": sum(len(v) - 1 for v in trajectories.values()), "cpu": platform.processor() or platform.machine()}
    print(json.dumps(row))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
