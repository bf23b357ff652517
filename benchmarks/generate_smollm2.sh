#!/usr/bin/env bash
# SmolLM2-135M at 50 % ActTail with `make demo`'s settings for its generation export (the default mode, threshold at
# 50 %; fused kernel, 16 calibration windows, no validation), then `acttail-export generate` on the CPU.
#
#   bash benchmarks/generate_smollm2.sh [WORK_DIR] > docs/results/generate/smollm2_50_cpu.txt 2>&1
#
# Needs WikiText-2 raw for the calibration text: ACTTAIL_WIKITEXT_DIR (set by `make`) or --calibration-data.
set -euo pipefail
work=${1:-runs}
cli() {
    printf '$ acttail-export'; printf ' %q' "$@"; echo
    local start=$SECONDS
    .venv/bin/python -m acttail_export.cli "$@" 2>&1 | sed "s#$PWD/##g"  # paths relative to the checkout
    echo "# done in $((SECONDS - start)) s"
}
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
cli export --model smollm2 --sparsity 0.5 --kernel fused --calibration-samples 16 --no-validate --overwrite \
    "$work/smollm2-acttail-50" | grep -v "^INFO"
cli generate --model "$work/smollm2-acttail-50" --prompt "What is the capital of France?" --chat --max-new-tokens 40
cli generate --model "$work/smollm2-acttail-50" --prompt "Write one sentence about the ocean." --chat --max-new-tokens 40
cli generate --model "$work/smollm2-acttail-50" --prompt "The history of the Roman Empire" --max-new-tokens 40
echo "# load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
