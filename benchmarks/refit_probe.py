"""Probe (docs/allocation.md section 6p): refit each masked projection's weights by least squares on calibration text.

The mask keeps the kernels' rule and reads; only the weights change, once, before export: ``W'`` minimizes
``Σ_t ||W x_t − W' z_t||²`` over calibration tokens, ``z_t = x_t ⊙ m_t`` the masked input the projection sees in the
sparse model. So the kept entries (their correlations with the dropped ones) carry what the dropped entries gave.
Variants (``--variants``):

* ``full``: ``W' = W (Σ x zᵀ)(Σ z zᵀ + λ I)⁻¹``, ``λ = --ridge`` times the mean of ``Σ z zᵀ``'s diagonal.
* ``diag``: ``W' = W diag(d)``, one scale per input channel (``(WᵀW ∘ Σ z zᵀ) d = diag(WᵀW Σ x zᵀ)``): K numbers, not K².
* ``dense-target``: ``full`` with the target ``W x_t`` taken from the dense model's input at the same projection and
  token, so the fit also undoes the drift of the layers before.

Every variant fits all projections at once from one pass of the sparse model with the original weights (``--passes 2``
collects again with the refitted weights in place, targets still from the original weights). Perplexity on the first
``--max-tokens`` validation tokens, windows of 1024, top-k; calibration on ``--calibration-windows`` windows of 512
tokens after them::

    nice -n 5 .venv/bin/python benchmarks/refit_probe.py --data DATA/wiki.valid.raw --levels 0.4 \
        --output docs/results/allocation/refit_probe_valid.json
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from probe_common import load_probe, probe_parser, replaced_weights, write_output  # benchmarks/, the script's folder

from acttail_export.allocation import build_config
from acttail_export.evaluation import perplexity_windows
from acttail_export.sparsify import apply_sparsity, projection_module

VARIANTS = ("full", "diag", "dense-target")


@contextmanager
def _pre_hooks(model, config, make):
    """Pre-hooks ``make(name)`` on every projection of ``config``, removed on exit (also on an error)."""
    handles = [projection_module(model, p).register_forward_pre_hook(make(p.name)) for p in config.projections]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def dense_inputs(model, config, window: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each projection's input ``[T, K]`` (float64) in the dense model on one window."""
    out: dict[str, torch.Tensor] = {}

    def make(name):
        return lambda m, a: out.__setitem__(name, a[0].detach().double().reshape(-1, a[0].shape[-1]))

    with _pre_hooks(model, config, make), torch.inference_mode():
        model(window[None])
    return out


def collect(model, config, windows: torch.Tensor, dense_target: bool,
            weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (Σ x zᵀ, Σ z zᵀ)}`` (float64) over the windows, the config's top-k masks applied everywhere and the
    projections named in ``weights`` holding those (the dense targets always come from the model's own weights)."""
    sums: dict[str, list] = {}
    current: dict[str, torch.Tensor] = {}

    def before(name):  # registered before the masks: the unmasked x
        return lambda m, a: current.__setitem__(name, a[0].detach().double().reshape(-1, a[0].shape[-1]))

    def after(name):  # registered after the masks: z
        def hook(m, a):
            z = a[0].detach().double().reshape(-1, a[0].shape[-1])
            x = current.pop(name)
            acc = sums.setdefault(name, [0, 0])
            acc[0] = acc[0] + x.T @ z
            acc[1] = acc[1] + z.T @ z
        return hook

    for w in windows:
        target = dense_inputs(model, config, w) if dense_target else None
        first = (lambda name: lambda m, a: current.__setitem__(name, target[name])) if dense_target else before
        with _pre_hooks(model, config, first), replaced_weights(model, weights):
            hooks = apply_sparsity(model, config, "topk")
            try:
                with _pre_hooks(model, config, after), torch.inference_mode():
                    model(w[None])
            finally:
                hooks.remove()
    return {name: (a, b) for name, (a, b) in sums.items()}


def refit(weight: torch.Tensor, xz: torch.Tensor, zz: torch.Tensor, variant: str, ridge: float) -> torch.Tensor:
    """The refitted weight (float32) from the original ``weight`` ``[N, K]`` and the sums of :func:`collect`; the ridge
    pulls towards the original weight (``λ ||W' − W||²``, ``λ = ridge`` times the mean of the normal matrix's diagonal)."""
    w = weight.double()
    if variant == "diag":
        g = w.T @ w
        m = g * zz
        lam = ridge * torch.diag(m).mean()
        d = torch.linalg.solve(m + lam * torch.eye(len(m), dtype=m.dtype), (g * xz).sum(0) + lam)
        return (w * d).float()
    lam = ridge * torch.diag(zz).mean()
    reg = zz + lam * torch.eye(len(zz), dtype=zz.dtype)
    # W' = (W Σ x zᵀ + λ W) (Σ z zᵀ + λ I)⁻¹; reg is symmetric
    return torch.linalg.solve(reg, (w @ xz + lam * w).T).T.float()


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.4])
    ap.add_argument("--variants", nargs="+", default=["full", "diag"], choices=VARIANTS)
    ap.add_argument("--ridges", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--allocation", default="uniform", help="build_config's allocation (uniform, htsr, acttail, ...)")
    ap.add_argument("--calibration-windows", type=int, default=16, help="fit text: windows of 512 after the evaluation's")
    args = ap.parse_args()
    model, _, windows, calib = load_probe(args, args.calibration_windows)
    rows = []
    for level in args.levels:
        config = build_config(model, level, args.allocation, "topk")
        base = perplexity_windows(model, windows, config, "topk", progress=False)["perplexity"]
        rows.append({"variant": "none", "level": level, "allocation": args.allocation, "perplexity": base})
        print(f"none            {level:.2f}: perplexity {base:.3f}", flush=True)
        originals = {p.name: projection_module(model, p).weight.detach().clone() for p in config.projections}
        for variant in args.variants:
            for ridge in args.ridges:
                fitted: dict[str, torch.Tensor] = {}
                for step in range(args.passes):
                    sums = collect(model, config, calib, variant == "dense-target", fitted)
                    fitted = {name: refit(originals[name], *sums[name], "diag" if variant == "diag" else "full", ridge)
                              for name in originals}
                    with replaced_weights(model, fitted):
                        ppl = perplexity_windows(model, windows, config, "topk", progress=False)["perplexity"]
                    rows.append({"variant": variant, "ridge": ridge, "pass": step + 1, "level": level,
                                 "allocation": args.allocation, "perplexity": ppl, "against_none": ppl / base - 1})
                    print(f"{variant:12s} ridge {ridge:g} pass {step + 1} {level:.2f}: perplexity {ppl:.3f} "
                          f"({100 * (ppl / base - 1):+.1f} %)", flush=True)
    write_output(args, {"tokens": int(windows.numel()), "calibration_tokens": int(calib.numel()), "rows": rows})


if __name__ == "__main__":
    main()
