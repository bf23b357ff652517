"""Probe (docs/allocation.md section 6o): two changes of the mask rule that keep the kernels' reads, at fixed budgets.

* ``bias``: add the expected contribution of the dropped entries back, ``b = W E[x ⊙ (1 − m)]`` per projection
  (``m`` the mask; the expectation on calibration text, measured with every projection sparsified). A constant output
  bias per projection: free at run time.
* ``power P``: rank by ``|x_i| · ||W[:, i]||^P`` (``P = 1`` is WINA's score, section 6f), on all seven projections. For
  the five that read an RMSNorm and for ``down_proj`` (whose input scales with ``up_proj``'s rows) such a per-channel
  scale folds into the weights, so the kernels would rank plain ``|x|`` of the transformed model (``o_proj``'s would
  have to be equal across the query heads sharing a value head).

Uniform top-k budgets (or ``--allocation htsr``), first ``--max-tokens`` validation tokens in windows of 1024; the bias
is measured on ``--calibration-windows`` windows of 512 tokens after them::

    nice -n 5 .venv/bin/python benchmarks/mask_rule_probe.py --data DATA/wiki.valid.raw --levels 0.4 \
        --output docs/results/allocation/mask_rule_probe_valid.json
"""

from __future__ import annotations

import torch
from probe_common import load_probe, probe_parser, replaced_weights, write_output  # benchmarks/, the script's folder

from acttail_export.allocation import build_config
from acttail_export.evaluation import perplexity_windows
from acttail_export.sparsify import apply_sparsity, mask_topk, projection_module


def dropped_bias(model, config, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``W E[x ⊙ (1 − m)]`` per projection, with the config's masks applied everywhere while measuring."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for proj in config.projections:
        module = projection_module(model, proj)

        def hook(module, args, name=proj.name, k=proj.keep_k()):
            x = args[0].double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x - mask_topk(x, k)).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(module.register_forward_pre_hook(hook))  # before the masks: sees the unmasked input
    hooks = apply_sparsity(model, config, "topk")
    try:
        with torch.inference_mode():
            for w in windows:
                model(w[None])
    finally:
        hooks.remove()
        for h in handles:
            h.remove()
    out = {}
    for proj in config.projections:
        w = projection_module(model, proj).weight.double()
        out[proj.name] = (w @ (sums[proj.name] / counts[proj.name])).float()
    return out


def with_bias(model, config, biases):
    handles = []
    for proj in config.projections:
        module = projection_module(model, proj)
        handles.append(module.register_forward_hook(lambda m, a, y, b=biases[proj.name]: y + b))
    return handles


def power_scores(model, config, power: float):
    """Pre-hooks multiplying x by ||W[:, i]||^power; registered before the masks (``perplexity_windows`` installs them
    later), so the masks rank the scaled x. The caller divides W's columns by the same scale."""
    handles = []
    for proj in config.projections:
        module = projection_module(model, proj)
        s = module.weight.detach().float().norm(dim=0).pow(power)
        handles.append(module.register_forward_pre_hook(lambda m, a, s=s: (a[0] * s, *a[1:])))
    return handles


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.4])
    ap.add_argument("--powers", type=float, nargs="*", default=[0.25, 0.5])
    ap.add_argument("--allocation", default="uniform", choices=("uniform", "htsr"))
    ap.add_argument("--calibration-windows", type=int, default=8, help="bias text: windows of 512 after the evaluation's")
    args = ap.parse_args()
    model, _, windows, calib = load_probe(args, args.calibration_windows)
    rows = []

    def record(rule, level, ppl):
        rows.append({"rule": rule, "level": level, "allocation": args.allocation, "perplexity": ppl})
        print(f"{rule:12s} {level:.2f}: perplexity {ppl:.3f}", flush=True)

    for level in args.levels:
        config = build_config(model, level, args.allocation, "topk")
        record("abs", level, perplexity_windows(model, windows, config, "topk", progress=False)["perplexity"])
        handles = with_bias(model, config, dropped_bias(model, config, calib))
        record("bias", level, perplexity_windows(model, windows, config, "topk", progress=False)["perplexity"])
        for h in handles:
            h.remove()
        for power in args.powers:
            scale_handles = power_scores(model, config, power)
            # the pre-hooks multiply x by s before the mask; W's columns divided by s undo it: W' x' = W (x ⊙ m)
            scaled = {}
            for proj in config.projections:
                w = projection_module(model, proj).weight.detach()
                scaled[proj.name] = w / w.norm(dim=0).pow(power)
            try:
                with replaced_weights(model, scaled):
                    ppl = perplexity_windows(model, windows, config, "topk", progress=False)["perplexity"]
            finally:
                for h in scale_handles:
                    h.remove()
            record(f"power {power:g}", level, ppl)
    write_output(args, {"tokens": int(windows.numel()), "calibration_tokens": int(calib.numel()), "rows": rows})


if __name__ == "__main__":
    main()
