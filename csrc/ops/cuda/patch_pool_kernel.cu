// CUDA kernel of apkernels::patch_pool (APViT attentive patch pooling); its backward,
// apkernels::pool_backward, is in pool_backward_kernel.cu.
//
// patch_pool: ONE launch. It scores the N = H*W positions of x [B, C, H, W] (channel reduction in
// fp32), selects the top `keep` (select_topk_block), writes the kept positions ascending, and
// gathers (x as tokens + pos) into tokens [B, keep, C]. x is read through its strides (NCHW,
// channels_last, slices), never copied. On sm_90 a thread-block cluster per image holds x in shared
// memory and reads it once (patch_pool_cluster_kernel); before sm_90, or where the slices do not fit,
// one block per image reads x for the scores and the kept rows again (patch_pool_kernel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "ops/common.h"
#include "ops/pool_checks.h"
#include "ops/cuda/helpers.cuh"

#include <cooperative_groups.h>

namespace cg = cooperative_groups;

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

// The strides both forward kernels read x and pos through (elements).
struct Strides {
  int64_t sB, sC, sH, sW;  // x
  int64_t pos_sN, pos_sC;  // pos over (position, channel); 0 without pos
};

inline Strides strides_of(const at::Tensor& x, const at::Tensor& pos) {
  return Strides{x.stride(0), x.stride(1), x.stride(2), x.stride(3), pos.defined() ? pos.stride(0) : 0,
                 pos.defined() ? pos.stride(1) : 0};
}

struct PatchArgs : Strides {
  int64_t C, W, N;
  int keep;
  bool channels_contiguous;  // sC == 1: a position's channels are one contiguous row
  bool vec_x;                // ... and x rows can be read as 16-byte packs
  bool vec_rows;             // the row gather (x, pos, out) can move 16-byte packs
};

// Scores of n positions over `channels` values each, by a block of kImageThreads threads: one thread
// per position (consecutive threads take consecutive positions, so reads along a channel plane
// coalesce), and when n < kImageThreads `groups` threads per position split the channels, their
// partial results merged in group order (deterministic). value(p, c) is the c-th value of position
// p (fp32); emit(p, score) runs once per position. Every thread of the block must call it;
// `partial` is kImageThreads floats of shared memory. Ends with __syncthreads().
template <ScoreKind kind, typename Value, typename Emit>
__device__ __forceinline__ void score_positions_block(int n, int64_t channels, float* partial, Value value,
                                                      Emit emit) {
  const int tid = threadIdx.x;
  const int per_round = min(kImageThreads, (n + 31) / 32 * 32);
  const int groups = kImageThreads / per_round;
  const int g = tid / per_round, local = tid % per_round;
  for (int p0 = 0; p0 < n; p0 += per_round) {
    const int p = p0 + local;
    if (g < groups && p < n) {
      float acc = score_init<kind, float>();
#pragma unroll 4
      for (int64_t c = g; c < channels; c += groups) acc = score_step<kind, float>(acc, value(p, c));
      partial[tid] = acc;
    }
    __syncthreads();
    if (tid < per_round && p < n) {  // g == 0, local == tid
      float s = partial[tid];
      for (int gg = 1; gg < groups; ++gg) s = score_combine<kind, float>(s, partial[gg * per_round + tid]);
      emit(p, s);
    }
    __syncthreads();
  }
}

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

  const int lane = lane_id(), warp = warp_id();
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
      // One thread per position, reading along a channel plane (score_positions_block).
      score_positions_block<kind>(
          n, a.C, partial, [&](int p, int64_t c) { return static_cast<float>(xb[spatial_offset(a, p) + c * a.sC]); },
          [&](int p, float s) { keys[p] = select_key64(s, static_cast<uint32_t>(p)); });
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

// ---- sm_90: a thread-block cluster per image, x read once --------------------------------------
// A cluster of up to kMaxClusterBlocks blocks pools one image at a time; block rank r owns channels
// [r * slice, (r + 1) * slice). Per image each block copies its channel slice of x into shared
// memory (the only read of x), scores it (a partial score per position), the partials are read over
// distributed shared memory and combined in rank order (every block computes the same keys, so every
// block selects the same positions), and each block writes its channel slice of the kept rows from
// shared memory (+ pos). The grid is persistent: cluster k pools images k, k + clusters, ... and
// keeps its pos slice [N, slice] in shared memory, read once per cluster instead of per image.
constexpr int kMaxClusterBlocks = 8;  // the portable cluster size
// Fewer clusters at small batches: each cluster reads pos once, and that re-read is held to about
// this fraction of the minimal traffic (B = 256 at the paper shape: 16 clusters, B = 32: 3).
constexpr double kPosRereadBudget = 0.04;

struct ClusterArgs : Strides {
  int64_t B;
  int C, N, W, keep;
  int slice;     // channels per block
  int x_stride;  // row stride (elements) of the x slice in shared memory: N, odd (bank-conflict free)
  int clusters;  // clusters in the grid (persistent)
  bool flat_spatial;   // sH == W * sW: position p is p * sW (no division)
  bool channels_fast;  // sC == 1: load along channels (channels_last), else along positions
};

// Byte offsets of the cluster kernel's dynamic shared memory; the host sizes the launch with it.
struct ClusterLayout {
  size_t keys, kept, part, x, pos, bytes;
};

__host__ __device__ inline size_t round_up16(size_t v) { return (v + 15) / 16 * 16; }

__host__ __device__ inline ClusterLayout cluster_layout(int N, int keep, int slice, int x_stride, size_t elem,
                                                        bool has_pos) {
  ClusterLayout l;
  l.keys = 0;                                                  // uint64 [N] selection keys
  l.kept = round_up16(l.keys + sizeof(uint64_t) * N);         // int64 [keep] kept positions
  l.part = round_up16(l.kept + sizeof(int64_t) * keep);       // float [2][N] partial scores (double buffer)
  l.x = round_up16(l.part + sizeof(float) * 2 * N);           // T [slice][x_stride] x slice
  l.pos = round_up16(l.x + elem * size_t(slice) * x_stride);  // T [N][slice] pos slice
  l.bytes = has_pos ? round_up16(l.pos + elem * size_t(N) * slice) : l.pos;
  return l;
}

template <typename T, ScoreKind kind>
__global__ void __launch_bounds__(kImageThreads)
    patch_pool_cluster_kernel(const T* __restrict__ x, const T* __restrict__ pos, const ClusterArgs a,
                              T* __restrict__ out, int64_t* __restrict__ index) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ SelectShared sh;
  __shared__ float partial[kImageThreads];

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), ranks = static_cast<int>(cluster.num_blocks());
  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  const int n = a.N;
  const ClusterLayout lay = cluster_layout(n, a.keep, a.slice, a.x_stride, sizeof(T), pos != nullptr);
  uint64_t* keys = reinterpret_cast<uint64_t*>(dyn_smem + lay.keys);
  int64_t* kept = reinterpret_cast<int64_t*>(dyn_smem + lay.kept);
  float* part = reinterpret_cast<float*>(dyn_smem + lay.part);
  T* xs = reinterpret_cast<T*>(dyn_smem + lay.x);
  T* ps = reinterpret_cast<T*>(dyn_smem + lay.pos);
  const int c0 = rank * a.slice;
  const int cs = max(0, min(a.slice, a.C - c0));  // channels this block owns (the last may own fewer, or none)
  auto spatial = [&](int p) -> int64_t {
    return a.flat_spatial ? p * a.sW : (p / a.W) * a.sH + (p % a.W) * a.sW;
  };

  // The pos slice, once per cluster (first read after the barrier below).
  if (pos != nullptr) {
    for (int p = warp; p < n; p += kImageWarps) {
#pragma unroll 4
      for (int c = lane; c < cs; c += 32) ps[p * a.slice + c] = pos[p * a.pos_sN + (c0 + c) * a.pos_sC];
    }
  }

  int iteration = 0;
  for (int64_t b = blockIdx.x / ranks; b < a.B; b += a.clusters, ++iteration) {
    const T* xb = x + b * a.sB;
    // 1. This block's channel slice of x -> shared memory, the image's only read of x.
    if (a.channels_fast) {
      for (int p = warp; p < n; p += kImageWarps) {
        const T* row = xb + spatial(p) + c0;
#pragma unroll 4
        for (int c = lane; c < cs; c += 32) xs[c * a.x_stride + p] = row[c];
      }
    } else {
      for (int c = warp; c < cs; c += kImageWarps) {
        const T* plane = xb + static_cast<int64_t>(c0 + c) * a.sC;
#pragma unroll 8
        for (int p = lane; p < n; p += 32) xs[c * a.x_stride + p] = plane[spatial(p)];
      }
    }
    __syncthreads();

    if (a.keep < n) {
      // 2. Partial scores over this block's channels (score_positions_block) into this image's half
      // of the double buffer (the other half may still be read by blocks finishing the previous image).
      float* my_part = part + (iteration & 1) * n;
      score_positions_block<kind>(
          n, cs, partial, [&](int p, int64_t c) { return static_cast<float>(xs[static_cast<int>(c) * a.x_stride + p]); },
          [&](int p, float s) { my_part[p] = s; });
      cluster.sync();  // every block's partials of this image are complete and visible
      // 3. Full scores in rank order (the same bits in every block) -> keys.
      for (int p = tid; p < n; p += kImageThreads) {
        float s = cluster.map_shared_rank(my_part, 0)[p];
        for (int r = 1; r < ranks; ++r) s = score_combine<kind, float>(s, cluster.map_shared_rank(my_part, r)[p]);
        keys[p] = select_key64(s, static_cast<uint32_t>(p));
      }
      __syncthreads();
    }

    // 4. Top `keep`, positions ascending, into shared memory; rank 0 writes index[b].
    select_topk_block(keys, n, a.keep, kept, 0, sh);
    if (rank == 0) {
      for (int j = tid; j < a.keep; j += kImageThreads) index[b * a.keep + j] = kept[j];
    }

    // 5. tokens[b, j, c0 : c0 + cs] = x slice at kept[j] (+ pos), from shared memory.
    T* outb = out + b * a.keep * a.C + c0;
    for (int j = warp; j < a.keep; j += kImageWarps) {
      const int p = static_cast<int>(kept[j]);
      T* dst = outb + static_cast<int64_t>(j) * a.C;
#pragma unroll 4
      for (int c = lane; c < cs; c += 32) {
        if (pos != nullptr) {
          dst[c] = static_cast<T>(static_cast<float>(xs[c * a.x_stride + p]) + static_cast<float>(ps[p * a.slice + c]));
        } else {
          dst[c] = xs[c * a.x_stride + p];
        }
      }
    }
    __syncthreads();  // xs and kept are rewritten for the next image
  }
  // No block leaves while another may still read its partial scores.
  cluster.sync();
#else
  CUDA_KERNEL_ASSERT(false && "patch_pool_cluster_kernel needs sm_90");
#endif
}

// Launch plan of the cluster kernel, or cluster_blocks == 0 where it does not apply (device older
// than sm_90, or the slices do not fit the shared memory): the caller then runs patch_pool_kernel.
struct ClusterPlan {
  int cluster_blocks = 0;
  size_t smem = 0;
  ClusterArgs args;
};

template <typename Kernel>
ClusterPlan plan_cluster(Kernel kernel, const at::Tensor& x, const at::Tensor& pos, int64_t keep) {
  ClusterPlan plan;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 9) return plan;
  const int64_t B = x.size(0), C = x.size(1), W = x.size(3), N = x.size(2) * W;
  const int blocks = C >= 8 ? 8 : C >= 4 ? 4 : C >= 2 ? 2 : 1;
  static_assert(kMaxClusterBlocks == 8, "cluster sizes above");
  const int64_t slice = (C + blocks - 1) / blocks;
  const int64_t x_stride = N | 1;
  const size_t elem = x.element_size();
  if (N * x_stride >= (int64_t(1) << 31) || slice * x_stride >= (int64_t(1) << 31)) return plan;
  const ClusterLayout lay = cluster_layout(static_cast<int>(N), static_cast<int>(keep), static_cast<int>(slice),
                                           static_cast<int>(x_stride), elem, pos.defined());
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (attr.sharedSizeBytes + lay.bytes > prop->sharedMemPerBlockOptin) return plan;
  if (lay.bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(lay.bytes)));
  }
  // Persistent grid: at most one cluster per `blocks` SMs (one block per SM at the paper shape),
  // no more than images, and no more than the pos re-read budget allows.
  int64_t clusters = std::min<int64_t>(B, std::max(1, prop->multiProcessorCount / blocks));
  if (pos.defined()) {
    const double image_bytes = double(elem) * (C * N + keep * C) + sizeof(int64_t) * keep;
    const double pos_bytes = double(elem) * N * C;
    clusters = std::min<int64_t>(clusters, 1 + static_cast<int64_t>(B * image_bytes * kPosRereadBudget / pos_bytes));
  }
  ClusterArgs& a = plan.args;
  a.B = B;
  a.C = static_cast<int>(C);
  a.N = static_cast<int>(N);
  a.W = static_cast<int>(W);
  a.keep = static_cast<int>(keep);
  a.slice = static_cast<int>(slice);
  a.x_stride = static_cast<int>(x_stride);
  a.clusters = static_cast<int>(clusters);
  static_cast<Strides&>(a) = strides_of(x, pos);
  a.flat_spatial = a.sH == W * a.sW;
  a.channels_fast = a.sC == 1 && C > 1;
  plan.cluster_blocks = blocks;
  plan.smem = lay.bytes;
  return plan;
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
  static_cast<Strides&>(a) = strides_of(x, pos);
  a.C = C;
  a.W = W;
  a.N = N;
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
      const ClusterPlan cluster = plan_cluster(patch_pool_cluster_kernel<scalar_t, kind_v>, x, pos, keep);
      if (cluster.cluster_blocks > 0) {
        const unsigned grid = static_cast<unsigned>(cluster.args.clusters * cluster.cluster_blocks);
        APK_LAUNCH_CLUSTER(grid, kImageThreads, dim3(cluster.cluster_blocks), cluster.smem,
                           at::cuda::getCurrentCUDAStream(), patch_pool_cluster_kernel<scalar_t, kind_v>)(
            x_ptr, pos_ptr, cluster.args, tokens.mutable_data_ptr<scalar_t>(), index.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      // Before sm_90, or slices too large for the shared memory: one block per image, x read for
      // the scores and its kept rows again for the gather.
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
