#!/usr/bin/env bash
# device: builds (working tree: ops + harness; HEAD / varA / varB2: harness only), prefill benchmark of all four, then checks
set -o pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"; L=$O/builds.log
t0=$(date +%s); R=$PWD
hb() {  # harness-only build of tree $1
  cmake -S $1 -B $1/build -DCMAKE_BUILD_TYPE=Release -DONNXRUNTIME_INCLUDE_DIR=$R/third_party/onnxruntime/include -DACTTAIL_CUDA=ON \
    -DCMAKE_CUDA_COMPILER=$(readlink -f $(command -v nvcc)) -DCMAKE_CUDA_ARCHITECTURES=90-real -DCUBLAS_INCLUDE_DIR=$R/third_party/cublas/include \
    -DACTTAIL_BENCH=ON > $1.cmake.log 2>&1 && cmake --build $1/build --target acttail_bench -j 8 >> $1.cmake.log 2>&1; echo "$1 rc $?"; }
for t in .base .varA .varB2; do hb $t >> $L & done
source benchmarks/device/env.sh >> $L 2>&1 || { tail -20 /tmp/acttail_build_ops.log; exit 1; }
wait; tail -3 /tmp/acttail_build_ops.log >> $L; for t in .base .varA .varB2; do tail -2 $t.cmake.log >> $L; done
cat $L; echo "builds $(( $(date +%s) - t0 )) s"
PYTHONUNBUFFERED=1 timeout 300 python3 benchmarks/kernel_bench_nbits.py --harness build/ops/libacttail_bench.so \
  --base-harness head=.base/build/libacttail_bench.so,varA=.varA/build/libacttail_bench.so,varB2=.varB2/build/libacttail_bench.so \
  --rows 512 --sparsities 0 --ort-sparsities 0 --reps 10 --runs 10 --out "$O/prefill" > "$O/prefill.log" 2>&1
echo "bench rc $? $(( $(date +%s) - t0 )) s"; grep -E "M=512|harness|through" "$O/prefill.log" | cut -c1-330
H=build/ops/libacttail_bench.so; K="prefill or harness_paths or harness_members"
( PYTHONUNBUFFERED=1 timeout 200 python3 .base/adhoc_check.py $H .varB2/build/libacttail_bench.so > $O/adhoc.log 2>&1; echo "adhoc rc $?" >> $O/adhoc.log ) &
( ACTTAIL_BENCH_LIB=$H ACTTAIL_CUDA_CASES=200 timeout 230 python3 -m pytest -q -p no:cacheprovider tests/test_ops_nbits_cuda.py > $O/pytest_cuda.log 2>&1; echo "rc $?" >> $O/pytest_cuda.log ) &
( ACTTAIL_BENCH_LIB=$H timeout 230 python3 -m pytest -q -p no:cacheprovider tests/test_ops_nbits_harness.py > $O/pytest_harness.log 2>&1; echo "rc $?" >> $O/pytest_harness.log ) &
for tool in memcheck racecheck; do
  ( ACTTAIL_BENCH_LIB=$H timeout 230 compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider tests/test_ops_nbits_harness.py -k "$K" > $O/sanitizer_$tool.log 2>&1; echo "rc $?" >> $O/sanitizer_$tool.log ) &
done
wait
for f in adhoc pytest_cuda pytest_harness sanitizer_memcheck sanitizer_racecheck; do echo "== $f"; tail -4 $O/$f.log; done
echo "done $(( $(date +%s) - t0 )) s"
