"""Paired per-window spread of two exports' perplexities (the tolerance of tests/test_smollm2_kernels.py).

    .venv/bin/python benchmarks/paired_spread.py --mask DIR --fused DIR --data wiki.valid.raw \
        --isa avx512 avx2 scalar --output docs/results/fused_vs_mask_spread_topk.json

(DIR: the two exports of tests/test_smollm2_kernels.py, top-k, 50 %.)

Per window w of the text: d_w = mean NLL(fused) - mean NLL(mask). A hard-masked model is chaotic, so each d_w is a
random draw around 0; the script reports mean(d), its standard error and sd(d) for the fused op under each CPU
instruction set (``ACTTAIL_CPU_ISA`` caps the op's kernels; each runs in its own process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mean_window_nlls(export_dir: str, data: str, tokens: int, length: int) -> list[float]:
    """Mean next-token NLL of each window of ``length`` tokens (first ``tokens`` of ``data``)."""
    from acttail_export.runtime import create_session, export_windows, window_nlls

    windows = export_windows(export_dir, data, length, tokens)
    return [nll / n for nll, n in window_nlls(create_session(export_dir), windows)]


def _child(export_dir: str, args, isa: str | None) -> list[float]:
    env = {**os.environ, **({"ACTTAIL_CPU_ISA": isa} if isa else {})}
    cmd = [sys.executable, __file__, "--one", export_dir, "--data", args.data, "--tokens", str(args.tokens),
           "--sequence-length", str(args.sequence_length)]
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask")
    ap.add_argument("--fused")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--sequence-length", type=int, default=512)
    ap.add_argument("--isa", nargs="+", default=["avx512", "avx2"])
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(mean_window_nlls(args.one, args.data, args.tokens, args.sequence_length)))
        return
    mask = np.array(_child(args.mask, args, None))
    rows = {}
    for isa in args.isa:
        d = np.array(_child(args.fused, args, isa)) - mask
        rows[isa] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))),
                     "sd": float(d.std(ddof=1)), "max_abs": float(np.abs(d).max()), "windows": len(d)}
        print(f"{isa}: mean {d.mean():+.4f} nats, se {rows[isa]['se']:.4f}, sd {rows[isa]['sd']:.4f}, "
              f"max |d| {rows[isa]['max_abs']:.4f} over {len(d)} windows")
    config = {k: v for k, v in vars(args).items() if k not in ("one", "output", "mask", "fused")}
    result = {"config": {**config, "data": Path(args.data).name},
              "mask_perplexity": math.exp(mask.mean()), "fused_minus_mask": rows}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
