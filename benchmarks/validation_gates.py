"""What the export's validation gates see on healthy models: forced-mask top-1 agreement and effective sparsity.

Exports tiny random Llama / Mistral models (hidden 64, 2 layers, SmolLM2's tokenizer) in both modes and prints,
per export, the validation record of ``acttail_config.json``: forced-mask top-1 agreement (gated by
``validate.TOP1_FLOOR``), effective vs target sparsity (gated in threshold mode by
``validate.SPARSITY_TOLERANCE``) and the relative errors. One JSON object per line.

    python benchmarks/validation_gates.py --calibration-data wiki.valid.raw
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def save_tiny(architecture: str, folder: Path, seed: int) -> Path:
    """A random 2-layer model with SmolLM2's tokenizer, saved with ``save_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    from acttail_export.modeling import default_model_path, load_tokenizer

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=True)
    config = (LlamaConfig(**common, architectures=["LlamaForCausalLM"]) if architecture == "llama" else
              MistralConfig(**common, sliding_window=None, architectures=["MistralForCausalLM"]))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    load_tokenizer(default_model_path()).save_pretrained(folder)
    return folder


def main() -> None:
    from acttail_export.exporter import export
    from acttail_export.validate import SPARSITY_TOLERANCE, TOP1_FLOOR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-data", required=True, type=Path)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print(json.dumps({"top1_floor": TOP1_FLOOR, "sparsity_tolerance": SPARSITY_TOLERANCE}))
    with tempfile.TemporaryDirectory() as work:
        for arch in ("llama", "mistral"):
            for seed in args.seeds:
                model = save_tiny(arch, Path(work) / f"{arch}-{seed}", seed)
                for mode in ("topk", "threshold"):
                    for sparsity in args.sparsities:
                        out = Path(work) / f"out-{arch}-{seed}-{mode}-{sparsity}"
                        export(str(model), out, sparsity=sparsity, mode=mode, calibration_data=args.calibration_data,
                               calibration_samples=2, sequence_length=32, progress=False, eval_tokens=0)
                        config = json.loads((out / "acttail_config.json").read_text())
                        v = config["perplexity"]["validation"]
                        print(json.dumps({"arch": arch, "seed": seed, "mode": mode, "target": sparsity,
                                          "effective": round(config["effective_sparsity"], 4),
                                          "forced_top1": v["forced_top1_agreement"], "free_top1": v["top1_agreement"],
                                          "forced_rel_error": v["forced_mask_rel_error"],
                                          "projection_rel_error": v["projection_rel_error"]}), flush=True)


if __name__ == "__main__":
    main()
