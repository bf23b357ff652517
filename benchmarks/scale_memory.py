"""Pipeline steps at 7B–13B scale: time, host peak RSS and per-GPU peak memory of every step.

Two tasks (random weights, built on the GPUs, never in host memory):

    # LLaMA-2-13B-shaped model split over two GPUs by accelerate (max_memory per GPU):
    # build, HT-SR analysis, allocation, threshold calibration, sparse perplexity
    python benchmarks/scale_memory.py sharded --shape llama2-13b --max-memory-gib 16 \
        --tokenizer TOKENIZER_DIR --data wiki.valid.raw --output docs/results/scale_sharded_13b_2xh200.json

    # LLaMA-2-7B-shaped model (N layers, fp16) through the whole exporter on cuda, with the
    # peak RSS of every stage (the weights must never be held twice in host memory)
    python benchmarks/scale_memory.py export --shape llama2-7b --layers 8 \
        --tokenizer TOKENIZER_DIR --data wiki.valid.raw --output docs/results/scale_export_7b_h200.json

    # the real SmolLM2-135M through the exporter on the CPU (this machine), same per-stage figures
    python benchmarks/scale_memory.py export --model smollm2 --device cpu --output docs/results/scale_export_smollm2_cpu.json

The tokenizer folder may be any LLaMA-style tokenizer (the runs in docs/scale.md used SmolLM2's,
so the vocabulary is 49,152 tokens instead of 32,000; the projections, which are what is analysed,
calibrated and exported, have exactly the named shapes).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shapes import SHAPES, model_config  # noqa: E402

GIB = 2**30


def _random_config(args, tokenizer):
    """Config of the random model named by ``--shape`` / ``--layers``, with the tokenizer's vocabulary."""
    return model_config(args.shape, args.layers, vocab_size=len(tokenizer), max_position_embeddings=4096, torch_dtype="float16")


def build_sharded(config, max_memory_gib: float):
    """Random fp16 model dispatched over every visible GPU, each parameter created on its GPU."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16)
    gpus = torch.cuda.device_count()
    max_memory = {i: f"{max_memory_gib}GiB" for i in range(gpus)}
    layer_class = type(model.model.layers[0]).__name__
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=[layer_class], dtype=torch.float16)
    if any(d in ("cpu", "disk") for d in device_map.values()):
        raise SystemExit(f"the model does not fit {gpus} GPU(s) x {max_memory_gib} GiB: raise --max-memory-gib")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, param in model.named_parameters():
        prefix = max((k for k in device_map if name == k or name.startswith(k + ".") or k == ""), key=len)
        device = torch.device(f"cuda:{device_map[prefix]}" if isinstance(device_map[prefix], int) else device_map[prefix])
        value = torch.empty(param.shape, dtype=torch.float16, device=device)
        value.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(int(torch.randint(1 << 30, (1,), generator=gen))))
        if name.endswith("norm.weight"):
            value.fill_(1.0)
        set_module_tensor_to_device(model, name, device, value=value)
    model = dispatch_model(model, device_map=device_map)
    return model.eval(), device_map


def resident_gib(model) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in model.parameters():
        out[str(p.device)] = out.get(str(p.device), 0.0) + p.numel() * p.element_size() / GIB
    return {k: round(v, 2) for k, v in sorted(out.items())}


def step(rows: list, name: str, fn):
    from acttail_export.offload import PeakMemory

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(gpus):
        torch.cuda.synchronize(i)
    start = time.perf_counter()
    with PeakMemory.sampled() as peak:
        result = fn()
        for i in range(gpus):
            torch.cuda.synchronize(i)
    row = {"step": name, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(peak.host_rss_mib / 1024, 2),
           "gpu_peak_gib": {k: round(v / 1024, 2) for k, v in peak.gpu_peak_mib.items()}}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return result


def run_sharded(args) -> dict:
    from transformers import AutoTokenizer

    from acttail_export import allocation, calibration, spectral
    from acttail_export.data import load_windows
    from acttail_export.evaluation import perplexity_windows

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = _random_config(args, tokenizer)
    rows: list = []
    model, device_map = step(rows, "build (random weights on the GPUs)", lambda: build_sharded(config, args.max_memory_gib))
    fits = step(rows, f"HT-SR analysis ({args.method})", lambda: spectral.analyze_model(model, progress=False, method=args.method))
    acttail = step(rows, "allocation", lambda: allocation.build_config(model, args.sparsity, allocation="htsr", mode="threshold", fits=fits))
    step(rows, f"calibration ({args.samples} x {args.sequence_length} tokens)", lambda: calibration.calibrate(
        model, tokenizer, acttail, data=args.data, samples=args.samples, sequence_length=args.sequence_length, progress=False))
    windows = load_windows(tokenizer, args.data, args.sequence_length, max_tokens=4 * args.sequence_length)
    ppl = step(rows, "sparse perplexity (4 windows)", lambda: perplexity_windows(model, windows, acttail, "threshold", progress=False))
    layer = model.model.layers[0]
    layer_gib = sum(p.numel() * p.element_size() for p in layer.parameters()) / GIB
    return {"task": "sharded", "shape": args.shape, "layers": config.num_hidden_layers, "vocab": config.vocab_size,
            "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "max_memory_gib_per_gpu": args.max_memory_gib, "resident_weights_gib": resident_gib(model),
            "one_layer_gib": round(layer_gib, 3), "device_map_layers": {str(d): sum(1 for k, v in device_map.items() if v == d and ".layers." in k)
                                                                        for d in set(device_map.values())},
            "matrices": len(fits), "alpha_median": round(float(torch.tensor([f.alpha for f in fits.values()]).median()), 3),
            "effective_sparsity": round(ppl["effective_sparsity"], 4), "perplexity": round(ppl["perplexity"], 2),
            "steps": rows}


class _StageRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.stages: list[dict] = []

    def emit(self, record):
        if hasattr(record, "acttail_stage"):
            self.stages.append(record.acttail_stage)
            print(json.dumps(record.acttail_stage), flush=True)


def run_export(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer


    work = Path(tempfile.mkdtemp(prefix="acttail-scale-"))
    rows: list = []
    if args.model:
        from acttail_export.exporter import resolve_model
        from acttail_export.modeling import resolve_model_ref

        model_ref = resolve_model(args.model)
        checkpoint = Path(resolve_model_ref(model_ref))  # GGUF: the dequantized fp32 checkpoint in the cache
        weights_gib = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / GIB
        return _export_and_report(args, model_ref, weights_gib, work, rows, dtype="fp32", label=args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = _random_config(args, tokenizer)
    folder = work / "model"

    dtype = "fp16" if args.device == "cuda" else "fp32"

    def save_random():  # from the GPU the host holds one tensor at a time
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16 if dtype == "fp16" else torch.float32)
        model.save_pretrained(folder, max_shard_size="2GB")
        tokenizer.save_pretrained(folder)
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
        del model
        torch.cuda.empty_cache()
        return size

    weights_gib = step(rows, "write random checkpoint", save_random)
    return _export_and_report(args, folder, weights_gib, work, rows, dtype=dtype, label=f"{args.shape} random, {config.num_hidden_layers} layers")


def _export_and_report(args, folder, weights_gib: float, work: Path, rows: list, dtype: str, label: str) -> dict:
    from acttail_export.exporter import export

    handler = _StageRecords()
    logging.getLogger("acttail_export.exporter").addHandler(handler)
    logging.getLogger("acttail_export.exporter").setLevel(logging.INFO)
    out = work / "export"
    step(rows, "export (all stages)", lambda: export(str(folder), out, sparsity=args.sparsity, mode="threshold", kernel=args.kernel,
                                                     dtype=dtype, device=args.device, calibration_data=args.data,
                                                     calibration_samples=args.samples, sequence_length=args.sequence_length,
                                                     validate=False, eval_tokens=0, progress=False))
    files = {p.name: round(p.stat().st_size / GIB, 3) for p in out.iterdir() if p.stat().st_size > 2**20}
    shutil.rmtree(work, ignore_errors=True)
    return {"task": "export", "model": label, "device": args.device,
            "kernel": args.kernel, "weights_gib": round(weights_gib, 2),
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "host_memory_gib": round(__import__("psutil").virtual_memory().total / GIB, 1),
            "output_files_gib": files, "exporter_stages": handler.stages,
            "peak_rss_over_weights": {s["stage"]: round(s["peak_rss_mib"] / 1024 / weights_gib, 2) for s in handler.stages},
            "process_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "steps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("sharded", "export"))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (default: all)")
    parser.add_argument("--max-memory-gib", type=float, default=16.0, help="sharded: max_memory per GPU")
    parser.add_argument("--method", choices=("svd", "gram"), default="gram", help="eigenvalue method of the analysis")
    parser.add_argument("--kernel", choices=("mask", "fused"), default="fused")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--model", default=None, help="export: a real model (folder / .gguf / smollm2) instead of a random shape")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="export: where the model runs")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for the random models")
    parser.add_argument("--data", default=None, help="calibration text (default: WikiText-2 validation)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if (args.task == "sharded" or args.device == "cuda") and not torch.cuda.is_available():
        raise SystemExit("this task needs a CUDA GPU (export --model M --device cpu runs without one)")
    if args.model is None and args.tokenizer is None:
        raise SystemExit("random models need --tokenizer DIR")
    if args.data is None:
        from acttail_export.data import DEFAULT_CALIBRATION_DATA

        args.data = str(DEFAULT_CALIBRATION_DATA)
    logging.basicConfig(level=logging.WARNING)
    result = run_sharded(args) if args.task == "sharded" else run_export(args)
    line = json.dumps(result)
    print(line)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
