"""SmolLM2-135M exported twice (``--kernel mask`` and ``--kernel fused``): ONNX Runtime CPU perplexity of both
and of the PyTorch sparse reference on the same WikiText-2 test windows, plus how far their logits drift apart.

    .venv/bin/python benchmarks/fused_vs_mask.py --mode topk --output docs/results/fused_vs_mask_topk.json

Both exports share budgets and thresholds; only the rewrite differs. A hard mask is discontinuous: a
float-rounding difference that moves one entry across the threshold (or the k-th value) changes that
projection's output by a whole entry, and the change then travels through attention to every later
token. The per-position logit differences below show that drift.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("topk", "threshold"), default="topk")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    from acttail_export.config import ActTailConfig
    from acttail_export.data import DEFAULT_EVAL_DATA, load_windows
    from acttail_export.evaluation import perplexity_windows
    from acttail_export.exporter import export
    from acttail_export.modeling import default_model_path, load_model
    from acttail_export.runtime import create_session, decoder_feeds, window_nll

    work = Path(tempfile.mkdtemp(prefix="fused-vs-mask-"))
    dirs = {}
    for kernel in ("mask", "fused"):
        t0 = time.perf_counter()
        dirs[kernel] = export("smollm2", work / kernel, sparsity=args.sparsity, mode=args.mode, kernel=kernel,
                              calibration_samples=8, sequence_length=256, validate=False, eval_tokens=0, progress=False)
        print(f"exported {kernel} in {time.perf_counter() - t0:.0f} s", flush=True)
    model, tokenizer = load_model(default_model_path())
    windows = load_windows(tokenizer, DEFAULT_EVAL_DATA, args.sequence_length, max_tokens=args.tokens)
    config = ActTailConfig.load(dirs["mask"])
    torch_ppl = perplexity_windows(model, windows, config, args.mode, progress=False)["perplexity"]
    dense_ppl = perplexity_windows(model, windows, progress=False)["perplexity"]

    ids = windows.numpy()
    logits, nll = {}, {}
    for kernel, folder in dirs.items():
        session = create_session(folder)
        total, count, first = 0.0, 0, None
        for w in ids:
            out = session.run(["logits"], decoder_feeds(session, w[None]))[0][0]
            first = out if first is None else first
            n, c = window_nll(out, w)
            total, count = total + n, count + c
        logits[kernel], nll[kernel] = first, total / count
    ppl = {k: float(np.exp(v)) for k, v in nll.items()}
    drift = np.abs(logits["mask"] - logits["fused"]).max(-1)
    result = {
        "model": "SmolLM2-135M-Instruct", "mode": args.mode, "sparsity": args.sparsity, "tokens": int(ids.size),
        "sequence_length": args.sequence_length, "data": "wiki.test.raw",
        "perplexity": {"dense_torch": dense_ppl, "sparse_torch": torch_ppl, "onnx_mask": ppl["mask"], "onnx_fused": ppl["fused"]},
        "fused_vs_mask_rel": abs(ppl["fused"] - ppl["mask"]) / ppl["mask"],
        "mask_vs_torch_rel": abs(ppl["mask"] - torch_ppl) / torch_ppl,
        "fused_vs_torch_rel": abs(ppl["fused"] - torch_ppl) / torch_ppl,
        "first_window_logit_drift": {"position_0": float(drift[0]), "median": float(np.median(drift)),
                                      "p90": float(np.quantile(drift, 0.9)),
                                      "top1_agreement": float((logits["mask"].argmax(-1) == logits["fused"].argmax(-1)).mean())},
        "command": "benchmarks/fused_vs_mask.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
