#!/usr/bin/env bash
# One whole test file under compute-sanitizer, its test node ids split round-robin over parallel processes.
#   bash docs/results/kernels/nbits_sanitizer_full/run.sh <memcheck|racecheck> <test file> <shards>
# From the project root on a CUDA machine, after `source benchmarks/device/env.sh` (op library and harness
# build/ops/libacttail_bench.so built; onnxruntime-gpu on PYTHONPATH for tests/test_ops_nbits_cuda.py).
#   LOGDIR         where the logs go (default runs/sanitizer): <tool>_<file>_shard<k>.log, .ids, a .done marker
#   SHARD_TIMEOUT  seconds each shard may run (default 3600); a stopped shard's unrun tests show as not run
#   ACTTAIL_BENCH_LIB (default build/ops/libacttail_bench.so), ACTTAIL_CUDA_CASES (default 200)
# Each shard: compute-sanitizer --tool <tool> --error-exitcode 3 --print-limit 10000 --show-backtrace device
#             python3 -m pytest -v -p no:cacheprovider <its node ids>   (-v: one line per test, so that every report
#             sits under the test that launched the kernel). Summary: summarize.py beside this script.
set -uo pipefail
tool=$1; file=$2; n=$3
here=$(cd "$(dirname "$0")" && pwd)
stem=$(basename "$file" .py)
LOGDIR=${LOGDIR:-runs/sanitizer}; mkdir -p "$LOGDIR"
export ACTTAIL_BENCH_LIB=${ACTTAIL_BENCH_LIB:-build/ops/libacttail_bench.so} ACTTAIL_CUDA_CASES=${ACTTAIL_CUDA_CASES:-200}
# one BLAS / OpenMP thread per process: the shards share the CPU cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
base="$LOGDIR/${tool}_${stem}"
rm -f "$base".done "$base"_shard*.log "$base"_shard*.ids
python3 -m pytest --collect-only -q -p no:cacheprovider "$file" 2>&1 | grep '::' > "$base.ids"
echo "$tool $file: $(wc -l < "$base.ids") tests collected, $n shards, limit ${SHARD_TIMEOUT:-3600} s per shard"
awk -v n="$n" -v p="${base}_shard" '{ print > (p ((NR - 1) % n) ".ids") }' "$base.ids"
t0=$(date +%s)
for ((k = 0; k < n; k++)); do
  [ -s "${base}_shard$k.ids" ] || continue
  (
    mapfile -t ids < "${base}_shard$k.ids"
    s=$(date +%s)
    timeout -k 20 "${SHARD_TIMEOUT:-3600}" compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 10000 \
      --show-backtrace device python3 -m pytest -v -p no:cacheprovider "${ids[@]}" > "${base}_shard$k.log" 2>&1
    echo "== shard $k: ${#ids[@]} tests, exit $?, $(( $(date +%s) - s )) s" >> "${base}_shard$k.log"
  ) &
done
wait
echo "$tool $file: all shards ended in $(( $(date +%s) - t0 )) s" | tee "$base.done"
python3 "$here/summarize.py" "$LOGDIR" --only "${tool}_${stem}"
