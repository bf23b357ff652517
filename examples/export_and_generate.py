"""Export SmolLM2-135M with 50% ActTail sparsity and generate with ONNX Runtime (CPU or CUDA).

    .venv/bin/python examples/export_and_generate.py [OUTPUT_DIR]            # CPU execution provider
    .venv/bin/python examples/export_and_generate.py [OUTPUT_DIR] --cuda     # needs onnxruntime-gpu and `make ops`

Same as ``acttail-export export --model smollm2 --sparsity 0.5 OUTPUT_DIR`` followed by generation.
With ``--cuda`` the export uses the fused ``SparseMatMul`` op (CUDA kernels) in threshold mode and
runs on ``CUDAExecutionProvider``.
"""

import sys

from transformers import AutoTokenizer

from acttail_export.exporter import export
from acttail_export.runtime import load_model

args = [a for a in sys.argv[1:] if not a.startswith("--")]
cuda = "--cuda" in sys.argv[1:]
output_dir = args[0] if args else "smollm2-acttail-50"
if cuda:
    export("smollm2", output_dir, sparsity=0.5, mode="threshold", kernel="fused", overwrite=True)
else:
    export("smollm2", output_dir, sparsity=0.5, mode="topk", kernel="mask", overwrite=True)

model = load_model(output_dir, provider="CUDAExecutionProvider" if cuda else "CPUExecutionProvider")  # KV cache
tokenizer = AutoTokenizer.from_pretrained(output_dir)
messages = [{"role": "user", "content": "What is the capital of France?"}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
