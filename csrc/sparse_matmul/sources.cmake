# com.acttail::SparseMatMul (dense W): included by CMakeLists.txt, appends to the library's source lists.
list(APPEND ACTTAIL_OPS SparseMatMul)
list(APPEND ACTTAIL_CPU_SOURCES csrc/sparse_matmul/op.cc csrc/sparse_matmul/cpu.cc)
list(APPEND ACTTAIL_CUDA_SOURCES csrc/sparse_matmul/cuda.cu csrc/sparse_matmul/decode_f16_m1.cu csrc/sparse_matmul/decode_rest.cu)
list(APPEND ACTTAIL_BENCH_SOURCES ${ACTTAIL_CUDA_SOURCES} csrc/bench/harness.cu)
