// The helpers of every CUDA kernel (pooling and DAN): the thread-count policy, the dtype policy,
// 16-byte vector packs, warp reductions, the block-wide top-k selection of the pooling kernels
// (radix select on 64-bit keys + order-preserving compaction), row gathers, and the host-side
// launch helpers. See docs/cuda-kernels.md for the design.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ops/common.h"
#include "ops/cuda/launch.cuh"

namespace apkernels::cuda {

// Thread-count policy. Every kernel launches blocks of kThreads = 256 threads (8 warps), except the
// one-block-per-image kernels that select the top k of an image (patch_pool, token_pool): they use
// kImageThreads = 512 (16 warps), which the selection's per-warp counters and the transpose tiles
// are sized from. Grid-stride loops launch elementwise_blocks(n) blocks.
constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kImageThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kImageWarps = kImageThreads / kWarpSize;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kVecBytes = 16;

// 16 bytes of T, loaded/stored with one vector instruction when the address is 16-byte aligned.
template <typename T>
struct alignas(kVecBytes) Pack {
  static constexpr int kSize = kVecBytes / sizeof(T);
  T v[kSize];
};

// True when `ptr + k * stride` is 16-byte aligned for every k (stride in elements of T).
template <typename T>
inline bool vec_aligned(const void* ptr, int64_t stride) {
  constexpr int64_t n = Pack<T>::kSize;
  return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0 && stride % n == 0;
}

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// Coordinates of a flat element index without a 64-bit division per element: with index_t =
// uint32_t a division by a launch-invariant divisor is a multiply-high and a shift (IntDivider's
// magic numbers); dispatch_index_type picks it whenever the indices (and a grid-stride step) stay
// below 2^31, else int64_t (plain division).
template <typename index_t>
using Divider = at::cuda::detail::IntDivider<index_t>;

template <typename F>
inline void dispatch_index_type(int64_t n, F&& f) {
  if (n < (int64_t(1) << 31)) {
    f(uint32_t{0});
  } else {
    f(int64_t{0});
  }
}

// Butterfly reductions over a warp: every lane ends with the same bits (each step combines the same
// two values on both partner lanes, and the combination is commutative).
template <ScoreKind kind>
__device__ __forceinline__ float warp_score(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = score_combine<kind, float>(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Shared state of select_topk_block (static shared memory, ~1.1 KB).
struct SelectShared {
  unsigned hist[256];
  int warp_counts[kImageWarps];
  int digit;
  int above;
  int count;
};

// Block-wide top-k of n unique 64-bit keys (select_key64: score, then lower position first),
// all kImageThreads threads of the block must call it. Writes the array indices i of the `keep` largest keys,
// ascending, as out[r] = i + offset (r = 0..keep-1). keep == n keeps everything without reading
// keys. Requires 1 <= keep <= n < 2^31. Ends with __syncthreads(): out is then visible to the
// whole block and `keys` may be reused.
//
// Radix select, 8 bits per pass from the most significant: histogram the digit of the keys that
// still match the prefix found so far, pick the bin holding the k-th largest, and stop as soon as
// that bin's keys are all selected. Keys are unique (they embed the position), so at the latest
// the 8th pass ends with a bin of one key. The selected set is then {key : key & mask >= prefix}.
__device__ __forceinline__ void select_topk_block(const uint64_t* keys, int n, int keep, int64_t* out,
                                                  int64_t offset, SelectShared& sh) {
  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  const bool keep_all = keep >= n;
  uint64_t prefix = 0, mask = 0;
  int k_rem = keep;  // how many keys among those matching `prefix` are still to be selected
  if (!keep_all) {
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kImageThreads) sh.hist[i] = 0u;
      __syncthreads();
      // Warp-uniform loop (base steps by kImageThreads for the whole warp) so that __match_any_sync
      // sees all 32 lanes; lanes with the same digit add once (fewer shared atomics on skewed bins).
      for (int base = tid - lane; base < n; base += kImageThreads) {
        const int i = base + lane;
        int digit = 256;  // "no key"
        if (i < n) {
          const uint64_t key = keys[i];
          if ((key & mask) == prefix) digit = static_cast<int>((key >> shift) & 0xFFu);
        }
        const unsigned peers = __match_any_sync(kFullMask, digit);
        if (digit < 256 && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[digit], static_cast<unsigned>(__popc(peers)));
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l owns bins 8l..8l+7. `above` = keys in higher bins; exactly one bin satisfies
        // above < k_rem <= above + count (counts are non-negative and the total is >= k_rem).
        int c[8], s = 0;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          c[t] = static_cast<int>(sh.hist[lane * 8 + t]);
          s += c[t];
        }
        int suffix = s;  // inclusive suffix sum over lanes l..31
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int v = __shfl_down_sync(kFullMask, suffix, o);
          if (lane + o < 32) suffix += v;
        }
        int above = suffix - s;
#pragma unroll
        for (int t = 7; t >= 0; --t) {
          if (above < k_rem && above + c[t] >= k_rem) {
            sh.digit = lane * 8 + t;
            sh.above = above;
            sh.count = c[t];
          }
          above += c[t];
        }
      }
      __syncthreads();
      // Every thread reads the same values: the loop exit below is block-uniform. The next write
      // of sh.digit/above/count comes after two more barriers, the next clear of hist after the
      // barrier above (hist was last read by warp 0 before it).
      const int digit = sh.digit;
      k_rem -= sh.above;
      prefix |= static_cast<uint64_t>(digit) << shift;
      mask |= static_cast<uint64_t>(0xFFu) << shift;
      if (sh.count == k_rem) break;
    }
  }
  // Order-preserving compaction, blockDim positions per step: ballot + per-warp counts.
  int64_t written = 0;
  for (int base = 0; base < n; base += kImageThreads) {
    const int i = base + tid;
    const bool sel = i < n && (keep_all || (keys[i] & mask) >= prefix);
    const unsigned ballot = __ballot_sync(kFullMask, sel);
    if (lane == 0) sh.warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kImageWarps; ++w) {
      const int c = sh.warp_counts[w];
      before += (w < warp) ? c : 0;
      total += c;
    }
    if (sel) out[written + before + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int64_t>(i) + offset;
    written += total;
    __syncthreads();  // warp_counts is rewritten next step; also publishes `out` at the end
  }
}

// dst[c] = src[c * src_stride] (+ pos[c * pos_stride]) for c < C; the sum is taken in fp32 and
// rounded once (as PyTorch's half/bfloat16 add). dst is a contiguous row. One warp per row; with
// `vec` (decided on the host: unit strides, C a multiple of the pack, 16-byte aligned rows) each
// lane moves 16 bytes per step.
template <typename T>
__device__ __forceinline__ void copy_row_warp(T* __restrict__ dst, const T* __restrict__ src, int64_t src_stride,
                                              const T* __restrict__ pos, int64_t pos_stride, int64_t C, bool vec) {
  const int lane = lane_id();
  if (vec) {
    using P = Pack<T>;
    const int64_t packs = C / P::kSize;
    for (int64_t v = lane; v < packs; v += 32) {
      P a = reinterpret_cast<const P*>(src)[v];
      if (pos != nullptr) {
        const P p = reinterpret_cast<const P*>(pos)[v];
#pragma unroll
        for (int e = 0; e < P::kSize; ++e) a.v[e] = static_cast<T>(static_cast<float>(a.v[e]) + static_cast<float>(p.v[e]));
      }
      reinterpret_cast<P*>(dst)[v] = a;
    }
    return;
  }
  for (int64_t c = lane; c < C; c += 32) {
    T a = src[c * src_stride];
    if (pos != nullptr) a = static_cast<T>(static_cast<float>(a) + static_cast<float>(pos[c * pos_stride]));
    dst[c] = a;
  }
}

// ---- host side -------------------------------------------------------------------------------

// Dynamic shared memory for a forward kernel: the selection keys live in shared memory when
// they fit next to the kernel's static shared memory (the fused path); otherwise in a global
// workspace [B, n] (same code, slower). `extra` is dynamic memory needed after the selection
// (it reuses the keys' bytes). Returns the bytes to launch with; sets *keys_in_smem.
template <typename Kernel>
inline size_t plan_dynamic_smem(Kernel kernel, int64_t n_keys, size_t extra, bool* keys_in_smem) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t keys_bytes = static_cast<size_t>(n_keys) * sizeof(uint64_t);
  *keys_in_smem = attr.sharedSizeBytes + std::max(keys_bytes, extra) <= limit;
  const size_t bytes = *keys_in_smem ? std::max(keys_bytes, extra) : extra;
  TORCH_CHECK(attr.sharedSizeBytes + bytes <= limit, "apkernels: kernel needs ", attr.sharedSizeBytes + bytes,
              " bytes of shared memory, the device allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return bytes;
}

// Blocks of kThreads for a grid-stride loop over n elements: enough to fill the GPU, no more.
inline int64_t elementwise_blocks(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min(wanted, cap));
}

// dtype policy: the CUDA kernels take float32, float16 and bfloat16 (accumulating in fp32); float64
// is rejected with an error naming the argument (it runs on the cpu and reference backends).
inline bool is_cuda_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_cuda_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().type() == APK_CUDA_DEVICE_TYPE, op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(is_cuda_float(t), op, ": ", name,
                    " must be a floating-point tensor of float16, bfloat16 or float32 on CUDA (float64 runs on the cpu ",
                    "and reference backends), got ",
                    t.scalar_type());
}

}  // namespace apkernels::cuda

// AT_DISPATCH over the dtypes the CUDA kernels take (the dtype policy above).
#define APK_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
