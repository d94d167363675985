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

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace apkernels::cuda {
// A launch with thread-block clusters (sm_90): cudaLaunchKernelEx with the cluster dimension.
template <typename... P>
struct ClusterLaunch {
  void (*kernel)(P...);
  dim3 grid, block, cluster;
  size_t shared_bytes;
  cudaStream_t stream;

  template <typename... A>
  void operator()(A&&... args) const {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster.x;
    attribute[0].val.clusterDim.y = cluster.y;
    attribute[0].val.clusterDim.z = cluster.z;
    config.attrs = attribute;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<P>(args)...));
  }
};

template <typename... P>
ClusterLaunch<P...> make_cluster_launch(void (*kernel)(P...), dim3 grid, dim3 block, dim3 cluster, size_t shared_bytes,
                                        cudaStream_t stream) {
  return ClusterLaunch<P...>{kernel, grid, block, cluster, shared_bytes, stream};
}
}  // namespace apkernels::cuda

// APK_LAUNCH_CLUSTER(grid, block, cluster, shared_bytes, stream, kernel)(args...): a launch whose
// blocks form clusters of `cluster` blocks (grid a multiple of it).
#define APK_LAUNCH_CLUSTER(grid, block, cluster, shared_bytes, stream, ...) \
  ::apkernels::cuda::make_cluster_launch(__VA_ARGS__, grid, block, cluster, shared_bytes, stream)
#endif
