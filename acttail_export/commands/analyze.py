"""``acttail-export analyze``: HT-SR alpha and sparsity budget of every projection.

Prints one row per projection (layer, kind, alpha, x_min, KS distance, budget), optionally writes
them as JSON and draws a layer × projection heatmap of alpha and of the budgets (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from ..config import ALLOCATIONS, GREEDY_ALLOCATIONS, MODES, PROJECTION_KINDS, check_sparsity, default_mode, resolve_allocation
from ..errors import ActTailError
from ._values import epsilon_flag

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    from ..allocation import DEFAULT_MAPPING, MAPPINGS

    parser = subparsers.add_parser("analyze", help="HT-SR alphas and sparsity budgets of every projection",
                                   description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="HF folder, .gguf file, Hub id, or 'smollm2' for the bundled SmolLM2-135M-Instruct (the default)")
    model.add_argument("--device", default=None, metavar="{cpu,cuda,cuda:N}",
                       help="device for the SVDs: cpu, cuda or cuda:N (default: CUDA when available, else CPU)")

    budget = parser.add_argument_group("budgets")
    budget.add_argument("--sparsity", default="0.5", help="target (parameter-weighted mean) sparsity (default: 0.5)")
    budget.add_argument("--allocation", default="htsr", choices=[a for a in ALLOCATIONS if a not in GREEDY_ALLOCATIONS],
                        help="budget allocation (default: htsr, the budgets of the alphas; acttail, the export default, "
                             "is a greedy search below 85 %% in top-k mode and at every level in threshold mode, and the "
                             "greedy allocations need calibration text: use export or evaluate for those)")
    budget.add_argument("--mode", default=None, choices=MODES,
                        help="activation sparsity mode: k per projection in top-k mode, and the method --allocation "
                             "acttail resolves to (default: the export's, by the target: threshold up to 65 %%, topk above)")
    budget.add_argument("--epsilon", default=None, help="ActTail spread epsilon in [0, 1) (default: allocation.DEFAULT_EPSILON)")
    budget.add_argument("--mapping", default=None,
                        help=f"alpha-to-budget mapping: {', '.join(MAPPINGS)} (default: {DEFAULT_MAPPING})")

    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="FILE", help="write fits and budgets as JSON")
    out.add_argument("--plot", default=None, metavar="FILE.png", help="draw a layer × projection heatmap of alpha and sparsity")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _output_path(value: str | None, flag: str, suffix: str | None = None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise ActTailError(f"{flag} {path} is a directory: pass a file path")
    if not path.parent.exists():
        raise ActTailError(f"{flag} folder {path.parent} does not exist: create it first")
    if suffix and path.suffix.lower() != suffix:
        raise ActTailError(f"{flag} must name a {suffix} file, got {path.name}")
    return path


def _check_device(device: str) -> None:
    """cpu, cuda or cuda:N (a visible GPU), as a one-line ActTailError instead of a torch traceback."""
    from ..onnx_export import check_device

    kind, colon, index = device.partition(":")
    if not colon and device in ("cpu", "cuda"):
        check_device(device)
        return
    if kind != "cuda" or not index.isdigit():
        raise ActTailError(f"--device must be cpu, cuda or cuda:N; got {device!r}")
    check_device("cuda")
    import torch

    if int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ActTailError(f"--device {device}: PyTorch sees {count} CUDA GPU(s); use cuda:0..cuda:{count - 1}")


def plot_heatmaps(rows: list[dict], path: Path, title: str) -> None:
    """Two heatmaps (alpha, sparsity) with layers as rows and projection kinds as columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = max(r["layer"] for r in rows) + 1
    grids = {key: np.full((layers, len(PROJECTION_KINDS)), np.nan) for key in ("alpha", "sparsity")}
    for r in rows:
        for key, grid in grids.items():
            grid[r["layer"], PROJECTION_KINDS.index(r["kind"])] = r[key]
    fig, axes = plt.subplots(1, 2, figsize=(10, max(3.0, 0.22 * layers + 1.5)), constrained_layout=True)
    for ax, (key, grid), cmap in zip(axes, grids.items(), ("viridis", "magma")):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(PROJECTION_KINDS)), [k.replace("_proj", "") for k in PROJECTION_KINDS])
        ax.set_ylabel("layer")
        ax.set_title("HT-SR alpha" if key == "alpha" else "sparsity budget")
        fig.colorbar(image, ax=ax)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    sparsity = check_sparsity(args.sparsity, "--sparsity")
    if args.mode is None:
        args.mode = default_mode(sparsity)
    method = resolve_allocation(args.allocation, sparsity, args.mode)
    if method in GREEDY_ALLOCATIONS:
        raise ActTailError(f"--allocation {args.allocation} at {sparsity:g} in {args.mode} mode is {method}, a greedy search on "
                           "calibration text: run `acttail-export evaluate` or `export` for its budgets, or use --allocation htsr here")
    epsilon = epsilon_flag(args.epsilon)
    from ..allocation import check_mapping
    from ..options import check_allocation_shape

    mapping = None if args.mapping is None else check_mapping(args.mapping, "--mapping")
    check_allocation_shape(args.allocation, sparsity, args.mode, epsilon, mapping, alternatives="htsr")  # no greedy here
    json_path = _output_path(args.json, "--json")
    plot_path = _output_path(args.plot, "--plot", ".png")
    if args.device is not None:
        _check_device(args.device)

    from ..allocation import build_config
    from ..modeling import default_model_path, load_model, resolve_model
    from ..spectral import analyze_model

    model_ref = resolve_model(args.model or default_model_path())  # alias expanded, local paths absolute
    model, _ = load_model(model_ref)
    fits = analyze_model(model, device=args.device, progress=not args.no_progress)
    config = build_config(model, sparsity, allocation=args.allocation, mode=args.mode, epsilon=epsilon, mapping=mapping,
                          fits=fits)
    rows = []
    for p in config.projections:
        fit = fits[p.name]
        rows.append({"name": p.name, "layer": p.layer, "kind": p.kind, "in_features": p.in_features, "out_features": p.out_features,
                     **fit.to_dict(), "sparsity": p.sparsity, "k": p.k})

    print(f"{'projection':<36} {'alpha':>7} {'x_min':>10} {'KS':>6} {'n_tail':>6} {'sparsity':>8}")
    for r in rows:
        print(f"{r['name']:<36} {r['alpha']:7.3f} {r['x_min']:10.4g} {r['ks_distance']:6.3f} {r['n_tail']:6d} {r['sparsity']:8.4f}")
    shape = "" if config.mapping is None else f", mapping {config.mapping}, epsilon {config.epsilon}"
    print(f"allocation {config.allocation}{shape}: weighted sparsity {config.weighted_sparsity():.6f} (target {sparsity})")

    if json_path is not None:
        payload = {"model": str(model_ref), "allocation": config.allocation, "allocation_method": config.allocation_method,
                   "mode": config.mode, "mapping": config.mapping, "epsilon": config.epsilon,
                   "target_sparsity": sparsity, "weighted_sparsity": config.weighted_sparsity(), "projections": rows}
        json_path.write_text(json.dumps(payload, indent=1) + "\n")
        logger.info("wrote %s", json_path)
    if plot_path is not None:
        shape = "" if config.mapping is None else f" {config.mapping} ε={config.epsilon:g}"
        title = f"{Path(str(model_ref)).name}: {config.allocation}{shape}, target {sparsity:g}"
        plot_heatmaps(rows, plot_path, title)
        logger.info("wrote %s", plot_path)
    if not all(math.isfinite(r["alpha"]) for r in rows):  # fit_power_law raises on degenerate spectra
        raise ActTailError("non-finite alpha in the analysis")  # pragma: no cover
