#!/usr/bin/env bash
# device: the decode test that failed under contention, on HEAD and on the working tree (alone, sequential); the prefill
# harness tests of the working tree; racecheck of HEAD and of the working tree on the members / Inf-scales prefill test
set -o pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"; t0=$(date +%s); R=$PWD
( cd .base && ACTTAIL_CUDA=1 ACTTAIL_BENCH=1 ACTTAIL_CUDA_ARCHS=90 ACTTAIL_BUILD_DIR=build/base ACTTAIL_INSTALL=0 \
  ONNXRUNTIME_INCLUDE_DIR=$R/third_party/onnxruntime/include CUBLAS_INCLUDE_DIR=$R/third_party/cublas/include bash scripts/build_ops.sh > /tmp/bb.log 2>&1 ) &
source benchmarks/device/env.sh > /dev/null 2>&1 || exit 1
wait; echo "builds $(( $(date +%s) - t0 )) s"
H=build/ops/libacttail_bench.so; HB=.base/build/base/libacttail_bench.so; T=tests/test_ops_nbits_harness.py
for lib in $HB; do n=head
  ( ACTTAIL_BENCH_LIB=$lib timeout 100 compute-sanitizer --tool racecheck python3 -m pytest -q -p no:cacheprovider $T -k harness_members > $O/racecheck_members_$n.log 2>&1; echo "rc $?" >> $O/racecheck_members_$n.log ) &
done
for i in 1; do timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_ops_nbits_cuda.py -k scratch_left_zero 2>&1 | tail -1; done > $O/scratch_test.log
mv acttail_export/lib acttail_export/lib.new
for i in 1; do ACTTAIL_OPS_LIBRARY=$R/.base/build/base/libacttail_ops.so timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_ops_nbits_cuda.py -k scratch_left_zero 2>&1 | tail -1 | sed 's/^/HEAD: /'; done >> $O/scratch_test.log
mv acttail_export/lib.new acttail_export/lib
wait
for f in scratch_test racecheck_members_head; do echo "== $f"; grep -E "passed|failed|SUMMARY|Race reported|rc " $O/$f.log | sort | uniq -c | cut -c1-250; done
echo "done $(( $(date +%s) - t0 )) s"
