export PYTHONPATH=$ORT_GPU_DIR:.; source $ORT_GPU_DIR/env.sh
set -o pipefail
F="UserWarning\|_warn_once\|warnings.warn"
git log -1 --format=%h 2>/dev/null | tee $OUT/commit.txt
ACTTAIL_CUDA_ARCHS=90 ONNXRUNTIME_INCLUDE_DIR=$PWD/third_party/onnxruntime/include bash scripts/build_ops.sh 2>&1 | tail -1 | tee $OUT/build.log
PYTHONUNBUFFERED=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_ops_cuda.py -rs 2>&1 | tail -6 | tee $OUT/test_ops_cuda.log
SEL="random or llm_like or semantics or masked or fp16 or reuse or errors or boundary"
ACTTAIL_CUDA_CASES=25 timeout 75 compute-sanitizer --tool memcheck --target-processes all python3 -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py -k "$SEL" 2>&1 | grep -v "$F" | tail -5 | tee $OUT/memcheck.log
ACTTAIL_CUDA_CASES=10 timeout 75 compute-sanitizer --tool racecheck --target-processes all python3 -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py -k "$SEL" 2>&1 | grep -v "$F" | tail -5 | tee $OUT/racecheck.log
