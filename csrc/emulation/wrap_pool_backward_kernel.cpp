// csrc/ops/cuda/pool_backward_kernel.cu compiled for the CPU emulator (see cuda_emulation.h).
#include "emulation/cuda_emulation.h"

#include "ops/cuda/pool_backward_kernel.cu"
