"""Peak memory of the analysis and calibration steps, model loaded whole vs. decoder layers offloaded to disk.

    .venv/bin/python benchmarks/offload_memory.py --output docs/results/offload_memory_smollm2_cpu.json

Each (placement, step) runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own.
``whole``: the model in host memory; ``disk``: every decoder layer offloaded to disk by accelerate
(weights on ``meta``, loaded one module at a time). On a GPU machine, add ``--gpu`` to place the
resident part on ``cuda:0`` and report its peak allocated memory as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
from acttail_export import allocation, calibration, spectral
from acttail_export.modeling import default_model_path, load_model, resolve_model_ref
from acttail_export.offload import PeakMemory, load_model_sharded
placement, step, offload, gpu = {placement!r}, {step!r}, {offload!r}, {gpu!r}
torch.set_num_threads(1)
with PeakMemory.measure() as peak:
    t0 = time.perf_counter()
    main = "cuda:0" if gpu else "cpu"
    if placement == "whole":
        model, tok = load_model(default_model_path(), device=main)
    else:
        folder = resolve_model_ref(default_model_path())
        from transformers import AutoConfig
        n = AutoConfig.from_pretrained(folder).num_hidden_layers
        dmap = {{"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main}}
        dmap.update({{f"model.layers.{{i}}": "disk" for i in range(n)}})
        model, tok = load_model_sharded(default_model_path(), device_map=dmap, offload_folder=offload)
    t_load = time.perf_counter() - t0
    fits = spectral.analyze_model(model, progress=False)
    if step == "calibration":
        config = allocation.build_config(model, 0.5, allocation="htsr", mode="threshold", fits=fits)
        calibration.calibrate(model, tok, config, samples=8, sequence_length=512, progress=False)
    seconds = time.perf_counter() - t0
print(json.dumps(dict(placement=placement, step=step, load_s=round(t_load, 1), total_s=round(seconds, 1),
                      peak_rss_mib=round(peak.host_rss_mib), gpu_peak_mib={{k: round(v) for k, v in peak.gpu_peak_mib.items()}})))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    rows = []
    for placement in ("whole", "disk"):
        for step in ("analysis", "calibration"):
            with tempfile.TemporaryDirectory() as offload:
                code = CHILD.format(root=str(ROOT), placement=placement, step=step, offload=offload, gpu=args.gpu)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"model": "SmolLM2-135M-Instruct (fp32, 538 MB of weights)", "gpu": args.gpu,
              "calibration": "8 windows x 512 tokens, threshold mode, 50%", "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
