// csrc/ops/cuda/dan_kernels.cu compiled for the CPU emulator (see cuda_emulation.h).
#include "emulation/cuda_emulation.h"

#include "ops/cuda/dan_kernels.cu"
