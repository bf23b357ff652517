"""Top-1 agreement between an export run by ONNX Runtime (CPU) and the PyTorch sparse reference of the same config.

Issue 17's stability measure "between the ORT CPU and PyTorch runs of one export": SmolLM2-135M is exported with the
default allocation (ActTail, fused kernel, calibrated on ``--data``), then each window of ``--windows`` x 512 tokens
of ``--data`` (after the calibration text) runs through the export (ONNX Runtime, CPU) and through PyTorch with the
config's masks (``sparsify.apply_sparsity``, hard mask). Agreement = fraction of positions with the same top-1 token,
per window; also the first position where they differ. The dense export (sparsity 0) is the control::

    nice -n 10 .venv/bin/python benchmarks/ort_agreement.py --data DATA/wiki.valid.raw --sparsity 0 0.5 \\
        --modes topk threshold --output docs/results/stability/ort_agreement_valid.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("ort_agreement")


def agreement(session, model, config, windows) -> list[dict]:
    """Per window: top-1 agreement of ORT vs PyTorch (masks applied), and the first position that differs."""
    import torch

    from acttail_export.runtime import decoder_feeds
    from acttail_export.sparsify import apply_sparsity

    rows = []
    for w in windows:
        ids = w.numpy().reshape(1, -1)
        got = session.run(["logits"], decoder_feeds(session, ids))[0][0]
        with torch.no_grad(), apply_sparsity(model, config):
            ref = model(w.reshape(1, -1)).logits[0].float().numpy()
        same = got.argmax(-1) == ref.argmax(-1)
        rows.append({"top1_agreement": float(same.mean()), "first_difference": int(np.argmin(same)) if not same.all() else None,
                     "max_abs_logit_diff_first_16": float(np.abs(got[:16] - ref[:16]).max())})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="wiki.valid.raw (calibration: the first windows; measured: the next ones)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--modes", nargs="+", default=["topk", "threshold"], choices=["topk", "threshold"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calibration-samples", type=int, default=16)
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from acttail_export.config import ActTailConfig
    from acttail_export.data import load_windows
    from acttail_export.exporter import export
    from acttail_export.modeling import default_model_path, load_model
    from acttail_export.runtime import create_session

    torch.manual_seed(0)
    model_path = default_model_path()
    model, tokenizer = load_model(model_path)
    cal = args.calibration_samples
    windows = load_windows(tokenizer, args.data, 512, samples=cal + args.windows)[cal:]
    results = []
    for mode in args.modes:
        for s in args.sparsity:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                out = export(str(model_path), Path(tmp) / "export", sparsity=s, mode=mode, kernel="fused", calibration_data=args.data,
                             calibration_samples=cal, validate=False, eval_tokens=0, progress=False)
                config = ActTailConfig.load(out)
                rows = agreement(create_session(out), model, config, windows)
            mean = float(np.mean([r["top1_agreement"] for r in rows]))
            results.append({"mode": mode, "sparsity": s, "allocation": config.allocation,
                            "allocation_method": config.allocation_method, "windows": len(rows), "window_tokens": 512,
                            "top1_agreement_mean": mean, "top1_agreement_min": min(r["top1_agreement"] for r in rows), "per_window": rows,
                            "seconds": round(time.perf_counter() - start, 1)})
            logger.info("%s %.0f %%: ORT vs PyTorch top-1 agreement %.3f (min %.3f), first differences %s", mode, 100 * s, mean,
                        results[-1]["top1_agreement_min"], [r["first_difference"] for r in rows])
    command = (f"python benchmarks/ort_agreement.py --data DATA/{Path(args.data).name} --sparsity {' '.join(map(str, args.sparsity))} "
               f"--modes {' '.join(args.modes)} --windows {args.windows} --calibration-samples {cal} --output {args.output}")
    meta = {"command": command, "data": Path(args.data).name, "torch_threads": torch.get_num_threads()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
