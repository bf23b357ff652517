"""Wall time of the TEAL-greedy allocation search (``acttail_export.greedy``) on a full 7B shape on one GPU (issue #17:
"allocation search for a 7B shape on one H200 <= 10 min"): random weights, random calibration windows of the search's
default size (the search's time does not depend on the text), top-k mode, every block searched to one level, no cache::

    python3 benchmarks/device/greedy_time_7b.py --shape llama2-7b --level 0.5 --output <dir>/greedy_time_llama2-7b_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b", help="benchmarks/shapes.py entry (llama2-7b, mistral-7b, ...)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--level", type=float, default=0.5, help="block level every block is searched to")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="weights and activations")
    ap.add_argument("--device", default="cuda", help="torch device")
    ap.add_argument("--output", type=Path, default=None, help="JSON row (printed either way)")
    args = ap.parse_args()

    import torch
    import transformers

    from acttail_export import greedy
    from benchmarks.shapes import model_config

    cfg = model_config(args.shape, args.layers, vocab_size=32000, tie_word_embeddings=False)
    cls = transformers.MistralForCausalLM if args.shape.startswith("mistral") else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(args.device):
        model = cls(cfg).to(getattr(torch, args.dtype)).eval()
    settings = greedy.GreedySettings(mode="topk")
    windows = torch.randint(3, cfg.vocab_size, (settings.samples, settings.sequence_length), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    trajectories = greedy.search(model, windows, args.level, settings, cache_dir=False, progress=True)
    sync()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    row = {"shape": args.shape, "layers": cfg.num_hidden_layers, "dtype": args.dtype, "level": args.level,
           "seconds": round(seconds, 1), "settings": asdict(settings), "blocks": len(trajectories),
           "steps": sum(len(v) - 1 for v in trajectories.values()), "device": name,
           "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(row))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
