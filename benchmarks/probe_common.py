"""What the validation probes of docs/allocation.md section 6o share: their common flags, SmolLM2, the evaluation
windows (the first ``--max-tokens`` tokens, windows of 1024) and calibration windows of 512 tokens taken after them."""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with ``--data``, ``--max-tokens``, ``--threads`` and ``--output``; the probe adds its own flags."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="WikiText-2 wiki.valid.raw")
    ap.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens (windows of 1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path)
    return ap


def load_probe(args: argparse.Namespace, calibration_windows: int = 0):
    """(model, tokenizer, evaluation windows, calibration windows of 512 tokens after them; None when not asked for)."""
    import torch

    from acttail_export.data import load_windows
    from acttail_export.modeling import default_model_path, load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(default_model_path())
    windows = load_windows(tokenizer, args.data, 1024, max_tokens=args.max_tokens)
    calib = None
    if calibration_windows:
        skip = args.max_tokens // 512
        calib = load_windows(tokenizer, args.data, 512, max_tokens=(skip + calibration_windows) * 512)[skip:]
    return model, tokenizer, windows, calib


def write_output(args: argparse.Namespace, out: dict) -> None:
    if args.output:
        args.output.write_text(json.dumps(out, indent=1) + "\n")


@contextmanager
def replaced_weights(model, weights: dict):
    """Inside the block, the projections named in ``weights`` (``{name: tensor}``, names as ``model.get_submodule``
    takes them) hold those weights; their own weights come back afterwards, also on an error."""
    import torch

    modules = {name: model.get_submodule(name) for name in weights}
    saved = {name: module.weight.detach().clone() for name, module in modules.items()}
    with torch.no_grad():
        for name, w in weights.items():
            modules[name].weight.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                modules[name].weight.copy_(w)


def run_windows(model, windows, handles: list) -> None:
    """Run the model over each window (no grad) with forward hooks in place, and remove the hooks afterwards, also on an
    error (the hooks record what a probe measures)."""
    import torch

    try:
        with torch.inference_mode():
            for w in windows:
                model(w[None])
    finally:
        for h in handles:
            h.remove()
