"""Probe (docs/allocation.md section 6o): a rank-r part of every weight computed dense, the rest masked, at equal reads.

``y = (W − W_r)(x ⊙ m) + W_r x``, ``W_r`` the top-``r`` SVD of ``W`` (R-Sparse's split). The masked product keeps the
project's rule and op; the low-rank part reads ``r (K + N)`` weights more, so each projection's sparsity is raised until
``(1 − s) K N + r (K + N) = (1 − level) K N``: every rank reads as many weights as uniform ``level`` does. Perplexity
on the first ``--max-tokens`` validation tokens, windows of 1024, top-k::

    nice -n 5 .venv/bin/python benchmarks/lowrank_probe.py --data DATA/wiki.valid.raw --level 0.4 --ranks 8 16 32 \
        --output docs/results/allocation/lowrank_probe_valid.json
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext

import torch
from probe_common import load_probe, probe_parser, replaced_weights, write_output  # benchmarks/, the script's folder

from acttail_export.allocation import build_config
from acttail_export.config import topk_keep
from acttail_export.evaluation import perplexity_windows
from acttail_export.sparsify import projection_module


def equal_reads_config(config, rank: int):
    """``config`` with every projection's sparsity raised by ``rank (K + N) / (K N)`` (capped below 1)."""
    projections = []
    for p in config.projections:
        s = min(0.99, p.sparsity + rank * (p.in_features + p.out_features) / p.parameters)
        projections.append(dataclasses.replace(p, sparsity=s, k=topk_keep(s, p.in_features)))
    return dataclasses.replace(config, projections=projections)


@contextmanager
def split_low_rank(model, config, rank: int):
    """Inside the block each W is W − W_r and W_r x (x before the mask) is added to the output."""
    residual, handles = {}, []
    for p in config.projections:
        module = projection_module(model, p)
        w = module.weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        a = (u[:, :rank] * s[:rank]).float()
        b = vh[:rank].float()
        residual[p.name] = (w - a.double() @ b.double()).float()
        inputs: dict[str, torch.Tensor] = {}
        # registered before the masks (perplexity_windows installs them later): sees the unmasked x
        handles.append(module.register_forward_pre_hook(lambda m, args, inputs=inputs: inputs.__setitem__("x", args[0])))
        handles.append(module.register_forward_hook(
            lambda m, args, y, inputs=inputs, a=a, b=b: y + (inputs.pop("x") @ b.T) @ a.T))

    try:
        with replaced_weights(model, residual):
            yield
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--level", type=float, default=0.4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    args = ap.parse_args()
    model, _, windows, _ = load_probe(args)
    base = build_config(model, args.level, "uniform", "topk")
    total = sum(p.parameters for p in base.projections)
    rows = []
    for rank in [0, *args.ranks]:
        config = equal_reads_config(base, rank) if rank else base
        with split_low_rank(model, config, rank) if rank else nullcontext():
            ppl = perplexity_windows(model, windows, config, "topk", progress=False)["perplexity"]
        masked = sum(p.sparsity * p.parameters for p in config.projections) / total
        reads = sum((1 - p.sparsity) * p.parameters + rank * (p.in_features + p.out_features)
                    for p in config.projections) / total
        rows.append({"rank": rank, "level": args.level, "mask_sparsity": round(masked, 4),
                     "weight_reads": round(reads, 4), "perplexity": ppl})
        print(f"rank {rank:3d}: masked {masked:.3f}, reads {reads:.3f} of dense, perplexity {ppl:.3f}", flush=True)
    write_output(args, {"tokens": int(windows.numel()), "rows": rows})


if __name__ == "__main__":
    main()
