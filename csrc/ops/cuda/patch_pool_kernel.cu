// CUDA kernel of apkernels::patch_pool (APViT attentive patch pooling); its backward,
// apkernels::pool_backward, is in pool_backward_kernel.cu.
//
// patch_pool: ONE launch, one block per image. The block scores the N = H*W positions of x
// [B, C, H, W] (channel reduction in fp32), selects the top `keep` in shared memory
// (select_topk_block), writes the kept positions ascending, and gathers (x as tokens + pos) into
// tokens [B, keep, C]. x is read through its strides (NCHW, channels_last, slices), never copied.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "ops/common.h"
#include "ops/pool_checks.h"
#include "ops/cuda/helpers.cuh"

namespace apkernels::cuda {
namespace {

// Positions (and kept rows) per block are ints; keys embed positions in 32 bits.
constexpr int64_t kMaxPositions = int64_t(1) << 30;

// Transpose tiles of the NCHW gather: each warp stages 32 kept rows x 16 channels in fp32. The
// row stride 34 makes both phases bank-conflict free (loads: lanes on consecutive floats; stores:
// lanes 0-15 hit even banks, 16-31 odd banks).
constexpr int kTileRows = 32;
constexpr int kTileChannels = 16;
constexpr int kTileStride = 34;
constexpr size_t kTileBytes = size_t(kImageWarps) * kTileChannels * kTileStride * sizeof(float);

struct PatchArgs {
  int64_t C, W, N;
  int64_t sB, sC, sH, sW;  // x strides (elements)
  int64_t pos_sN, pos_sC;  // pos strides over (position, channel)
  int keep;
  bool channels_contiguous;  // sC == 1: a position's channels are one contiguous row
  bool vec_x;                // ... and x rows can be read as 16-byte packs
  bool vec_rows;             // the row gather (x, pos, out) can move 16-byte packs
};

// Offset of position p (row-major over H, W) inside one image of x.
__device__ __forceinline__ int64_t spatial_offset(const PatchArgs& a, int64_t p) {
  return (p / a.W) * a.sH + (p % a.W) * a.sW;
}

// kKeysInSmem: the selection keys live in dynamic shared memory (through a pointer the compiler
// knows is shared: shared loads/stores), else in the global workspace keys_global [B, N].
template <typename T, ScoreKind kind, bool kKeysInSmem>
__global__ void __launch_bounds__(kImageThreads)
    patch_pool_kernel(const T* __restrict__ x, const T* __restrict__ pos, const PatchArgs a, uint64_t* keys_global,
                      T* __restrict__ out, int64_t* index) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ SelectShared sh;
  __shared__ float partial[kImageThreads];

  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  const int64_t b = blockIdx.x;
  const int n = static_cast<int>(a.N);
  const T* xb = x + b * a.sB;
  int64_t* idx = index + b * a.keep;
  uint64_t* keys;
  if constexpr (kKeysInSmem) {
    keys = reinterpret_cast<uint64_t*>(dyn_smem);
  } else {
    keys = keys_global + b * a.N;
  }

  // 1. Scores -> keys (skipped when everything is kept).
  if (a.keep < n) {
    if (a.channels_contiguous) {
      // One warp per position, lanes over its contiguous channels.
      for (int p = warp; p < n; p += kImageWarps) {
        const T* row = xb + spatial_offset(a, p);
        float acc = score_init<kind, float>();
        if (a.vec_x) {
          using P = Pack<T>;
          const int64_t packs = a.C / P::kSize;
          for (int64_t v = lane; v < packs; v += 32) {
            const P pk = reinterpret_cast<const P*>(row)[v];
#pragma unroll
            for (int e = 0; e < P::kSize; ++e) acc = score_step<kind, float>(acc, static_cast<float>(pk.v[e]));
          }
        } else {
          for (int64_t c = lane; c < a.C; c += 32) acc = score_step<kind, float>(acc, static_cast<float>(row[c]));
        }
        acc = warp_score<kind>(acc);
        if (lane == 0) keys[p] = select_key64(acc, static_cast<uint32_t>(p));
      }
    } else {
      // One thread per position (consecutive threads read consecutive positions of a channel
      // plane), `groups` threads per position splitting the channels when N < kImageThreads; the
      // partial scores are merged in group order (deterministic).
      const int per_round = min(kImageThreads, (n + 31) / 32 * 32);
      const int groups = kImageThreads / per_round;
      const int g = tid / per_round, local = tid % per_round;
      for (int p0 = 0; p0 < n; p0 += per_round) {
        const int p = p0 + local;
        if (g < groups && p < n) {
          const T* col = xb + spatial_offset(a, p);
          float acc = score_init<kind, float>();
#pragma unroll 4
          for (int64_t c = g; c < a.C; c += groups) acc = score_step<kind, float>(acc, static_cast<float>(col[c * a.sC]));
          partial[tid] = acc;
        }
        __syncthreads();
        if (tid < per_round && p < n) {  // g == 0, local == tid
          float s = partial[tid];
          for (int gg = 1; gg < groups; ++gg) s = score_combine<kind, float>(s, partial[gg * per_round + tid]);
          keys[p] = select_key64(s, static_cast<uint32_t>(p));
        }
        __syncthreads();
      }
    }
    __syncthreads();
  }

  // 2. Top `keep`, positions ascending -> index[b].
  select_topk_block(keys, n, a.keep, idx, 0, sh);

  // 3. Gather tokens[b, j, :] = x[b, :, idx[j]] (+ pos[idx[j], :]).
  T* outb = out + b * a.keep * a.C;
  if (a.channels_contiguous) {
    for (int j = warp; j < a.keep; j += kImageWarps) {
      const int64_t p = idx[j];
      copy_row_warp(outb + j * a.C, xb + spatial_offset(a, p), int64_t(1), pos != nullptr ? pos + p * a.pos_sN : nullptr,
                    a.pos_sC, a.C, a.vec_rows);
    }
    return;
  }
  // NCHW-like: a kept position's channels are a plane apart. Each warp transposes 32 rows x 16
  // channels through shared memory (the keys' bytes, free after the selection's last barrier):
  // reads run along positions, writes along channels.
  float* tile = reinterpret_cast<float*>(dyn_smem) + warp * (kTileChannels * kTileStride);
  const int64_t tiles_c = (a.C + kTileChannels - 1) / kTileChannels;
  const int64_t tiles = (a.keep + kTileRows - 1) / kTileRows * tiles_c;
  for (int64_t t = warp; t < tiles; t += kImageWarps) {  // warp-uniform: shuffles below see all lanes
    const int64_t j0 = (t / tiles_c) * kTileRows, c0 = (t % tiles_c) * kTileChannels;
    const int64_t j = j0 + lane;
    const bool row_ok = j < a.keep;
    const int64_t p = row_ok ? idx[j] : 0;
    const T* col = xb + spatial_offset(a, p);
#pragma unroll
    for (int c = 0; c < kTileChannels; ++c) {
      tile[c * kTileStride + lane] =
          (row_ok && c0 + c < a.C) ? static_cast<float>(col[(c0 + c) * a.sC]) : 0.0f;
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < kTileRows / 2; ++it) {
      const int r = it * 2 + (lane >> 4), cc = lane & 15;
      const int64_t pr = __shfl_sync(kFullMask, p, r);
      const int64_t jr = j0 + r, c = c0 + cc;
      if (jr < a.keep && c < a.C) {
        float v = tile[cc * kTileStride + r];
        if (pos != nullptr) v += static_cast<float>(pos[pr * a.pos_sN + c * a.pos_sC]);
        outb[jr * a.C + c] = static_cast<T>(v);
      }
    }
    __syncwarp();  // the tile is refilled next iteration
  }
}

std::tuple<at::Tensor, at::Tensor> patch_pool_cuda(const at::Tensor& x, int64_t keep,
                                                   const std::optional<at::Tensor>& pos_in, c10::string_view score) {
  check_cuda_float("patch_pool", "x", x);
  check_patch_pool_shapes(x, keep);
  const ScoreKind kind = parse_patch_score(std::string(score));
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t N = H * W;
  TORCH_CHECK_VALUE(N <= kMaxPositions, "patch_pool: the CUDA kernel takes at most 2^30 positions H*W, got ", N);
  TORCH_CHECK_VALUE(B <= INT32_MAX, "patch_pool: the CUDA kernel takes at most 2^31-1 images, got B=", B);
  const at::Tensor pos = check_patch_pos(pos_in, x, N, C);  // a view: read through its strides

  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor tokens = at::empty({B, keep, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor index = at::empty({B, keep}, x.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  if (B == 0) return {tokens, index};  // an empty batch: no zero-sized grid

  PatchArgs a;
  a.C = C;
  a.W = W;
  a.N = N;
  a.sB = x.stride(0);
  a.sC = x.stride(1);
  a.sH = x.stride(2);
  a.sW = x.stride(3);
  a.pos_sN = pos.defined() ? pos.stride(0) : 0;
  a.pos_sC = pos.defined() ? pos.stride(1) : 0;
  a.keep = static_cast<int>(keep);
  a.channels_contiguous = a.sC == 1 || C == 1;
  if (C == 1) a.sC = 1;

  APK_DISPATCH_CUDA_FLOATS(x.scalar_type(), "patch_pool_cuda", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* pos_ptr = pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr;
    constexpr int64_t pack = Pack<scalar_t>::kSize;
    // Packs need every row start 16-byte aligned: base pointers aligned, strides and C multiples of a pack.
    a.vec_x = a.channels_contiguous && C % pack == 0 && vec_aligned<scalar_t>(x_ptr, a.sB) && a.sH % pack == 0 &&
              a.sW % pack == 0;
    a.vec_rows = a.vec_x && (pos_ptr == nullptr || (a.pos_sC == 1 && vec_aligned<scalar_t>(pos_ptr, a.pos_sN)));

    dispatch_patch_score(kind, [&](auto kind_c) {
      constexpr ScoreKind kind_v = decltype(kind_c)::value;
      const int64_t n_keys = keep < N ? N : 0;
      const size_t extra = a.channels_contiguous ? 0 : kTileBytes;
      bool keys_in_smem = true;
      size_t smem = plan_dynamic_smem(patch_pool_kernel<scalar_t, kind_v, true>, n_keys, extra, &keys_in_smem);
      auto kernel = patch_pool_kernel<scalar_t, kind_v, true>;
      at::Tensor workspace;
      uint64_t* keys_global = nullptr;
      if (!keys_in_smem) {
        kernel = patch_pool_kernel<scalar_t, kind_v, false>;
        bool unused;
        smem = plan_dynamic_smem(kernel, 0, extra, &unused);
        workspace = at::empty({B, N}, x.options().dtype(at::kLong));
        keys_global = reinterpret_cast<uint64_t*>(workspace.data_ptr<int64_t>());
      }
      APK_LAUNCH(static_cast<unsigned>(B), kImageThreads, smem, at::cuda::getCurrentCUDAStream(), kernel)(
          x_ptr, pos_ptr, a, keys_global, tokens.mutable_data_ptr<scalar_t>(), index.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {tokens, index};
}

}  // namespace
}  // namespace apkernels::cuda

APK_CUDA_LIBRARY_IMPL(m) {
  m.impl(APK_CUDA_OP("patch_pool"), &apkernels::cuda::patch_pool_cuda);
}
