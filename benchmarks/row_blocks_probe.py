"""Probe (docs/quantization.md, "Scales that travel with their row"): 4-bit blocks along the output dimension N,
one (scale, offset) pair per (input channel, B output columns), against today's blocks along the input dimension K.

A row-skipping decode kernel drops whole input channels; with blocks along N a dropped channel's scales are dropped
with it, which is what docs/benchmarks.md's bound asks of a format for #15's 80 % target. This probe measures only
the quality side: SmolLM2-135M, PyTorch, every projection's weight quantized then dequantized
(``quantize.quantize_tensor``) along K (``W.T``: [K, N], the op's layout) or along N (``W``: [N, K]), dense and with
uniform top-k budgets, the first ``--max-tokens`` validation tokens in windows of 1024::

    nice -n 5 .venv/bin/python benchmarks/row_blocks_probe.py --data DATA/wiki.valid.raw --blocks 64 128 \
        --quantizers rtn mse --output docs/results/quantization/row_blocks_probe_valid.json
"""

from __future__ import annotations

import time

import torch
from probe_common import load_probe, probe_parser, replaced_weights, write_output  # benchmarks/, the script's folder

from acttail_export.allocation import build_config
from acttail_export.evaluation import perplexity_windows
from acttail_export.modeling import iter_projections
from acttail_export.quantize import dequantize_tensor, quantize_tensor


def quantized_weights(model, axis: str, block: int, quantizer: str) -> dict[str, torch.Tensor]:
    """Dequantized 4-bit copies of every projection weight ([N, K] like nn.Linear), blocks along ``axis`` (K or N)."""
    out = {}
    for name, _, _, module in iter_projections(model):
        w = module.weight.detach().float()
        grid = w.T if axis == "K" else w  # quantize_tensor blocks along its first dimension
        q, s, o = quantize_tensor(grid, block, quantizer)
        deq = dequantize_tensor(q, s, o, block)
        out[name] = deq.T.contiguous() if axis == "K" else deq
    return out


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--quantizers", nargs="+", default=["rtn", "mse"])
    ap.add_argument("--levels", type=float, nargs="*", default=[0.5])
    args = ap.parse_args()
    model, _, windows, _ = load_probe(args)
    configs = {level: build_config(model, level, "uniform", "topk") for level in args.levels}
    rows = []

    def measure(label: dict) -> None:
        for level in [0.0, *args.levels]:
            config = configs.get(level)
            ppl = perplexity_windows(model, windows, config, "topk" if config else None, progress=False)["perplexity"]
            rows.append({**label, "level": level, "perplexity": ppl})
            print(f"{label} {level:.2f}: perplexity {ppl:.3f}", flush=True)

    measure({"weights": "float"})
    for quantizer in args.quantizers:
        for block in args.blocks:
            for axis in ("K", "N"):
                start = time.perf_counter()
                weights = quantized_weights(model, axis, block, quantizer)
                seconds = time.perf_counter() - start
                with replaced_weights(model, weights):
                    measure({"weights": "int4", "quantizer": quantizer, "block": block, "axis": axis,
                             "quantize_seconds": round(seconds, 1)})
    write_output(args, {"tokens": int(windows.numel()), "rows": rows})


if __name__ == "__main__":
    main()
