#!/usr/bin/env bash
# On the CUDA machine, from the project root (after `source benchmarks/device/env.sh`): the kernel
# benchmarks of docs/kernels.md. JSON + logs in ${OUT:-runs/device}/bench/{rotating,hot,prefill}.
set -o pipefail
R=${OUT:-runs/device}/bench; H=${HARNESS:-build/dev/libacttail_bench.so}; t0=$(date +%s)
mkdir -p "$R/rotating" "$R/hot" "$R/prefill"
echo "== decode, x rotated, with the ONNX Runtime rows"
timeout 240 python3 benchmarks/kernel_bench.py --harness "$H" --out "$R/rotating" > "$R/rotating/log.txt" 2>&1; tail -25 "$R/rotating/log.txt"
echo "== decode, x L2-resident, streaming-read floor ($(($(date +%s)-t0)) s)"
timeout 150 python3 benchmarks/kernel_bench.py --harness "$H" --no-ort --hot-x --floor --modes threshold --out "$R/hot" > "$R/hot/log.txt" 2>&1; tail -25 "$R/hot/log.txt"
echo "== prefill, 512 rows ($(($(date +%s)-t0)) s)"
timeout 200 python3 benchmarks/kernel_bench.py --harness "$H" --no-ort --prefill --variants 0,4 --modes threshold,topk --out "$R/prefill" > "$R/prefill/log.txt" 2>&1; tail -25 "$R/prefill/log.txt"
echo "done in $(($(date +%s)-t0)) s"
