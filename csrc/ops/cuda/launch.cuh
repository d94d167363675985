// The few places where the CUDA sources meet the emulation build (csrc/emulation, which compiles
// these same .cu files as host C++ and runs every CUDA thread as a fiber). Under nvcc the macros
// below are exactly the CUDA spelling, so the GPU build compiles today's kernels unchanged;
// csrc/emulation/cuda_emulation.h defines them first for the emulated build.
#pragma once

#if !defined(APK_CUDA_EMULATION)
// APK_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) == kernel<<<grid, block, shared_bytes, stream>>>(args...).
// The kernel comes last so that a template-id with commas needs no parentheses.
#define APK_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
// The device type the CUDA kernels accept (CPU in the emulated build).
#define APK_CUDA_DEVICE_TYPE c10::DeviceType::CUDA
// Registration of the CUDA kernels: `apkernels::<op>` for the CUDA key (emulated: `<op>_cuda_emulated`, CPU key).
#define APK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(apkernels, CUDA, m)
#define APK_CUDA_OP(name) name
#endif
