// Emulated build: the emulated device's properties and a null stream.
#pragma once
#include <cuda_runtime.h>

namespace at::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }

inline cudaDeviceProp* getCurrentDeviceProperties() {
  thread_local cudaDeviceProp prop;
  prop.sharedMemPerBlockOptin = ::apk_emu::shared_memory_limit();
  prop.multiProcessorCount = ::apk_emu::multiprocessor_count();
  prop.major = ::apk_emu::compute_capability() / 10;
  prop.minor = ::apk_emu::compute_capability() % 10;
  return &prop;
}

}  // namespace at::cuda
