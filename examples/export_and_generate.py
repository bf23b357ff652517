"""Export SmolLM2-135M with 50% ActTail sparsity and generate with ONNX Runtime.

    .venv/bin/python examples/export_and_generate.py [OUTPUT_DIR]

Same as ``acttail-export export --model smollm2 --sparsity 0.5 OUTPUT_DIR`` followed by generation.
"""

import sys

from transformers import AutoTokenizer

from acttail_export.exporter import export
from acttail_export.runtime import load_model

output_dir = sys.argv[1] if len(sys.argv) > 1 else "smollm2-acttail-50"
export("smollm2", output_dir, sparsity=0.5, mode="topk", kernel="mask", overwrite=True)

model = load_model(output_dir)  # ORTModelForCausalLM with KV cache
tokenizer = AutoTokenizer.from_pretrained(output_dir)
messages = [{"role": "user", "content": "What is the capital of France?"}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
