# com.acttail::SparseMatMul (dense W): included by CMakeLists.txt, appends to the library's source lists.
list(APPEND ACTTAIL_OPS SparseMatMul)
list(APPEND ACTTAIL_CPU_SOURCES csrc/sparse_matmul/op.cc csrc/sparse_matmul/cpu.cc)
list(APPEND ACTTAIL_CUDA_SOURCES csrc/sparse_matmul/cuda.cu)
list(APPEND ACTTAIL_BENCH_SOURCES csrc/sparse_matmul/cuda.cu csrc/bench/harness.cu)
