# Source on the CUDA machine, from the project root: puts onnxruntime-gpu, the decode wheels and the
# project on PYTHONPATH and builds the op library and the kernel harness (build/ops/libacttail_bench.so) for
# this GPU unless they are built from the current csrc/.
#   ORT_GPU_DIR   folder holding onnxruntime-gpu (default $HOME/ortgpu; empty: use the installed one)
#   CUDA_ARCH     compute capability to build for (default 90)
ORT_GPU_DIR=${ORT_GPU_DIR-$HOME/ortgpu}
# one environment: the image's transformers 5 runs the pipeline and onnxruntime-genai's builder (in-process); from
# .whl/site only gguf is taken (the optimum extra's transformers 4 wheels there would shadow the image's 5.x)
[ -d .whl/site ] && { [ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/site/gguf-*.whl; }
[ -d .whl/genai ] && { [ -d /tmp/genai/onnxruntime_genai ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/genai .whl/genai/*.whl; }
export PYTHONPATH=/tmp/site:/tmp/genai${ORT_GPU_DIR:+:$ORT_GPU_DIR}:$PWD
[ -n "$ORT_GPU_DIR" ] && [ -f "$ORT_GPU_DIR/env.sh" ] && source "$ORT_GPU_DIR/env.sh"
# (re)build when the library is missing or was built from other sources: a warm machine keeps ignored
# build outputs between calls, so a library built before a change to csrc/ would otherwise be reused
SRC_SUM=$(find csrc CMakeLists.txt -type f | sort | xargs cat | sha1sum | cut -c1-40)
if [ ! -f acttail_export/lib/libacttail_ops.so ] || [ "$(cat acttail_export/lib/.csrc.sha1 2>/dev/null)" != "$SRC_SUM" ]; then
  ACTTAIL_CUDA=1 ACTTAIL_BENCH=1 ACTTAIL_CUDA_ARCHS=${CUDA_ARCH:-90} ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR:-$PWD/third_party/onnxruntime/include} \
    bash scripts/build_ops.sh > /tmp/acttail_build_ops.log 2>&1 || { tail -5 /tmp/acttail_build_ops.log; return 1 2>/dev/null || exit 1; }
  echo "$SRC_SUM" > acttail_export/lib/.csrc.sha1
fi
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
