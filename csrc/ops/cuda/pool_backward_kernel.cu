// CUDA kernels of apkernels::pool_backward, the backward of patch_pool and token_pool: a row
// scatter, repeated indices accumulating in ascending order, and (reduce_batch) the batch sum of
// the rows (the position-embedding gradient).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "ops/pool_checks.h"
#include "ops/cuda/helpers.cuh"

namespace apkernels::cuda {
namespace {

// ---- pool_backward ---------------------------------------------------------------------------
// grad_rows[b, n] = sum of grad[b, j] over the j with index[b, j] == n, in ascending j (repeated
// indices accumulate, deterministically: no float atomics). Two launches: the inverse map, then one
// thread per (row, channel pack) writing every image's row (and the batch sum in order).

// inv[b, n] = the one j with index[b, j] == n, kNoSlot when there is none, kRepeatedSlot when
// there are several (resolved by scanning the index row, see scatter_unit). One block per image.
// Index values are in [0, N): the host checked them before the launch.
constexpr int kNoSlot = -1;
constexpr int kRepeatedSlot = -2;

__global__ void __launch_bounds__(kThreads) inverse_index_kernel(const int64_t* __restrict__ index, int64_t isB,
                                                                 int64_t isK, int64_t K, int64_t N,
                                                                 int* __restrict__ inv) {
  int* invb = inv + static_cast<int64_t>(blockIdx.x) * N;
  for (int64_t r = threadIdx.x; r < N; r += blockDim.x) invb[r] = kNoSlot;
  __syncthreads();
  const int64_t* ib = index + static_cast<int64_t>(blockIdx.x) * isB;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const int64_t p = ib[j * isK];
    // The first j to claim row p stores itself; any later one marks the row repeated. A slot never
    // returns to kNoSlot, so a claim cannot overwrite the mark: the result is independent of timing.
    if (atomicCAS(&invb[p], kNoSlot, static_cast<int>(j)) != kNoSlot) invb[p] = kRepeatedSlot;
  }
}

// The gradient of row n of image b at channels c..c+V, in fp32: grad[b, j] for the slot's j, zero
// for none, the sum over the matching j in ascending order for a repeated row.
template <typename T, int V>
__device__ __forceinline__ void row_gradient(const T* __restrict__ gb, int64_t gsK, int64_t gsC,
                                             const int64_t* __restrict__ ib, int64_t isK, int64_t K, int slot,
                                             int64_t n, int64_t c, float (&acc)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.0f;
  auto add = [&](int64_t j) {
    if constexpr (V == 1) {
      acc[0] += static_cast<float>(gb[j * gsK + c * gsC]);
    } else {
      using P = Pack<T>;
      static_assert(V == P::kSize, "vector unit = one pack");
      const P v = *reinterpret_cast<const P*>(gb + j * gsK + c);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += static_cast<float>(v.v[e]);
    }
  };
  if (slot >= 0) {
    add(slot);
  } else if (slot == kRepeatedSlot) {
    for (int64_t j = 0; j < K; ++j) {
      if (ib[j * isK] == n) add(j);
    }
  }
}

// One thread per (row n, V channels): for each image b in order, rows[b, n, c..c+V) = its
// gradient; with `reduce` also sum[n, c..) = the fp32 sum of those rows over b in order
// (deterministic: no atomics). Without `reduce`, grid.y strides over the images.
template <typename T, int V>
__device__ __forceinline__ void scatter_unit(const T* __restrict__ grad, int64_t gsB, int64_t gsK, int64_t gsC,
                                             const int64_t* __restrict__ index, int64_t isB, int64_t isK,
                                             const int* __restrict__ inv, int64_t B, int64_t K, int64_t N, int64_t C,
                                             int64_t n, int64_t c, bool reduce, T* __restrict__ rows,
                                             T* __restrict__ sum) {
  float total[V];
#pragma unroll
  for (int e = 0; e < V; ++e) total[e] = 0.0f;
  const int64_t b0 = reduce ? 0 : blockIdx.y, step = reduce ? 1 : gridDim.y;
  for (int64_t b = b0; b < B; b += step) {
    float acc[V];
    row_gradient<T, V>(grad + b * gsB, gsK, gsC, index + b * isB, isK, K, inv[b * N + n], n, c, acc);
    T* dst = rows + (b * N + n) * C + c;
    if constexpr (V == 1) {
      const T v = static_cast<T>(acc[0]);
      *dst = v;
      total[0] += static_cast<float>(v);
    } else {
      using P = Pack<T>;
      P v;
#pragma unroll
      for (int e = 0; e < V; ++e) v.v[e] = static_cast<T>(acc[e]);
      *reinterpret_cast<P*>(dst) = v;
#pragma unroll
      for (int e = 0; e < V; ++e) total[e] += static_cast<float>(v.v[e]);
    }
  }
  if (reduce) {
#pragma unroll
    for (int e = 0; e < V; ++e) sum[n * C + c + e] = static_cast<T>(total[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const T* __restrict__ grad, int64_t gsB, int64_t gsK, int64_t gsC,
                        const int64_t* __restrict__ index, int64_t isB, int64_t isK, const int* __restrict__ inv,
                        int64_t B, int64_t K, int64_t N, int64_t C, bool vec, bool reduce, T* __restrict__ rows,
                        T* __restrict__ sum) {
  constexpr int pack = Pack<T>::kSize;
  const int64_t units = vec ? C / pack : C;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= N * units) return;
  const int64_t n = e / units, u = e % units;
  if (vec) {
    scatter_unit<T, pack>(grad, gsB, gsK, gsC, index, isB, isK, inv, B, K, N, C, n, u * pack, reduce, rows, sum);
  } else {
    scatter_unit<T, 1>(grad, gsB, gsK, gsC, index, isB, isK, inv, B, K, N, C, n, u, reduce, rows, sum);
  }
}

std::tuple<at::Tensor, at::Tensor> pool_backward_cuda(const at::Tensor& grad_tokens, const at::Tensor& index,
                                                      int64_t num_rows, bool reduce_batch) {
  check_cuda_float("pool_backward", "grad_tokens", grad_tokens);
  check_pool_backward_args(grad_tokens, index, num_rows);
  const int64_t B = grad_tokens.size(0), K = grad_tokens.size(1), C = grad_tokens.size(2);
  TORCH_CHECK_VALUE(K <= INT32_MAX && B <= INT32_MAX, "pool_backward: the CUDA kernel takes at most 2^31-1 images ",
                    "and rows, got B=", B, ", K=", K);
  const int64_t N = num_rows;

  c10::cuda::CUDAGuard device_guard(grad_tokens.device());
  if (index.numel() > 0) {
    // Checked on the host before any launch (one reduction and a sync), so a bad index raises a
    // RuntimeError like on the CPU instead of a device assert that poisons the context.
    const auto [lowest, highest] = at::aminmax(index);
    check_pool_backward_index_range(lowest.item<int64_t>(), highest.item<int64_t>(), N);
  }
  const auto options = grad_tokens.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor rows = at::empty({B, N, C}, options);
  at::Tensor sum = reduce_batch ? at::empty({N, C}, options) : at::empty({0}, options);
  if (rows.numel() == 0) {
    if (reduce_batch) sum.zero_();  // a sum over no images (B == 0), or an empty [N, C]
    return {rows, sum};
  }
  at::Tensor inv = at::empty({B, N}, grad_tokens.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* index_ptr = index.const_data_ptr<int64_t>();
  APK_LAUNCH(static_cast<unsigned>(B), kThreads, 0, stream, inverse_index_kernel)(index_ptr, index.stride(0),
                                                                           index.stride(1), K, N, inv.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  APK_DISPATCH_CUDA_FLOATS(grad_tokens.scalar_type(), "pool_backward_cuda", [&] {
    const scalar_t* g = grad_tokens.const_data_ptr<scalar_t>();
    const int64_t gsB = grad_tokens.stride(0), gsK = grad_tokens.stride(1), gsC = grad_tokens.stride(2);
    constexpr int64_t pack = Pack<scalar_t>::kSize;
    const bool vec = C % pack == 0 && gsC == 1 && vec_aligned<scalar_t>(g, gsB) && gsK % pack == 0;
    const int64_t units = N * (vec ? C / pack : C);
    const int threads = kThreads;
    const int64_t blocks = (units + threads - 1) / threads;
    TORCH_CHECK(blocks <= INT32_MAX, "pool_backward: num_rows * C too large for one launch: ", units);
    const dim3 grid(static_cast<unsigned>(blocks), reduce_batch ? 1u : static_cast<unsigned>(std::min<int64_t>(B, 65535)));
    APK_LAUNCH(grid, threads, 0, stream, scatter_rows_kernel<scalar_t>)(
        g, gsB, gsK, gsC, index_ptr, index.stride(0), index.stride(1), inv.const_data_ptr<int>(), B, K, N, C, vec,
        reduce_batch, rows.mutable_data_ptr<scalar_t>(), reduce_batch ? sum.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, sum};
}

}  // namespace
}  // namespace apkernels::cuda

APK_CUDA_LIBRARY_IMPL(m) { m.impl(APK_CUDA_OP("pool_backward"), &apkernels::cuda::pool_backward_cuda); }
