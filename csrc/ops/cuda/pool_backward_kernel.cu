// CUDA kernels of apkernels::pool_backward, the backward of patch_pool and token_pool: a row
// scatter, repeated indices accumulating in ascending order, and (reduce_batch) the batch sum of
// the rows (the position-embedding gradient).
//
// Two launches, no fills, no copies, no float atomics:
// 1. inverse_index_kernel, one CTA per image: the image's inverse index (built in shared memory)
//    -> int32 inv [B, N], the image's smallest and largest index value (the range check), and
//    zeroes the tile counters of launch 2.
// 2. pool_backward_kernel, grid (tiles of kThreads units of one image's [N, C]) x (batch chunks):
//    each thread writes its unit of every image of its chunk (grad read once, dx written once)
//    and sums them in fp32 registers, in image order. With reduce_batch and several chunks, each
//    CTA writes its partial sums to an fp32 workspace [chunks, N * C] and the last CTA of a tile
//    to arrive (integer counter) adds the chunks in chunk order: a deterministic batch reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <tuple>

#include "ops/pool_checks.h"
#include "ops/cuda/helpers.cuh"

namespace apkernels::cuda {
namespace {

// inv[b, n]: the one j with index[b, j] == n, kNoSlot for none, kRepeatedSlot for several (then
// summed by a scan of the index row in ascending j).
constexpr int kNoSlot = -1;
constexpr int kRepeatedSlot = -2;
// num_rows up to which the inverse index is built in shared memory (48 KB, no opt-in needed);
// beyond, in the inv output itself (global atomics).
constexpr int64_t kMaxSmemRows = 48 * 1024 / sizeof(int);
// Launch 2 aims at this many CTAs: two waves of 4 resident CTAs (256 threads at up to 64
// registers) on 132 SMs (H100/H200) with reduce_batch; four times as many without (chunks then
// cost nothing but a few staged slots). A constant, not the device's SM count, so that the batch
// sum's chunks, and so its rounding, follow the shapes alone. APKERNELS_POOL_BACKWARD_TARGET_CTAS
// overrides it (the tests put several images in a chunk at small shapes with it).
constexpr int64_t kTargetCtas = 2 * 132 * 4;
// With reduce_batch, the chunks' fp32 workspace (written and read once: 8 * N * C bytes per
// chunk) stays within 1 / kWorkspaceShare of the backward's minimal bytes (grad read, rows
// written): a small batch gets fewer chunks (fewer waves) rather than a workspace as large as it.
constexpr int64_t kWorkspaceShare = 20;

int64_t target_ctas(bool reduce_batch) {
  const char* text = std::getenv("APKERNELS_POOL_BACKWARD_TARGET_CTAS");
  const int64_t value = text != nullptr ? std::atoll(text) : 0;
  return value > 0 ? value : (reduce_batch ? kTargetCtas : 4 * kTargetCtas);
}

// Batch chunks of launch 2 for `tiles` tiles: enough CTAs for target_ctas(), at least one image
// per chunk, at most 65535 (grid.y), and with reduce_batch the workspace cap above (unless the
// target is overridden).
int64_t batch_chunks(int64_t B, int64_t K, int64_t N, int64_t C, int64_t element_bytes, int64_t tiles,
                     bool reduce_batch) {
  int64_t chunks = std::min<int64_t>({B, 65535, std::max<int64_t>(1, (target_ctas(reduce_batch) + tiles - 1) / tiles)});
  if (reduce_batch && std::getenv("APKERNELS_POOL_BACKWARD_TARGET_CTAS") == nullptr && N > 0) {
    const int64_t cap = B * (K + N) * element_bytes / (kWorkspaceShare * 8 * N);
    chunks = std::max<int64_t>(1, std::min(chunks, cap));
  }
  const int64_t chunk = (B + chunks - 1) / chunks;
  return (B + chunk - 1) / chunk;
}
// Slots (int32) a CTA of launch 2 stages in shared memory per group of images.
constexpr int kSlotTableInts = 2048;

__global__ void __launch_bounds__(kThreads)
    inverse_index_kernel(const int64_t* __restrict__ index, int64_t isB, int64_t isK, int64_t K, int64_t N,
                         bool in_smem, int* __restrict__ inv, long long* __restrict__ minmax,
                         int* __restrict__ counters, int64_t n_counters) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ long long lowest, highest;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  int* table = in_smem ? reinterpret_cast<int*>(dyn_smem) : inv + b * N;
  if (tid == 0) {
    lowest = LLONG_MAX;
    highest = LLONG_MIN;
  }
  for (int64_t r = tid; r < N; r += kThreads) table[r] = kNoSlot;
  for (int64_t t = b * kThreads + tid; t < n_counters; t += int64_t(gridDim.x) * kThreads) counters[t] = 0;
  __syncthreads();
  const int64_t* ib = index + b * isB;
  long long lo = LLONG_MAX, hi = LLONG_MIN;
  for (int64_t j = tid; j < K; j += kThreads) {
    const long long p = ib[j * isK];
    lo = min(lo, p);
    hi = max(hi, p);
    // Out-of-range values claim nothing (the host raises after reading minmax). The first j to
    // claim row p stores itself, any later one marks the row repeated; a slot never returns to
    // kNoSlot, so the result does not depend on timing.
    if (p >= 0 && p < N && atomicCAS(&table[p], kNoSlot, static_cast<int>(j)) != kNoSlot) {
      atomicExch(&table[p], kRepeatedSlot);
    }
  }
  if (tid < K) {
    atomicMin(&lowest, lo);
    atomicMax(&highest, hi);
  }
  __syncthreads();
  if (in_smem) {
    for (int64_t r = tid; r < N; r += kThreads) inv[b * N + r] = table[r];
  }
  if (tid == 0) {
    minmax[2 * b] = lowest;
    minmax[2 * b + 1] = highest;
  }
}

struct BackwardArgs {
  int64_t gsB, gsK, gsC;  // grad_tokens strides (elements)
  int64_t isB, isK;       // index strides
  int64_t B, K, N, C;
  int64_t P;       // units per row (C / V)
  int64_t units;   // units per image: N * P
  int64_t chunk;   // images per batch chunk (grid.y)
  int64_t chunks;  // gridDim.y
};

// V consecutive channels moved as one load / store (kUnitChannels below; V = 1 otherwise).
template <typename T, int V>
struct alignas(sizeof(T) * V) Unit {
  T v[V];
};

// One thread per unit u of an image's [N, C] (row u / P, channels (u % P) * V ..), for every image
// of the CTA's batch chunk in order: rows[b, n, c..] = the sum of grad[b, j, c..] over the j with
// index[b, j] == n (a copy for the one j, zeros for none, a scan in ascending j for several).
// kReduce: the fp32 sum over the batch -> sum[n, c..] (see the file comment).
template <typename T, int V, bool kReduce>
__global__ void __launch_bounds__(kThreads)
    pool_backward_kernel(const T* __restrict__ grad, const int64_t* __restrict__ index, const int* __restrict__ inv,
                         const BackwardArgs a, T* __restrict__ rows, T* __restrict__ sum, float* partial,
                         int* counters) {
  __shared__ int slots[kSlotTableInts];
  __shared__ bool last_to_arrive;
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x, chunk = blockIdx.y;
  const int64_t u0 = tile * kThreads, u = u0 + tid;
  const bool active = u < a.units;
  // The rows this tile touches, and this thread's row and channels (one division per thread).
  const int64_t row_first = u0 / a.P;
  const int tile_rows = static_cast<int>((std::min(a.units, u0 + kThreads) - 1) / a.P - row_first + 1);
  const int64_t n = active ? u / a.P : row_first;
  const int64_t c = active ? (u - n * a.P) * V : 0;
  const int local_row = static_cast<int>(n - row_first);
  const int group = kSlotTableInts / tile_rows;  // images staged at once (>= 8)
  const int64_t b_begin = chunk * a.chunk, b_end = std::min(a.B, b_begin + a.chunk);

  float total[V];
#pragma unroll
  for (int e = 0; e < V; ++e) total[e] = 0.0f;
  for (int64_t g0 = b_begin; g0 < b_end; g0 += group) {
    const int images = static_cast<int>(std::min<int64_t>(group, b_end - g0));
    __syncthreads();  // every thread is done with the previous group's slots
    for (int s = tid; s < images * tile_rows; s += kThreads) {
      const int i = s / tile_rows, r = s - i * tile_rows;
      slots[s] = inv[(g0 + i) * a.N + row_first + r];
    }
    __syncthreads();
    if (!active) continue;
#pragma unroll 4
    for (int i = 0; i < images; ++i) {
      const int64_t b = g0 + i;
      const int slot = slots[i * tile_rows + local_row];
      const T* gb = grad + b * a.gsB;
      Unit<T, V> out;
      if (slot >= 0) {  // the common case: a copy
        if constexpr (V == 1) {
          out.v[0] = gb[slot * a.gsK + c * a.gsC];
        } else {
          out = *reinterpret_cast<const Unit<T, V>*>(gb + slot * a.gsK + c);
        }
      } else {
        float acc[V];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = 0.0f;
        if (slot == kRepeatedSlot) {
          const int64_t* ib = index + b * a.isB;
          for (int64_t j = 0; j < a.K; ++j) {
            if (ib[j * a.isK] != n) continue;
            if constexpr (V == 1) {
              acc[0] += static_cast<float>(gb[j * a.gsK + c * a.gsC]);
            } else {
              const Unit<T, V> v = *reinterpret_cast<const Unit<T, V>*>(gb + j * a.gsK + c);
#pragma unroll
              for (int e = 0; e < V; ++e) acc[e] += static_cast<float>(v.v[e]);
            }
          }
        }
#pragma unroll
        for (int e = 0; e < V; ++e) out.v[e] = static_cast<T>(acc[e]);
      }
      // rows is contiguous [B, N, C] and P * V == C: unit u of image b starts at (b * N * C) + u * V.
      *reinterpret_cast<Unit<T, V>*>(rows + b * a.units * V + u * V) = out;
      if constexpr (kReduce) {
#pragma unroll
        for (int e = 0; e < V; ++e) total[e] += static_cast<float>(out.v[e]);
      }
    }
  }
  if constexpr (kReduce) {
    if (a.chunks == 1) {
      if (active) {
#pragma unroll
        for (int e = 0; e < V; ++e) sum[u * V + e] = static_cast<T>(total[e]);
      }
      return;
    }
    if (active) {
#pragma unroll
      for (int e = 0; e < V; ++e) partial[(chunk * a.units + u) * V + e] = total[e];
    }
    // The last-block pattern: every thread's partial is visible device-wide before the CTA counts
    // itself; the CTA that completes the count sums all chunks of the tile.
    __threadfence();
    __syncthreads();
    if (tid == 0) last_to_arrive = atomicAdd(&counters[tile], 1) == static_cast<int>(a.chunks - 1);
    __syncthreads();
    if (!last_to_arrive || !active) return;
    __threadfence();
    float s[V];
#pragma unroll
    for (int e = 0; e < V; ++e) s[e] = 0.0f;
    const volatile float* chunk_partial = partial + u * V;  // volatile: other SMs wrote it, skip L1
    for (int64_t k = 0; k < a.chunks; ++k, chunk_partial += a.units * V) {
#pragma unroll
      for (int e = 0; e < V; ++e) s[e] += chunk_partial[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e) sum[u * V + e] = static_cast<T>(s[e]);
  }
}

// Channels per unit: 4 for fp32 (16-byte accesses), 2 for fp16 / bf16 (4-byte accesses: twice
// the tiles of 8-byte units, so half the chunks and half the batch-sum workspace for the same waves).
template <typename T>
constexpr int kUnitChannels = sizeof(T) == 4 ? 4 : 2;

// Units of kUnitChannels<T> channels when C allows it and every grad row start is aligned to one.
template <typename T>
bool vector_units(const at::Tensor& g) {
  constexpr int V = kUnitChannels<T>;
  const int64_t C = g.size(2);
  return C % V == 0 && (C == 0 || g.stride(2) == 1) && g.stride(0) % V == 0 && g.stride(1) % V == 0 &&
         reinterpret_cast<uintptr_t>(g.const_data_ptr<T>()) % (V * sizeof(T)) == 0;
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
  const auto options = grad_tokens.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor rows = at::empty({B, N, C}, options);
  at::Tensor sum = reduce_batch ? at::empty({N, C}, options) : at::empty({0}, options);
  if (B == 0) {
    if (reduce_batch) sum.zero_();  // a sum over no images
    return {rows, sum};
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* index_ptr = index.const_data_ptr<int64_t>();
  at::Tensor minmax = at::empty({B, 2}, grad_tokens.options().dtype(at::kLong));  // per image, for the range check
  APK_DISPATCH_CUDA_FLOATS(grad_tokens.scalar_type(), "pool_backward_cuda", [&] {
    // Launch 2's shape: tiles over one image's units, chunks over the batch.
    constexpr int V = kUnitChannels<scalar_t>;
    const bool vec = vector_units<scalar_t>(grad_tokens);
    BackwardArgs a;
    a.gsB = grad_tokens.stride(0);
    a.gsK = grad_tokens.stride(1);
    a.gsC = grad_tokens.stride(2);
    a.isB = index.stride(0);
    a.isK = index.stride(1);
    a.B = B;
    a.K = K;
    a.N = N;
    a.C = C;
    a.P = vec ? C / V : C;
    a.units = N * a.P;
    const int64_t tiles = (a.units + kThreads - 1) / kThreads;
    TORCH_CHECK(tiles <= INT32_MAX, "pool_backward: num_rows * C too large for one launch: ", N * C);
    a.chunks = batch_chunks(B, K, N, C, sizeof(scalar_t), std::max<int64_t>(tiles, 1), reduce_batch);
    a.chunk = (B + a.chunks - 1) / a.chunks;
    const bool workspace_sum = reduce_batch && a.chunks > 1 && tiles > 0;

    // One int32 allocation: inv [B, N], then the tile counters; minmax [B, 2] int64.
    const int64_t n_counters = workspace_sum ? tiles : 0;
    at::Tensor ints = at::empty({B * N + n_counters}, grad_tokens.options().dtype(at::kInt));
    int* inv = ints.mutable_data_ptr<int>();
    const bool in_smem = N <= kMaxSmemRows;
    APK_LAUNCH(static_cast<unsigned>(B), kThreads, in_smem ? N * sizeof(int) : 0, stream, inverse_index_kernel)(
        index_ptr, a.isB, a.isK, K, N, in_smem, inv, reinterpret_cast<long long*>(minmax.mutable_data_ptr<int64_t>()),
        inv + B * N, n_counters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (tiles > 0) {
      at::Tensor partial;
      if (workspace_sum) partial = at::empty({a.chunks, N * C}, grad_tokens.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(a.chunks));
      auto launch = [&](auto kernel) {
        APK_LAUNCH(grid, kThreads, 0, stream, kernel)(
            grad_tokens.const_data_ptr<scalar_t>(), index_ptr, inv, a, rows.mutable_data_ptr<scalar_t>(),
            reduce_batch ? sum.mutable_data_ptr<scalar_t>() : nullptr,
            workspace_sum ? partial.mutable_data_ptr<float>() : nullptr, inv + B * N);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) {
        reduce_batch ? launch(pool_backward_kernel<scalar_t, V, true>) : launch(pool_backward_kernel<scalar_t, V, false>);
      } else {
        reduce_batch ? launch(pool_backward_kernel<scalar_t, 1, true>) : launch(pool_backward_kernel<scalar_t, 1, false>);
      }
    } else if (reduce_batch) {
      sum.zero_();  // N * C == 0: nothing to sum (an empty tensor)
    }
  });
  if (K > 0) {
    // The range check: one copy of [B, 2] to the host (it waits for the launches), so a bad index
    // raises a RuntimeError like on the CPU; the kernels never touch rows outside [0, N).
    const at::Tensor host = minmax.device().is_cpu() ? minmax : minmax.to(at::kCPU);
    const int64_t* mm = host.const_data_ptr<int64_t>();
    int64_t lowest = mm[0], highest = mm[1];
    for (int64_t b = 1; b < B; ++b) {
      lowest = std::min(lowest, mm[2 * b]);
      highest = std::max(highest, mm[2 * b + 1]);
    }
    check_pool_backward_index_range(lowest, highest, N);
  }
  return {rows, sum};
}

}  // namespace
}  // namespace apkernels::cuda

APK_CUDA_LIBRARY_IMPL(m) { m.impl(APK_CUDA_OP("pool_backward"), &apkernels::cuda::pool_backward_cuda); }
