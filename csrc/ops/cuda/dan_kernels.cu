// CUDA kernels of DAN's two fused ops, in one translation unit to keep the build short.
//
// dan_spatial_pool: g[b, m, c] = mean_p x[b, c, p] s[b, m, p],  s[b, m, p] = sum_c2 relu(z[b, m, c2, p]);
// the forward returns s (fp32 [B, M, P]) too, and the backward reads it instead of recomputing it.
//   spatial_pool_kernel           forward, one launch: one CTA per image (grid-stride over images)
//                                 computes s for all M heads into shared memory (and writes it out),
//                                 then reads x once for all heads (one warp per channel).
//   spatial_pool_backward_kernel  backward, one launch: per image, s and grad_g into shared memory,
//                                 one pass over x accumulates t[m, p] = sum_c dg[m, c] x[c, p] / P and
//                                 writes dx[c, p] = sum_m dg[m, c] s[m, p] / P, then one pass over z
//                                 writes dz = 1[z > 0] t.
//   Fallback when M * H * W (or M * C) outgrows shared memory: channel_reduce_kernel (s, or t),
//   pool_kernel (g), grad_x_kernel / grad_z_kernel (elementwise): 2 launches forward, 3 backward.
// dan_head_fusion: one thread per (image, channel) holds its M <= kMaxFusionHeads heads in registers:
//   g and gate_logits read once, heads and fused written once (forward), every input read once
//   (backward); more heads take the two-pass kernels (online logsumexp, then the outputs).
// No atomics: every reduction has a fixed order, so results are deterministic run to run.
// Inputs of any strides are read in place; outputs are contiguous; s and t are fp32. dtypes: fp32,
// fp16, bf16 (the CUDA dtype policy: float64 is rejected).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>

#include "ops/cuda/helpers.cuh"
#include "ops/dan_checks.h"

namespace apkernels::cuda {
namespace {

// Blocks of kThreads as (kWarpSize, kWarps): lanes over positions, warps over channels / (b, c).
constexpr int kWarp = kWarpSize;
constexpr int kReduceWarps = kWarps;  // warps of channel_reduce_kernel
constexpr int kPoolWarps = kWarps;    // warps (channels) per block of pool_kernel

// Strides of x [B, C, H, W] / z [B, M, C2, H, W] (x as a 5-D view with M = 1, stride 0).
struct View5 {
  int64_t s0, s1, s2, s3, s4;
};

View5 view_of(const at::Tensor& t) {
  if (t.dim() == 4) return {t.stride(0), 0, t.stride(1), t.stride(2), t.stride(3)};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// A [B, M, C] operand ([B, C] as M = 1, stride 0).
struct View3 {
  int64_t s0, s1, s2;
};

View3 view3_of(const at::Tensor& t) {
  if (t.dim() == 2) return {t.stride(0), 0, t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, like torch.relu
}

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + exp_acc(-v));
}

// out[b, m, p] = sum_k w(b, m, k) f(in[b, m, k, p]) / divisor over k < K, where
//   kRelu (s):  in = z, f = relu, w = 1;
//   !kRelu (t): in = x (s1 = 0), f = identity, w = dg[b, m, k].
// Block (32, kReduceWarps): threadIdx.x picks the position, threadIdx.y a slice of k.
template <bool kRelu, typename scalar_t, typename acc_t>
__global__ void channel_reduce_kernel(const scalar_t* __restrict__ in, View5 iv, const scalar_t* __restrict__ w,
                                      View3 wv, int64_t M, int64_t K, int64_t W, int64_t P, int64_t tiles,
                                      acc_t divisor, acc_t* __restrict__ out) {
  __shared__ acc_t partial[kReduceWarps][kWarp];
  const int64_t block = blockIdx.x;
  const int64_t tile = block % tiles;
  const int64_t m = (block / tiles) % M;
  const int64_t b = block / (tiles * M);
  const int64_t p = tile * kWarp + threadIdx.x;
  acc_t acc = 0;
  if (p < P) {
    const scalar_t* base = in + b * iv.s0 + m * iv.s1 + (p / W) * iv.s3 + (p % W) * iv.s4;
    for (int64_t k = threadIdx.y; k < K; k += kReduceWarps) {
      const acc_t v = static_cast<acc_t>(base[k * iv.s2]);
      if constexpr (kRelu) {
        acc += relu(v);
      } else {
        acc += static_cast<acc_t>(w[b * wv.s0 + m * wv.s1 + k * wv.s2]) * v;
      }
    }
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && p < P) {
    acc_t total = partial[0][threadIdx.x];
    for (int y = 1; y < kReduceWarps; ++y) total += partial[y][threadIdx.x];
    out[(b * M + m) * P + p] = total / divisor;
  }
}

// g[b, m, c] = sum_p x[b, c, p] s[b, m, p] / P: one warp per (b, c), all M heads. P < 2^31
// (checked on the host): positions are 32-bit, split into (h, w) by a magic-number division.
template <typename scalar_t, typename acc_t>
__global__ void pool_kernel(const scalar_t* __restrict__ x, View5 xv, const acc_t* __restrict__ s, int64_t B,
                            int64_t C, int64_t M, Divider<uint32_t> by_W, uint32_t P, scalar_t* __restrict__ g) {
  const int64_t bc = static_cast<int64_t>(blockIdx.x) * kPoolWarps + threadIdx.y;
  if (bc >= B * C) return;  // uniform per warp: no shuffle below is left half-full
  const int64_t b = bc / C, c = bc % C;
  const scalar_t* xb = x + b * xv.s0 + c * xv.s2;
  for (int64_t m = 0; m < M; ++m) {
    const acc_t* sm = s + (b * M + m) * P;
    acc_t acc = 0;
    for (uint32_t p = threadIdx.x; p < P; p += kWarp) {
      const auto hw = by_W.divmod(p);
      acc += static_cast<acc_t>(xb[static_cast<int64_t>(hw.div) * xv.s3 + static_cast<int64_t>(hw.mod) * xv.s4]) * sm[p];
    }
    acc = warp_sum(acc);
    if (threadIdx.x == 0) g[(b * M + m) * C + c] = static_cast<scalar_t>(acc / static_cast<acc_t>(P));
  }
}

// dx[b, c, p] = sum_m dg[b, m, c] s[b, m, p] / P, dx contiguous (n elements).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void grad_x_kernel(const scalar_t* __restrict__ dg, View3 gv, const acc_t* __restrict__ s,
                              Divider<index_t> by_C, Divider<index_t> by_P, int64_t M, int64_t P, index_t n,
                              scalar_t* __restrict__ dx) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const auto bc_p = by_P.divmod(i);
    const auto b_c = by_C.divmod(bc_p.div);
    const int64_t p = bc_p.mod, c = b_c.mod, b = b_c.div;
    acc_t acc = 0;
    for (int64_t m = 0; m < M; ++m)
      acc += static_cast<acc_t>(dg[b * gv.s0 + m * gv.s1 + c * gv.s2]) * s[(b * M + m) * P + p];
    dx[i] = static_cast<scalar_t>(acc / static_cast<acc_t>(P));
  }
}

// dz[b, m, c2, p] = 1[z > 0] t[b, m, p], dz contiguous (n elements).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void grad_z_kernel(const scalar_t* __restrict__ z, View5 zv, const acc_t* __restrict__ t,
                              Divider<index_t> by_M, Divider<index_t> by_C2, Divider<index_t> by_W,
                              Divider<index_t> by_P, int64_t P, index_t n, scalar_t* __restrict__ dz) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const auto row_p = by_P.divmod(i);
    const auto bm_c2 = by_C2.divmod(row_p.div);
    const auto b_m = by_M.divmod(bm_c2.div);
    const auto h_w = by_W.divmod(row_p.mod);
    const int64_t b = b_m.div, m = b_m.mod, c2 = bm_c2.mod, bm = bm_c2.div, p = row_p.mod;
    const acc_t v = static_cast<acc_t>(
        z[b * zv.s0 + m * zv.s1 + c2 * zv.s2 + static_cast<int64_t>(h_w.div) * zv.s3 + static_cast<int64_t>(h_w.mod) * zv.s4]);
    dz[i] = static_cast<scalar_t>(v <= acc_t(0) ? acc_t(0) : t[bm * P + p]);  // torch.relu's gradient at NaN z: t
  }
}

// Fallback for M > kMaxFusionHeads, one thread per (b, c): h[m] = g sigmoid(a); heads = h - logsumexp_m h
// (M > 1); fused = sum_m heads. Reads g and gate twice (online logsumexp, then the outputs).
template <typename scalar_t, typename acc_t>
__global__ void head_fusion_kernel(const scalar_t* __restrict__ g, View3 gv, const scalar_t* __restrict__ a,
                                   View3 av, int64_t B, int64_t M, int64_t C, scalar_t* __restrict__ fused,
                                   scalar_t* __restrict__ heads) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < B * C;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / C, c = i % C;
    const scalar_t* gp = g + b * gv.s0 + c * gv.s2;
    const scalar_t* ap = a + b * av.s0 + c * av.s2;
    acc_t lse = 0;
    if (M > 1) {  // online logsumexp: running max mx and sum of exp(h - mx)
      acc_t mx = static_cast<acc_t>(gp[0]) * sigmoid(static_cast<acc_t>(ap[0])), sum = 1;
      for (int64_t m = 1; m < M; ++m) {
        const acc_t h = static_cast<acc_t>(gp[m * gv.s1]) * sigmoid(static_cast<acc_t>(ap[m * av.s1]));
        if (h > mx) {
          sum = sum * exp_acc(mx - h) + acc_t(1);
          mx = h;
        } else {
          sum += exp_acc(h - mx);  // a NaN h lands here and makes the sum NaN
        }
      }
      // A +inf head: torch's max-then-sum form takes exp(inf - inf) = NaN, so every head is NaN;
      // the online form above would instead count that head as exp(0) = 1.
      lse = mx == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN()
                                                                : mx + log_acc(sum);
    }
    acc_t total = 0;
    for (int64_t m = 0; m < M; ++m) {
      const acc_t h = static_cast<acc_t>(gp[m * gv.s1]) * sigmoid(static_cast<acc_t>(ap[m * av.s1])) - lse;
      heads[(b * M + m) * C + c] = static_cast<scalar_t>(h);
      total += h;
    }
    fused[i] = static_cast<scalar_t>(total);
  }
}

// One thread per (b, c): gh = grad_heads + grad_fused; gh -= exp(heads) sum_m gh (M > 1);
// dg = gh sig(a); da = gh g sig(a) (1 - sig(a)).
template <typename scalar_t, typename acc_t>
__global__ void head_fusion_backward_kernel(const scalar_t* __restrict__ grad_fused, View3 fv,
                                            const scalar_t* __restrict__ grad_heads, View3 hv,
                                            const scalar_t* __restrict__ g, View3 gv,
                                            const scalar_t* __restrict__ a, View3 av,
                                            const scalar_t* __restrict__ heads, View3 ov, int64_t B, int64_t M,
                                            int64_t C, scalar_t* __restrict__ grad_g,
                                            scalar_t* __restrict__ grad_gate) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < B * C;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / C, c = i % C;
    const acc_t gf = static_cast<acc_t>(grad_fused[b * fv.s0 + c * fv.s2]);
    const scalar_t* ghp = grad_heads + b * hv.s0 + c * hv.s2;
    acc_t sum = 0;
    if (M > 1)
      for (int64_t m = 0; m < M; ++m) sum += static_cast<acc_t>(ghp[m * hv.s1]) + gf;
    for (int64_t m = 0; m < M; ++m) {
      acc_t gh = static_cast<acc_t>(ghp[m * hv.s1]) + gf;
      if (M > 1) gh -= exp_acc(static_cast<acc_t>(heads[b * ov.s0 + m * ov.s1 + c * ov.s2])) * sum;
      const acc_t gate = sigmoid(static_cast<acc_t>(a[b * av.s0 + m * av.s1 + c * av.s2]));
      const acc_t gm = static_cast<acc_t>(g[b * gv.s0 + m * gv.s1 + c * gv.s2]);
      grad_g[(b * M + m) * C + c] = static_cast<scalar_t>(gh * gate);
      grad_gate[(b * M + m) * C + c] = static_cast<scalar_t>(gh * gm * gate * (acc_t(1) - gate));
    }
  }
}

// ---- dan_spatial_pool, fused: one CTA of kImageThreads per image -------------------------------
//
// Work split of an image's [rows, P] planes (z[m] is [C2, P], x is [C, P]) over the CTA: slot
// j = r * P + p for r < R = max(1, kImageThreads / P); slot j sums rows r, r + R, r + 2R, ... at
// position p. Consecutive threads take consecutive positions, so a contiguous tensor is read at
// consecutive addresses; the R partial sums of a position are then combined in shared memory in
// ascending r (a fixed order: deterministic). The position p of a slot and its (h, w) offset are
// computed once per slot, never per element.
constexpr int kHeadChunk = 4;     // heads accumulated in registers per pass over x (DAN: 4 heads)
constexpr int kChannelGroup = 4;  // channels a warp pools at once (independent loads in flight)
constexpr int kImagesPerSm = 2048 / kImageThreads;  // resident image CTAs per SM (thread limit)
// At least 2 image CTAs per SM (<= 64 registers per thread): B = 256 images then all fit on 132 SMs
// at once, and ptxas keeps the bf16 backward free of spills (left to itself it picked 40 registers
// and spilled 12 bytes).
constexpr int kImagesPerSmMin = 2;

__device__ __forceinline__ int64_t plane_offset(int p, int W, int64_t sh, int64_t sw) {
  return static_cast<int64_t>(p / W) * sh + static_cast<int64_t>(p % W) * sw;
}

// Forward. Dynamic shared memory: s [M, P], then partial [R, P] when R > 1 (fp32).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kImageThreads, kImagesPerSmMin)
    spatial_pool_kernel(const scalar_t* __restrict__ x, View5 xv, const scalar_t* __restrict__ z, View5 zv, int64_t B,
                        int M, int C, int C2, int W, int P, int R, Divider<uint32_t> by_W, acc_t* __restrict__ s_out,
                        scalar_t* __restrict__ g) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  acc_t* s_sm = reinterpret_cast<acc_t*>(dyn_smem);
  acc_t* partial = s_sm + M * P;
  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  const int slots = R * P;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {  // a persistent grid: images in turn
    // 1. s[m, p] = sum_c2 relu(z[b, m, c2, p]): z read once.
    for (int m = 0; m < M; ++m) {
      const scalar_t* zm = z + b * zv.s0 + m * zv.s1;
      for (int j = tid; j < slots; j += kImageThreads) {
        const int p = j % P, r = j / P;
        const scalar_t* zp = zm + plane_offset(p, W, zv.s3, zv.s4);
        acc_t acc = 0;
#pragma unroll 8
        for (int64_t c2 = r; c2 < C2; c2 += R) acc += relu(static_cast<acc_t>(zp[c2 * zv.s2]));
        if (R == 1) {
          s_sm[m * P + p] = acc;
        } else {
          partial[j] = acc;
        }
      }
      if (R > 1) {
        __syncthreads();
        for (int p = tid; p < P; p += kImageThreads) {
          acc_t total = partial[p];
          for (int r = 1; r < R; ++r) total += partial[r * P + p];
          s_sm[m * P + p] = total;
        }
        __syncthreads();  // the next head rewrites partial
      }
    }
    __syncthreads();
    for (int i = tid; i < M * P; i += kImageThreads) s_out[b * M * P + i] = s_sm[i];
    // 2. g[m, c] = sum_p x[c, p] s[m, p] / P: a warp pools kChannelGroup channels at once, lanes over
    //    positions, kHeadChunk heads in registers per pass (x read once when M <= kHeadChunk).
    for (int c0 = warp * kChannelGroup; c0 < C; c0 += kImageWarps * kChannelGroup) {
      const scalar_t* xc = x + b * xv.s0 + static_cast<int64_t>(c0) * xv.s2;
      const int channels = min(kChannelGroup, C - c0);
      for (int m0 = 0; m0 < M; m0 += kHeadChunk) {
        const int heads = min(kHeadChunk, M - m0);
        acc_t acc[kChannelGroup][kHeadChunk];
#pragma unroll
        for (int i = 0; i < kChannelGroup; ++i)
#pragma unroll
          for (int k = 0; k < kHeadChunk; ++k) acc[i][k] = 0;
        for (int p = lane; p < P; p += kWarpSize) {
          const auto hw = by_W.divmod(static_cast<uint32_t>(p));
          const int64_t offset = static_cast<int64_t>(hw.div) * xv.s3 + static_cast<int64_t>(hw.mod) * xv.s4;
          acc_t v[kChannelGroup];
#pragma unroll
          for (int i = 0; i < kChannelGroup; ++i)
            v[i] = i < channels ? static_cast<acc_t>(xc[i * xv.s2 + offset]) : acc_t(0);
          const acc_t* sp = s_sm + m0 * P + p;
#pragma unroll
          for (int k = 0; k < kHeadChunk; ++k) {
            if (k < heads) {
              const acc_t sk = sp[k * P];
#pragma unroll
              for (int i = 0; i < kChannelGroup; ++i) acc[i][k] += v[i] * sk;
            }
          }
        }
#pragma unroll
        for (int i = 0; i < kChannelGroup; ++i) {
#pragma unroll
          for (int k = 0; k < kHeadChunk; ++k) {
            if (i < channels && k < heads) {  // uniform over the warp: every lane shuffles
              const acc_t total = warp_sum(acc[i][k]);
              if (lane == 0) g[(b * M + m0 + k) * C + c0 + i] = static_cast<scalar_t>(total / static_cast<acc_t>(P));
            }
          }
        }
      }
    }
    __syncthreads();  // s_sm is rewritten for the CTA's next image
  }
}

// Backward. Dynamic shared memory (fp32): s [M, P], t [M, P], dg [M, C], then partial
// [kHeadChunk, R, P] when R > 1. dx [B, C, P] and dz [B, M, C2, P] contiguous.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kImageThreads, kImagesPerSmMin) spatial_pool_backward_kernel(
    const scalar_t* __restrict__ dg, View3 gv, const scalar_t* __restrict__ x, View5 xv,
    const scalar_t* __restrict__ z, View5 zv, const acc_t* __restrict__ s, int64_t B, int M, int C, int C2, int W,
    int P, int R, scalar_t* __restrict__ dx, scalar_t* __restrict__ dz) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  acc_t* s_sm = reinterpret_cast<acc_t*>(dyn_smem);
  acc_t* t_sm = s_sm + M * P;
  acc_t* dg_sm = t_sm + M * P;
  acc_t* partial = dg_sm + static_cast<int64_t>(M) * C;
  const int tid = threadIdx.x;
  const int slots = R * P;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    for (int i = tid; i < M * P; i += kImageThreads) s_sm[i] = s[b * M * P + i];
    for (int m = 0; m < M; ++m)
      for (int c = tid; c < C; c += kImageThreads)
        dg_sm[m * C + c] = static_cast<acc_t>(dg[b * gv.s0 + m * gv.s1 + c * gv.s2]);
    __syncthreads();
    // 1. One pass over x per kHeadChunk heads (one pass for DAN's 4): t[m, p] += dg[m, c] x[c, p] in
    //    registers, and in the first pass dx[c, p] = sum_m dg[m, c] s[m, p] / P.
    for (int m0 = 0; m0 < M; m0 += kHeadChunk) {
      const int heads = min(kHeadChunk, M - m0);
      for (int j = tid; j < slots; j += kImageThreads) {
        const int p = j % P, r = j / P;
        const scalar_t* xp = x + b * xv.s0 + plane_offset(p, W, xv.s3, xv.s4);
        scalar_t* dxp = dx + b * static_cast<int64_t>(C) * P + p;
        acc_t t[kHeadChunk] = {};
#pragma unroll 4
        for (int c = r; c < C; c += R) {
          const acc_t v = static_cast<acc_t>(xp[c * xv.s2]);
#pragma unroll
          for (int k = 0; k < kHeadChunk; ++k)
            if (k < heads) t[k] += dg_sm[(m0 + k) * C + c] * v;
          if (m0 == 0) {
            acc_t grad = 0;
            for (int m = 0; m < M; ++m) grad += dg_sm[m * C + c] * s_sm[m * P + p];
            dxp[static_cast<int64_t>(c) * P] = static_cast<scalar_t>(grad / static_cast<acc_t>(P));
          }
        }
#pragma unroll
        for (int k = 0; k < kHeadChunk; ++k) {
          if (k < heads) {
            if (R == 1) {
              t_sm[(m0 + k) * P + p] = t[k] / static_cast<acc_t>(P);
            } else {
              partial[(k * R + r) * P + p] = t[k];
            }
          }
        }
      }
      if (R > 1) {
        __syncthreads();
        for (int i = tid; i < heads * P; i += kImageThreads) {
          const int k = i / P, p = i % P;
          acc_t total = partial[k * R * P + p];
          for (int r = 1; r < R; ++r) total += partial[(k * R + r) * P + p];
          t_sm[(m0 + k) * P + p] = total / static_cast<acc_t>(P);
        }
        __syncthreads();  // the next chunk rewrites partial
      }
    }
    __syncthreads();
    // 2. dz[m, c2, p] = 1[z > 0] t[m, p]: z read once.
    for (int m = 0; m < M; ++m) {
      const scalar_t* zm = z + b * zv.s0 + m * zv.s1;
      scalar_t* dzm = dz + (b * M + m) * static_cast<int64_t>(C2) * P;
      for (int j = tid; j < slots; j += kImageThreads) {
        const int p = j % P, r = j / P;
        const scalar_t* zp = zm + plane_offset(p, W, zv.s3, zv.s4);
        const acc_t tv = t_sm[m * P + p];
#pragma unroll 8
        for (int64_t c2 = r; c2 < C2; c2 += R) {
          const acc_t v = static_cast<acc_t>(zp[c2 * zv.s2]);
          dzm[c2 * P + p] = static_cast<scalar_t>(v <= acc_t(0) ? acc_t(0) : tv);  // torch.relu's gradient at NaN z: t
        }
      }
    }
    __syncthreads();  // shared memory is rewritten for the CTA's next image
  }
}

// ---- dan_head_fusion, single pass: the M <= kMaxFusionHeads heads of a (b, c) in registers -------
constexpr int kMaxFusionHeads = 8;
constexpr int kFusionThreads = 128;  // small CTAs: a B = 256 call (131 072 threads) spreads over every SM

// One thread per (b, c) of a grid-stride loop over n = B * C, channels fastest (coalesced):
// h[m] = g sigmoid(a); heads = h - (max_m h + log sum_m exp(h - max)) when M > 1 (torch's
// log_softmax form: a +inf or NaN head makes every head NaN); fused = sum_m heads. The head loops
// are unrolled to kMaxFusionHeads with a uniform `m < M` predicate, so h stays in registers.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kFusionThreads)
    head_fusion_registers_kernel(const scalar_t* __restrict__ g, View3 gv, const scalar_t* __restrict__ a, View3 av,
                                 Divider<index_t> by_C, int64_t C, int M, index_t n, scalar_t* __restrict__ fused,
                                 scalar_t* __restrict__ heads) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const auto bc = by_C.divmod(i);
    const int64_t b = bc.div, c = bc.mod;
    const scalar_t* gp = g + b * gv.s0 + c * gv.s2;
    const scalar_t* ap = a + b * av.s0 + c * av.s2;
    acc_t h[kMaxFusionHeads];
#pragma unroll
    for (int m = 0; m < kMaxFusionHeads; ++m)
      h[m] = m < M ? static_cast<acc_t>(gp[m * gv.s1]) * sigmoid(static_cast<acc_t>(ap[m * av.s1])) : acc_t(0);
    acc_t lse = 0;
    if (M > 1) {
      acc_t mx = h[0];
#pragma unroll
      for (int m = 1; m < kMaxFusionHeads; ++m)
        if (m < M) mx = h[m] > mx ? h[m] : mx;  // a NaN h[0] stays; a later NaN makes the sum NaN
      acc_t sum = 0;
#pragma unroll
      for (int m = 0; m < kMaxFusionHeads; ++m)
        if (m < M) sum += exp_acc(h[m] - mx);  // +inf head: exp(inf - inf) = NaN, as torch
      lse = mx + log_acc(sum);
    }
    acc_t total = 0;
#pragma unroll
    for (int m = 0; m < kMaxFusionHeads; ++m) {
      if (m < M) {
        const acc_t out = h[m] - lse;
        heads[(b * M + m) * C + c] = static_cast<scalar_t>(out);
        total += out;
      }
    }
    fused[i] = static_cast<scalar_t>(total);
  }
}

// Backward, one thread per (b, c), every input read once: gh[m] = grad_heads + grad_fused in
// registers; gh -= exp(heads) sum_m gh (M > 1); dg = gh sig(a); da = gh g sig(a) (1 - sig(a)).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kFusionThreads) head_fusion_backward_registers_kernel(
    const scalar_t* __restrict__ grad_fused, View3 fv, const scalar_t* __restrict__ grad_heads, View3 hv,
    const scalar_t* __restrict__ g, View3 gv, const scalar_t* __restrict__ a, View3 av,
    const scalar_t* __restrict__ heads, View3 ov, Divider<index_t> by_C, int64_t C, int M, index_t n,
    scalar_t* __restrict__ grad_g, scalar_t* __restrict__ grad_gate) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const auto bc = by_C.divmod(i);
    const int64_t b = bc.div, c = bc.mod;
    const acc_t gf = static_cast<acc_t>(grad_fused[b * fv.s0 + c * fv.s2]);
    const scalar_t* ghp = grad_heads + b * hv.s0 + c * hv.s2;
    acc_t gh[kMaxFusionHeads];
    acc_t sum = 0;
#pragma unroll
    for (int m = 0; m < kMaxFusionHeads; ++m) {
      gh[m] = m < M ? static_cast<acc_t>(ghp[m * hv.s1]) + gf : acc_t(0);
      sum += gh[m];
    }
#pragma unroll
    for (int m = 0; m < kMaxFusionHeads; ++m) {
      if (m < M) {
        acc_t grad = gh[m];
        if (M > 1) grad -= exp_acc(static_cast<acc_t>(heads[b * ov.s0 + m * ov.s1 + c * ov.s2])) * sum;
        const acc_t gate = sigmoid(static_cast<acc_t>(a[b * av.s0 + m * av.s1 + c * av.s2]));
        const acc_t gm = static_cast<acc_t>(g[b * gv.s0 + m * gv.s1 + c * gv.s2]);
        grad_g[(b * M + m) * C + c] = static_cast<scalar_t>(grad * gate);
        grad_gate[(b * M + m) * C + c] = static_cast<scalar_t>(grad * gm * gate * (acc_t(1) - gate));
      }
    }
  }
}

// Blocks of `threads` for a grid-stride loop over n elements: enough to fill the GPU (its resident
// capacity, 2048 threads per SM), no more.
inline int64_t resident_blocks(int64_t n, int threads) {
  const int64_t wanted = (n + threads - 1) / threads;
  const int64_t cap =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * (2048 / threads);
  return std::max<int64_t>(1, std::min(wanted, cap));
}


// out [B, M, P] (acc_t, contiguous) = s (kRelu, from z) or t (from x and dg): the fallback path.
template <bool kRelu, typename scalar_t, typename acc_t>
void channel_reduce(const at::Tensor& in, const at::Tensor* w, int64_t B, int64_t M, int64_t K, int64_t W, int64_t P,
                    acc_t divisor, at::Tensor& out, cudaStream_t stream) {
  const int64_t tiles = (P + kWarp - 1) / kWarp;
  const int64_t blocks = B * M * tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dan_spatial_pool: B * heads * ceil(H * W / 32) = ",
              blocks, " blocks exceed the CUDA grid limit");
  APK_LAUNCH(static_cast<unsigned>(blocks), dim3(kWarp, kReduceWarps), 0, stream, channel_reduce_kernel<kRelu, scalar_t, acc_t>)(
      in.const_data_ptr<scalar_t>(), view_of(in), w ? w->const_data_ptr<scalar_t>() : nullptr,
      w ? view3_of(*w) : View3{0, 0, 0}, M, K, W, P, tiles, divisor, out.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fused kernels' work split (Slots above) and shared memory, or 0 bytes when the image's
// attention maps and gradients do not fit in the device's shared memory (then the fallback runs).
struct FusedPlan {
  int R;
  size_t forward_bytes, backward_bytes;
};

FusedPlan fused_plan(const dan::PoolDims& d) {
  const int64_t R = std::max<int64_t>(1, kImageThreads / d.P);
  const int64_t partial = R > 1 ? R * d.P : 0;
  const int64_t forward = (d.M * d.P + partial) * 4;
  const int64_t backward = (2 * d.M * d.P + d.M * d.C + std::min<int64_t>(d.M, kHeadChunk) * partial) * 4;
  const int64_t limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const bool sizes_fit = d.C <= INT32_MAX && d.C2 <= INT32_MAX && d.M <= INT32_MAX;
  return {static_cast<int>(R), sizes_fit && forward <= limit ? static_cast<size_t>(forward) : 0,
          sizes_fit && backward <= limit ? static_cast<size_t>(backward) : 0};
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// A persistent grid over images: at most as many image CTAs as the GPU holds at once.
unsigned image_blocks(int64_t B) {
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * kImagesPerSm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(B, cap)));
}

std::tuple<at::Tensor, at::Tensor> dan_spatial_pool_cuda(const at::Tensor& x, const at::Tensor& z) {
  const dan::PoolDims d = dan::check_spatial_pool("dan_spatial_pool", x, z, APK_CUDA_DEVICE_TYPE);
  check_cuda_float("dan_spatial_pool", "x", x);
  TORCH_CHECK_VALUE(d.P <= INT32_MAX, "dan_spatial_pool: the CUDA kernel takes at most 2^31-1 positions H*W, got ",
                    d.P);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor g = at::empty({d.B, d.M, d.C}, x.options());
  at::Tensor s = at::empty({d.B, d.M, d.P}, x.options().dtype(at::kFloat));
  if (d.B == 0) return {g, s};  // an empty batch: no zero-sized grid
  const FusedPlan plan = fused_plan(d);
  APK_DISPATCH_CUDA_FLOATS(x.scalar_type(), "dan_spatial_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    static_assert(sizeof(acc_t) == 4, "the shared-memory plan counts fp32 accumulators");
    if (plan.forward_bytes > 0) {
      allow_dynamic_smem(spatial_pool_kernel<scalar_t, acc_t>, plan.forward_bytes);
      APK_LAUNCH(image_blocks(d.B), kImageThreads, plan.forward_bytes, stream, spatial_pool_kernel<scalar_t, acc_t>)(
          x.const_data_ptr<scalar_t>(), view_of(x), z.const_data_ptr<scalar_t>(), view_of(z), d.B,
          static_cast<int>(d.M), static_cast<int>(d.C), static_cast<int>(d.C2), static_cast<int>(d.W),
          static_cast<int>(d.P), plan.R, Divider<uint32_t>(static_cast<uint32_t>(d.W)), s.mutable_data_ptr<acc_t>(),
          g.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    channel_reduce<true, scalar_t, acc_t>(z, nullptr, d.B, d.M, d.C2, d.W, d.P, acc_t(1), s, stream);
    const int64_t blocks = (d.B * d.C + kPoolWarps - 1) / kPoolWarps;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dan_spatial_pool: B * C = ", d.B * d.C,
                " exceeds the CUDA grid limit");
    APK_LAUNCH(static_cast<unsigned>(blocks), dim3(kWarp, kPoolWarps), 0, stream, pool_kernel<scalar_t, acc_t>)(
        x.const_data_ptr<scalar_t>(), view_of(x), s.const_data_ptr<acc_t>(), d.B, d.C, d.M,
        Divider<uint32_t>(static_cast<uint32_t>(d.W)), static_cast<uint32_t>(d.P), g.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g, s};
}

std::tuple<at::Tensor, at::Tensor> dan_spatial_pool_backward_cuda(const at::Tensor& grad_g, const at::Tensor& x,
                                                                  const at::Tensor& z, const at::Tensor& s) {
  const char* op = "dan_spatial_pool_backward";
  const dan::PoolDims d = dan::check_spatial_pool(op, x, z, APK_CUDA_DEVICE_TYPE);
  check_cuda_float(op, "x", x);
  dan::check_spatial_pool_grad(op, grad_g, x, d);
  dan::check_saved_attention(op, s, x, d);
  TORCH_CHECK_VALUE(d.P <= INT32_MAX, op, ": the CUDA kernel takes at most 2^31-1 positions H*W, got ", d.P);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_x = at::empty({d.B, d.C, d.H, d.W}, x.options());
  at::Tensor grad_z = at::empty({d.B, d.M, d.C2, d.H, d.W}, z.options());
  if (d.B == 0) return {grad_x, grad_z};  // an empty batch: no zero-sized grid
  const FusedPlan plan = fused_plan(d);
  APK_DISPATCH_CUDA_FLOATS(x.scalar_type(), "dan_spatial_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (plan.backward_bytes > 0) {
      allow_dynamic_smem(spatial_pool_backward_kernel<scalar_t, acc_t>, plan.backward_bytes);
      APK_LAUNCH(image_blocks(d.B), kImageThreads, plan.backward_bytes, stream,
                 spatial_pool_backward_kernel<scalar_t, acc_t>)(
          grad_g.const_data_ptr<scalar_t>(), view3_of(grad_g), x.const_data_ptr<scalar_t>(), view_of(x),
          z.const_data_ptr<scalar_t>(), view_of(z), s.const_data_ptr<acc_t>(), d.B, static_cast<int>(d.M),
          static_cast<int>(d.C), static_cast<int>(d.C2), static_cast<int>(d.W), static_cast<int>(d.P), plan.R,
          grad_x.mutable_data_ptr<scalar_t>(), grad_z.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor t = at::empty({d.B, d.M, d.P}, s.options());
    channel_reduce<false, scalar_t, acc_t>(x, &grad_g, d.B, d.M, d.C, d.W, d.P, static_cast<acc_t>(d.P), t, stream);
    const int64_t nx = grad_x.numel(), nz = grad_z.numel();
    dispatch_index_type(nx, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      const auto div = [](int64_t v) { return Divider<index_t>(static_cast<index_t>(v)); };
      APK_LAUNCH(static_cast<unsigned>(elementwise_blocks(nx)), kThreads, 0, stream, grad_x_kernel<scalar_t, acc_t, index_t>)(
          grad_g.const_data_ptr<scalar_t>(), view3_of(grad_g), s.const_data_ptr<acc_t>(), div(d.C), div(d.P), d.M,
          d.P, static_cast<index_t>(nx), grad_x.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    dispatch_index_type(nz, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      const auto div = [](int64_t v) { return Divider<index_t>(static_cast<index_t>(v)); };
      APK_LAUNCH(static_cast<unsigned>(elementwise_blocks(nz)), kThreads, 0, stream, grad_z_kernel<scalar_t, acc_t, index_t>)(
          z.const_data_ptr<scalar_t>(), view_of(z), t.const_data_ptr<acc_t>(), div(d.M), div(d.C2), div(d.W),
          div(d.P), d.P, static_cast<index_t>(nz), grad_z.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_z};
}

std::tuple<at::Tensor, at::Tensor> dan_head_fusion_cuda(const at::Tensor& g, const at::Tensor& gate_logits) {
  dan::check_head_fusion("dan_head_fusion", g, gate_logits, APK_CUDA_DEVICE_TYPE);
  check_cuda_float("dan_head_fusion", "g", g);
  const c10::cuda::CUDAGuard guard(g.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = g.size(0), M = g.size(1), C = g.size(2);
  at::Tensor fused = at::empty({B, C}, g.options());
  at::Tensor heads = at::empty({B, M, C}, g.options());
  if (B == 0) return {fused, heads};  // an empty batch: nothing to launch
  APK_DISPATCH_CUDA_FLOATS(g.scalar_type(), "dan_head_fusion_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (M <= kMaxFusionHeads) {
      dispatch_index_type(B * C, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        APK_LAUNCH(static_cast<unsigned>(resident_blocks(B * C, kFusionThreads)), kFusionThreads, 0, stream,
                   head_fusion_registers_kernel<scalar_t, acc_t, index_t>)(
            g.const_data_ptr<scalar_t>(), view3_of(g), gate_logits.const_data_ptr<scalar_t>(), view3_of(gate_logits),
            Divider<index_t>(static_cast<index_t>(C)), C, static_cast<int>(M), static_cast<index_t>(B * C),
            fused.mutable_data_ptr<scalar_t>(), heads.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      return;
    }
    APK_LAUNCH(static_cast<unsigned>(elementwise_blocks(B * C)), kThreads, 0, stream, head_fusion_kernel<scalar_t, acc_t>)(
        g.const_data_ptr<scalar_t>(), view3_of(g), gate_logits.const_data_ptr<scalar_t>(), view3_of(gate_logits), B,
        M, C, fused.mutable_data_ptr<scalar_t>(), heads.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {fused, heads};
}

std::tuple<at::Tensor, at::Tensor> dan_head_fusion_backward_cuda(const at::Tensor& grad_fused,
                                                                 const at::Tensor& grad_heads, const at::Tensor& g,
                                                                 const at::Tensor& gate_logits,
                                                                 const at::Tensor& heads) {
  const char* op = "dan_head_fusion_backward";
  dan::check_head_fusion(op, g, gate_logits, APK_CUDA_DEVICE_TYPE);
  check_cuda_float(op, "g", g);
  dan::check_head_fusion_grads(op, grad_fused, grad_heads, heads, g);
  const c10::cuda::CUDAGuard guard(g.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = g.size(0), M = g.size(1), C = g.size(2);
  at::Tensor grad_g = at::empty({B, M, C}, g.options());
  at::Tensor grad_gate = at::empty({B, M, C}, g.options());
  if (B == 0) return {grad_g, grad_gate};  // an empty batch: nothing to launch
  APK_DISPATCH_CUDA_FLOATS(g.scalar_type(), "dan_head_fusion_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (M <= kMaxFusionHeads) {
      dispatch_index_type(B * C, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        APK_LAUNCH(static_cast<unsigned>(resident_blocks(B * C, kFusionThreads)), kFusionThreads, 0, stream,
                   head_fusion_backward_registers_kernel<scalar_t, acc_t, index_t>)(
            grad_fused.const_data_ptr<scalar_t>(), view3_of(grad_fused), grad_heads.const_data_ptr<scalar_t>(),
            view3_of(grad_heads), g.const_data_ptr<scalar_t>(), view3_of(g), gate_logits.const_data_ptr<scalar_t>(),
            view3_of(gate_logits), heads.const_data_ptr<scalar_t>(), view3_of(heads),
            Divider<index_t>(static_cast<index_t>(C)), C, static_cast<int>(M), static_cast<index_t>(B * C),
            grad_g.mutable_data_ptr<scalar_t>(), grad_gate.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      return;
    }
    APK_LAUNCH(static_cast<unsigned>(elementwise_blocks(B * C)), kThreads, 0, stream,
               head_fusion_backward_kernel<scalar_t, acc_t>)(
            grad_fused.const_data_ptr<scalar_t>(), view3_of(grad_fused), grad_heads.const_data_ptr<scalar_t>(),
            view3_of(grad_heads), g.const_data_ptr<scalar_t>(), view3_of(g), gate_logits.const_data_ptr<scalar_t>(),
            view3_of(gate_logits), heads.const_data_ptr<scalar_t>(), view3_of(heads), B, M, C,
            grad_g.mutable_data_ptr<scalar_t>(), grad_gate.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_g, grad_gate};
}

}  // namespace
}  // namespace apkernels::cuda

APK_CUDA_LIBRARY_IMPL(m) {
  m.impl(APK_CUDA_OP("dan_spatial_pool"), &apkernels::cuda::dan_spatial_pool_cuda);
  m.impl(APK_CUDA_OP("dan_spatial_pool_backward"), &apkernels::cuda::dan_spatial_pool_backward_cuda);
  m.impl(APK_CUDA_OP("dan_head_fusion"), &apkernels::cuda::dan_head_fusion_cuda);
  m.impl(APK_CUDA_OP("dan_head_fusion_backward"), &apkernels::cuda::dan_head_fusion_backward_cuda);
}
