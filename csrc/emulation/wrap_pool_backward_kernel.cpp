// csrc/ops/cuda/pool_backward_kernel.cu compiled for the CPU emulator (see cuda_emulation.h).
#include "emulation/cuda_emulation.h"

namespace apkernels::cuda {
namespace {
APK_EMU_DYNAMIC_SHARED(dyn_smem)
}  // namespace
}  // namespace apkernels::cuda

#include "ops/cuda/pool_backward_kernel.cu"
