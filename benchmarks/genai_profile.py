"""Where a genai folder's time goes: ONNX Runtime's profiler on one prompt and its decode steps, summed per op type.

Copies the folder's ``genai_config.json`` aside, turns on the decoder session's profiler (``enable_profiling``), runs a
random ``--prompt-length``-token prompt and ``--decode-tokens`` greedy steps with onnxruntime-genai, restores the config
and prints the kernel time per op type for the prompt (the first run) and per decode step (the mean over the rest). The
profiler adds its own cost, so the totals read a little above an unprofiled run::

    python benchmarks/genai_profile.py FOLDER --threads 1 --output docs/results/int4/smollm2_cpu_int4_profile_threads1.json
    python benchmarks/genai_profile.py FOLDER --threads 2 --output docs/results/int4/smollm2_cpu_int4_profile_threads2.json
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
from pathlib import Path


def profile(folder: Path, prompt_length: int, decode_tokens: int, work: Path, threads: int | None = None) -> Path:
    """Run the folder once with the profiler on; the profile's path (the config is restored also on an error)."""
    import numpy as np
    import onnxruntime_genai as og

    config = folder / "genai_config.json"
    backup = work / "genai_config.json"
    shutil.copy2(config, backup)
    try:
        data = json.loads(config.read_text())
        options = data["model"]["decoder"].setdefault("session_options", {})
        options["enable_profiling"] = str(work / "ort_profile")
        if threads is not None:
            options["intra_op_num_threads"] = threads
        config.write_text(json.dumps(data, indent=2))
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        total = prompt_length + decode_tokens
        params.set_search_options(max_length=total, min_length=total)
        generator = og.Generator(model, params)
        generator.append_tokens(np.random.default_rng(0).integers(100, 20000, prompt_length).tolist())
        while not generator.is_done():
            generator.generate_next_token()
        del generator, model  # the session writes its profile when it closes
    finally:
        shutil.copy2(backup, config)
    return max(work.glob("ort_profile*.json"), key=lambda p: p.stat().st_mtime)


def summarize(events: list[dict]) -> dict:
    """Kernel ms per op type: the first ``model_run`` (the prompt) and the mean over the other runs (decode steps)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) < 2:
        raise SystemExit("the profile holds fewer than two runs: nothing to split into prompt and decode")
    prompt_end = runs[0]["ts"] + runs[0]["dur"]
    prompt, decode = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        (prompt if e["ts"] <= prompt_end else decode)[e["args"].get("op_name", "?")] += e["dur"] / 1e3
    steps = len(runs) - 1
    step_ms = sorted(r["dur"] / 1e3 for r in runs[1:])
    return {"prompt_run_ms": runs[0]["dur"] / 1e3, "decode_run_ms_median": step_ms[len(step_ms) // 2], "decode_steps": steps,
            "prompt_ms_by_op": dict(prompt.most_common()),
            "decode_ms_per_step_by_op": {op: ms / steps for op, ms in decode.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="an exported (or builder) genai folder")
    ap.add_argument("--prompt-length", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, help="intra-op threads (0: ONNX Runtime's choice; unset: the folder's own "
                    "setting, and onnxruntime-genai runs one thread when the folder has none)")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    if not (args.folder / "genai_config.json").is_file():
        raise SystemExit(f"{args.folder} has no genai_config.json: pass a genai folder")
    with tempfile.TemporaryDirectory() as tmp:
        summary = summarize(json.loads(profile(args.folder, args.prompt_length, args.decode_tokens, Path(tmp), args.threads).read_text()))
    print(f"prompt run {summary['prompt_run_ms']:.1f} ms; decode step median {summary['decode_run_ms_median']:.2f} ms")
    for op, ms in list(summary["decode_ms_per_step_by_op"].items())[:8]:
        print(f"  decode {op:34s} {ms:7.3f} ms / step   prompt {summary['prompt_ms_by_op'].get(op, 0.0):8.2f} ms")
    if args.output:
        args.output.write_text(json.dumps({"prompt_length": args.prompt_length, "decode_tokens": args.decode_tokens,
                                           "threads": args.threads, **summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
