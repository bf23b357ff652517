# com.acttail::SparseMatMulNBits (4-bit W): included by CMakeLists.txt, appends to the library's source lists.
list(APPEND ACTTAIL_OPS SparseMatMulNBits)
list(APPEND ACTTAIL_CPU_SOURCES csrc/sparse_matmul_nbits/op.cc csrc/sparse_matmul_nbits/cpu.cc)
list(APPEND ACTTAIL_CUDA_SOURCES csrc/sparse_matmul_nbits/cuda.cu)
list(APPEND ACTTAIL_BENCH_SOURCES csrc/sparse_matmul_nbits/cuda.cu csrc/sparse_matmul_nbits/bench.cu)
list(APPEND ACTTAIL_DEFINITIONS ACTTAIL_WITH_NBITS)
