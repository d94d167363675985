// Emulated build: launch errors are thrown by the emulator itself, so the checks only evaluate.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    const cudaError_t apk_emu_err = (expr);                                           \
    TORCH_CHECK(apk_emu_err == cudaSuccess, "CUDA error (emulated): ", #expr);        \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() static_cast<void>(0)
