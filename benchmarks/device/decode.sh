#!/usr/bin/env bash
# On the CUDA machine, from the project root (after `source benchmarks/device/env.sh`): the end-to-end
# decode benchmark of docs/benchmarks.md for one model shape, fitted to one 10-minute command.
#   bash benchmarks/device/decode.sh llama2-7b [--pack]   (or mistral-7b)  -> ${OUT:-runs/device}/decode_<model>-8l[-packed].json
# Extra arguments go to benchmarks/decode.py (--pack: q/k/v and gate/up packed, one SparseMatMul per input group).
set -o pipefail
M=${1:-llama2-7b}; shift || true; R=${OUT:-runs/device}; mkdir -p "$R"; X=(); TAG=""
[ "$M" = llama2-7b ] && X=(--packed-qkv)
case " $* " in *" --pack "*) TAG="-packed";; esac
python3 benchmarks/decode.py --model "$M" --layers 8 --profile "${X[@]}" "$@" --deadline 420 --child-timeout 90 \
  --workdir "${WORKDIR:-/tmp/acttail-decode}" --output "$R/decode_$M-8l$TAG.json" 2>&1 | tail -40 | tee "$R/decode_$M-8l$TAG.log"
python3 benchmarks/decode.py --table "$R/decode_$M-8l$TAG.json" --plot "$R/decode_$M-8l$TAG.png" | head -30
