"""Shapes of the 7B–13B models the benchmarks build with random weights (one table for all scripts).

Each entry holds what fixes the projection shapes: hidden size, MLP size, layers, heads, KV heads.
"""

from __future__ import annotations

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}


def model_config(shape: str, layers: int | None = None, **overrides):
    """``LlamaConfig`` / ``MistralConfig`` of ``shape`` (``layers`` of them when given), plus ``overrides``."""
    from transformers import LlamaConfig, MistralConfig

    spec = {**SHAPES[shape], **overrides}
    if layers:
        spec["num_hidden_layers"] = layers
    return (MistralConfig if shape.startswith("mistral") else LlamaConfig)(**spec)
