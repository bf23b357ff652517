#!/usr/bin/env bash
# On the CUDA machine, from the project root (after `source benchmarks/device/env.sh`): the folders
# `acttail-export export` writes for a full-size shape, timed against onnxruntime-genai's fp16 dense model
# and its int4 model (builder -p int4) in the same call (docs/benchmarks.md). One 10-minute command per
# weight format; the Hugging Face folder and the two builder models stay in $WORKDIR between calls (built
# once, timed again in every call), each export is deleted after its run (13 GB at 7B fp16).
#   bash benchmarks/device/exporter.sh llama2-7b float 0.5 0.8   -> ${OUT:-runs/device}/exporter_llama2-7b_float_0.5-0.8.json
#   bash benchmarks/device/exporter.sh llama2-7b int4 0 0.5 0.8
# ALLOC (default acttail) is the exporter's --allocation; extra benchmark flags go in DECODE_FLAGS.
set -o pipefail
M=$1; W=$2; shift 2; R=${OUT:-runs/device}; mkdir -p "$R"
NAME="exporter_${M}_${W}_$(echo "$@" | tr ' ' '-')"
# shellcheck disable=SC2086
python3 benchmarks/decode.py --model "$M" --pack --backends genai-dense genai-int4 acttail-export --sparsity 0 \
  --topk-sparsity --cuda-graph on --export-weights "$W" --export-sparsity "$@" --export-allocation ${ALLOC:-acttail} \
  --deadline "${DEADLINE:-540}" --export-margin "${MARGIN:-200}" --child-timeout 150 ${DECODE_FLAGS:-} \
  --workdir "${WORKDIR:-$HOME/work}" --output "$R/$NAME.json" 2>&1 | tail -40 | tee "$R/$NAME.log"
df -h "${WORKDIR:-$HOME/work}" | tail -1
