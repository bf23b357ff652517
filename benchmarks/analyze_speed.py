"""Time the HT-SR analysis (eigenvalues + power-law fit of every projection).

    # SmolLM2-135M (210 matrices) on this CPU; goal < 60 s (1 thread is fastest on a busy 2-core box)
    .venv/bin/python benchmarks/analyze_speed.py --threads 1 --output docs/results/allocation_analyze_speed_smollm2_cpu.json
    # LLaMA-2-7B-shaped random model (224 matrices of 4096×4096 / 4096×11008) on a GPU
    .venv/bin/python benchmarks/analyze_speed.py --shape llama2-7b --device cuda
    # the same shapes on CPU, first 2 layers only
    .venv/bin/python benchmarks/analyze_speed.py --shape llama2-7b --layers 2

Prints one JSON line and, with ``--output``, writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acttail_export.modeling import default_model_path, iter_projections, load_model  # noqa: E402
from acttail_export.spectral import analyze_model, eigenvalues, fit_power_law  # noqa: E402
from benchmarks.shapes import SHAPES, model_config  # noqa: E402


def random_model(shape: str, layers: int | None, device: str):
    """Model of the given shape with random weights (small vocabulary: embeddings are not analysed)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape, layers, vocab_size=256)).to(dtype)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder / .gguf / Hub id (default: SmolLM2-135M GGUF)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="use a random model of this shape instead")
    parser.add_argument("--layers", type=int, default=None, help="limit the random model to this many layers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--method", choices=("svd", "gram"), default="svd", help="eigenvalues: svdvals of W or eigvalsh of the Gram matrix")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.shape:
        model = random_model(args.shape, args.layers, args.device)
        label = f"{args.shape} random ({model.config.num_hidden_layers} layers)"
    else:
        model, _ = load_model(args.model or default_model_path())
        model = model.to(args.device)
        if args.layers is not None:
            model.model.layers = model.model.layers[: args.layers]
        label = args.model or "SmolLM2-135M-Instruct (GGUF)"

    projections = iter_projections(model)
    # split the time: SVD vs fit, on the first matrix, then the whole analysis end to end
    first = projections[0][3].weight
    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    eigs = eigenvalues(first, device=args.device, method=args.method)
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    fit_power_law(eigs, device=args.device if cuda else None)
    t2 = time.perf_counter()
    # the other eigenvalue method on the first matrices: same alphas?
    other = "gram" if args.method == "svd" else "svd"
    alpha_diff = max(abs(fit_power_law(eigenvalues(m.weight, device=args.device, method=args.method)).alpha
                         - fit_power_law(eigenvalues(m.weight, device=args.device, method=other)).alpha)
                     / fit_power_law(eigenvalues(m.weight, device=args.device, method="svd")).alpha
                     for *_, m in projections[:7])

    start = time.perf_counter()
    fits = analyze_model(model, device=args.device, progress=False, method=args.method)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - start

    result = {
        "model": label,
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "matrices": len(fits),
        "seconds_total": round(total, 2),
        "seconds_per_matrix": round(total / len(fits), 4),
        "method": args.method,
        "first_matrix_eigenvalues_s": round(t1 - t0, 4),
        "first_matrix_fit_s": round(t2 - t1, 4),
        f"alpha_max_rel_diff_vs_{other}_first_7": float(f"{alpha_diff:.3g}"),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "alpha_median": round(float(torch.tensor([f.alpha for f in fits.values()]).median()), 3),
    }
    line = json.dumps(result)
    print(line)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(line + "\n")


if __name__ == "__main__":
    main()
