"""Benchmark the full SmolLM2-135M export and check ONNX Runtime perplexity against PyTorch.

    .venv/bin/python benchmarks/export_smollm2.py [--work DIR] [--eval-tokens N] [--json FILE]

Part 1: ``acttail-export export --model smollm2 --sparsity 0.8`` (defaults otherwise) in a child
process: wall time and peak RSS (target: <= 5 min on CPU). CPU time (user + system) is reported too: on a shared
machine the wall time depends on the load average, also recorded.
Part 2: export at 50 % (top-k, mask kernel), then perplexity on WikiText-2 test through ONNX Runtime
(CPU) and through the PyTorch sparse reference on the same windows (must agree within 1 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed_export(out: Path, *flags: str) -> dict:
    """Run the CLI export in a child process (``/usr/bin/time``-style): wall time, peak RSS, exit status."""
    cmd = [sys.executable, "-m", "acttail_export.cli", "export", "--model", "smollm2", "--overwrite", *flags, str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    sys.stderr.write(err)
    lines = [line for line in err.splitlines() if line.strip()]
    return {"command": "acttail-export export --model smollm2 " + " ".join(flags) + f" {out.name}",
            "exit_code": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "last_line": lines[-1] if lines else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench"), help="folder for the exports (default: runs/bench)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="WikiText-2 test tokens for the perplexity check")
    parser.add_argument("--sequence-length", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-validate-80", action="store_true", help="time the 80%% export without export-time validation")
    args = parser.parse_args()

    from acttail_export.config import ActTailConfig
    from acttail_export.data import DEFAULT_EVAL_DATA
    from acttail_export.evaluation import perplexity
    from acttail_export.modeling import default_model_path, load_model
    from acttail_export.runtime import perplexity_onnx

    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    flags80 = ["--sparsity", "0.8"] + (["--no-validate"] if args.no_validate_80 else [])
    results["export_80"] = timed_export(args.work / "smollm2-acttail-80", *flags80)
    print(json.dumps(results["export_80"]), flush=True)

    out50 = args.work / "smollm2-acttail-50"
    results["export_50"] = timed_export(out50, "--sparsity", "0.5", "--mode", "topk", "--kernel", "mask")
    if results["export_50"]["exit_code"] != 0:
        sys.exit(f"50% export failed: {results['export_50']['last_line']}")
    config = ActTailConfig.load(out50)
    start = time.perf_counter()
    ort_ppl = perplexity_onnx(out50, DEFAULT_EVAL_DATA, sequence_length=args.sequence_length, max_tokens=args.eval_tokens)
    ort_s = time.perf_counter() - start
    model, tokenizer = load_model(default_model_path())
    start = time.perf_counter()
    pt_ppl = perplexity(model, tokenizer, DEFAULT_EVAL_DATA, sequence_length=args.sequence_length,
                        max_tokens=args.eval_tokens, config=config)
    pt_s = time.perf_counter() - start
    rel = abs(ort_ppl["perplexity"] - pt_ppl["perplexity"]) / pt_ppl["perplexity"]
    results["perplexity_50_topk_mask"] = {
        "tokens": ort_ppl["tokens"], "sequence_length": args.sequence_length,
        "onnxruntime_cpu": round(ort_ppl["perplexity"], 4), "pytorch_reference": round(pt_ppl["perplexity"], 4),
        "relative_difference": rel, "within_1_percent": rel <= 0.01,
        "onnxruntime_s": round(ort_s, 1), "pytorch_s": round(pt_s, 1),
        "export_time_perplexity": config.perplexity.get("perplexity"),
        "validation": config.perplexity.get("validation"),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if rel > 0.01:
        sys.exit("ONNX Runtime perplexity differs from the PyTorch reference by more than 1%")


if __name__ == "__main__":
    main()
