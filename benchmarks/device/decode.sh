#!/usr/bin/env bash
# On the CUDA machine, from the project root (after `source benchmarks/device/env.sh`): the end-to-end
# decode benchmark of docs/benchmarks.md for one model shape, fitted to one 10-minute command.
#   bash benchmarks/device/decode.sh llama2-7b   (or mistral-7b)      -> ${OUT:-runs/device}/decode_<model>-8l.json
set -o pipefail
M=${1:-llama2-7b}; R=${OUT:-runs/device}; mkdir -p "$R"; X=()
[ "$M" = llama2-7b ] && X=(--packed-qkv)
python3 benchmarks/decode.py --model "$M" --layers 8 --profile "${X[@]}" --deadline 420 --child-timeout 90 \
  --workdir "${WORKDIR:-/tmp/acttail-decode}" --output "$R/decode_$M-8l.json" 2>&1 | tail -40 | tee "$R/decode_$M-8l.log"
python3 benchmarks/decode.py --table "$R/decode_$M-8l.json" --plot "$R/decode_$M-8l.png" | head -30
