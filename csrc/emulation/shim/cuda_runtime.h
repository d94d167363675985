// Emulated build: the CUDA runtime API the kernels' host code uses (see ../cuda_emulation.h).
#pragma once
#include <cstddef>

#include "emulation/cuda_emulation.h"

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaFuncAttributes {
  // Static shared memory of the kernel: unknown before it runs, so 0 (the emulated device's limit
  // is what plan_dynamic_smem compares dynamic bytes against).
  size_t sharedSizeBytes = 0;
};

struct cudaDeviceProp {
  size_t sharedMemPerBlockOptin;
  int multiProcessorCount;
  int major, minor;
};

template <typename Kernel>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, Kernel) {
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}

template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t) { return "cudaSuccess"; }
