"""Check an installed acttail-export wheel from outside the source tree (CI runs it through scripts/wheel_smoke.sh).

The package and its op library must come from the installed wheel (not a clone); a tiny random Llama is exported with
the fused kernel and with the mask kernel (top-k 50 %), both folders load in ONNX Runtime through the runtime loader,
and their logits agree. Top-k masks are the same rule in both graphs, so the two differ only by float rounding, which
can flip a near tie: the bar is top-1 agreement >= 90 % and a median relative logit difference <= 1e-4 (measured on
this model: identical top-1 and ~1e-7).

    python scripts/wheel_smoke.py --calibration-data TEXT [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path


def _tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from acttail_export.modeling import default_model_path, load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    load_tokenizer(default_model_path()).save_pretrained(folder)
    return folder


def _logits(export_dir: Path, ids):
    from acttail_export.runtime import create_session, decoder_feeds

    session = create_session(export_dir)
    return session.run(["logits"], decoder_feeds(session, ids))[0][0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration-data", required=True, help="a text file (e.g. wiki.valid.raw)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)

    import numpy as np

    import acttail_export
    from acttail_export import ops
    from acttail_export.exporter import export

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    package, library = Path(acttail_export.__file__).resolve(), Path(ops.get_library_path()).resolve()
    print(f"package: {package}\nop library: {library}")
    if site not in package.parents or site not in library.parents:
        print(f"wheel_smoke: acttail_export and its op library must come from {site} (the installed wheel)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        model = _tiny_llama(work / "tiny-llama")
        settings = dict(sparsity=0.5, mode="topk", calibration_data=args.calibration_data, calibration_samples=2,
                        sequence_length=32, eval_tokens=0, progress=False)
        fused = export(str(model), work / "fused", kernel="fused", **settings)
        mask = export(str(model), work / "mask", kernel="mask", **settings)
        ids = np.random.default_rng(0).integers(3, 49152, size=(1, 16))
        a, b = _logits(fused, ids), _logits(mask, ids)
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    rel = float(np.median(np.abs(a - b).max(-1) / np.abs(b).max(-1)))
    print(f"fused vs mask export: top-1 agreement {top1:.3f}, median relative logit difference {rel:.2e}")
    if top1 < 0.9 or rel > 1e-4:
        print("wheel_smoke: the fused export does not match the mask export", file=sys.stderr)
        return 1
    print("wheel_smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
