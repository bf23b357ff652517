"""Tiny broken models for tests/test_malformed.py: a good tiny checkpoint copied with one thing changed.

Every function takes a good ``save_pretrained`` folder (``tests/conftest.py``'s tiny Llama / Mistral,
SmolLM2's tokenizer) and writes a new folder; the source is never modified.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

WEIGHTS = "model.safetensors"
#: The tensors of each kind the pipeline reads (layer 1 where there is a layer), by short name.
TENSORS = {
    "q": "model.layers.1.self_attn.q_proj.weight", "k": "model.layers.1.self_attn.k_proj.weight",
    "v": "model.layers.1.self_attn.v_proj.weight", "o": "model.layers.1.self_attn.o_proj.weight",
    "gate": "model.layers.1.mlp.gate_proj.weight", "up": "model.layers.1.mlp.up_proj.weight",
    "down": "model.layers.1.mlp.down_proj.weight", "input_norm": "model.layers.1.input_layernorm.weight",
    "post_norm": "model.layers.1.post_attention_layernorm.weight", "final_norm": "model.norm.weight",
    "embed": "model.embed_tokens.weight",
}
PROJECTION_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A copy of the folder ``src`` at ``dst`` without the files named in ``skip``."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copy2(item, dst / item.name)
    return dst


def edit_weights(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(tensors)`` applied to its safetensors weights (in place on the dict)."""
    from safetensors.torch import load_file, save_file

    copy_model(src, dst, skip=(WEIGHTS,))
    tensors = load_file(str(src / WEIGHTS))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / WEIGHTS), metadata={"format": "pt"})
    return dst


def poke(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    """Set one element of tensor ``name`` (near its middle) to ``value`` (NaN, Inf, ...)."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        flat = tensors[name].flatten().clone()
        flat[flat.numel() // 2] = value
        tensors[name] = flat.view(tensors[name].shape)
    return edit


def fill(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    """Set every element of tensor ``name`` to ``value``."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.full_like(tensors[name], value)
    return edit


def rank_one(*names: str) -> Callable[[dict[str, torch.Tensor]], None]:
    """Replace each named 2-D tensor by a rank-1 matrix u vᵀ of the same shape (one non-zero singular value)."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(1)
        for name in names:
            rows, cols = tensors[name].shape
            tensors[name] = torch.outer(torch.randn(rows, generator=gen), torch.randn(cols, generator=gen)) * 0.05
    return edit


def all_projections(edit_one: Callable[[str], Callable], layers: int = 2) -> Callable[[dict[str, torch.Tensor]], None]:
    """Apply ``edit_one(name)`` to every projection weight of every layer."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for layer in range(layers):
            for kind in PROJECTION_KINDS:
                part = "self_attn" if kind in ("q", "k", "v", "o") else "mlp"
                edit_one(f"model.layers.{layer}.{part}.{kind}_proj.weight")(tensors)
    return edit


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    """Rewrite the JSON file ``path`` with ``edit(data)`` applied (its return value, if not None, replaces data)."""
    data = json.loads(path.read_text())
    result = edit(data)
    path.write_text(json.dumps(data if result is None else result))


def with_config(src: Path, dst: Path, **changes) -> Path:
    """Copy ``src`` with ``config.json`` keys changed (e.g. ``max_position_embeddings``).

    ``rope_theta`` goes where the saved config keeps it: top level (transformers 4) or ``rope_parameters`` (5).
    """
    def update(data: dict) -> None:
        rope = data.get("rope_parameters")
        if "rope_theta" in changes and isinstance(rope, dict) and "rope_theta" in rope:
            rope["rope_theta"] = changes["rope_theta"]
            data.update({k: v for k, v in changes.items() if k != "rope_theta"})
        else:
            data.update(changes)

    copy_model(src, dst)
    edit_json(dst / "config.json", update)
    return dst


def small_vocab(src: Path, dst: Path, vocab: int = 1000) -> Path:
    """A model whose embedding has ``vocab`` rows, saved with ``src``'s (larger) tokenizer."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:vocab].clone()
    edit_weights(src, dst, edit)
    edit_json(dst / "config.json", lambda data: data.update(vocab_size=vocab))
    return dst
