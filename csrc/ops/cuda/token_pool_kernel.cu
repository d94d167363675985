// CUDA kernel of apkernels::token_pool (APViT attentive token pooling).
//
// ONE launch; a persistent grid of min(B, kCtasPerSm x SMs) CTAs of 512 threads, each looping over
// images. Per image: the CTA stages q's CLS row (heads x head_dim, fp32) in shared memory once; a
// warp per patch token j = 1..N-1 computes the logits q[b, h, 0] . k[b, h, j] * scale of 4 heads at
// a time (their k loads issued together) and reduces them over heads by `score`, in head order; the
// CTA selects the top `keep` in shared memory (select_topk_block), writes index = [0, kept tokens
// ascending], and gathers x's rows there. q and k are read through their strides (views of a
// [B, N, 3, heads, head_dim] qkv tensor), never copied; each input element is read once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "ops/common.h"
#include "ops/pool_checks.h"
#include "ops/cuda/helpers.cuh"

namespace apkernels::cuda {
namespace {

constexpr int64_t kMaxTokens = int64_t(1) << 30;
// Two 512-thread CTAs per SM (<= 64 registers): one CTA's selection overlaps the other's loads.
constexpr int kCtasPerSm = 2;
// Heads whose k loads a warp issues together (4 x 16 bytes per lane in flight; 8 spills at 64
// registers).
constexpr int kHeadChunk = 4;
// Packs of a kept row each lane loads before storing any (independent loads in flight).
constexpr int kCopyUnroll = 4;

struct TokenArgs {
  int64_t B, N, C;
  int64_t xsB, xsN, xsC;
  int heads, D;
  int64_t qsB, qsH, qsD;  // q at token 0
  int64_t ksB, ksH, ksN, ksD;
  int keep;
  float scale;
  int keys_offset;  // bytes into dynamic shared memory where the keys start (after q's row)
  bool vec_qk;      // q, k head rows can be read as 16-byte packs
  bool vec_rows;    // x rows (and the output) can move 16-byte packs
};

// Sums v[u] over the 32 lanes for every u < kCount (a power of two <= 32) with fewer shuffles than
// kCount butterflies: each step sends half of the remaining values to the partner lane and keeps
// the other half. Returns, on lane l, the full sum for u = l / (32 / kCount). The order of the
// additions is fixed by the lane numbers (deterministic).
template <int kCount>
__device__ __forceinline__ float warp_sum_spread(const float (&v)[kCount]) {
  static_assert(kCount >= 1 && kCount <= kWarpSize && (kCount & (kCount - 1)) == 0, "a power of two <= 32");
  const int lane = lane_id();
  float buf[kCount];
#pragma unroll
  for (int i = 0; i < kCount; ++i) buf[i] = v[i];
  int offset = kWarpSize / 2;
#pragma unroll
  for (int n = kCount; n > 1; n >>= 1, offset >>= 1) {
    const bool upper = lane & offset;  // keeps the upper half of the values, sends the lower
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      const float mine = upper ? buf[n / 2 + i] : buf[i], other = upper ? buf[i] : buf[n / 2 + i];
      buf[i] = mine + __shfl_xor_sync(kFullMask, other, offset);
    }
  }
#pragma unroll
  for (; offset > 0; offset >>= 1) buf[0] += __shfl_xor_sync(kFullMask, buf[0], offset);
  return buf[0];
}

// Elements of q / k a lane reads at once: a 16-byte pack (kVec) or one element (any strides).
template <typename QK, bool kVec>
struct QkUnit {
  static constexpr int kSize = kVec ? Pack<QK>::kSize : 1;
  QK v[kSize];
};

// The score of patch token j (all lanes of the warp return the same value). qs: q's CLS row in
// shared memory (fp32, [heads, D]); kj: k[b, :, j, :]. Lane `lane` covers units lane, lane + 32, ...
// of each head row; kHeadChunk heads' loads are issued before any of them is used.
template <typename QK, ScoreKind kind, bool kVec>
__device__ __forceinline__ float token_score(const float* qs, const QK* __restrict__ kj, const TokenArgs& a) {
  using U = QkUnit<QK, kVec>;
  constexpr int E = U::kSize;
  const int lane = lane_id();
  const int units = a.D / E;  // per head row
  float s = score_init<kind, float>();
  for (int h0 = 0; h0 < a.heads; h0 += kHeadChunk) {
    float acc[kHeadChunk];
#pragma unroll
    for (int u = 0; u < kHeadChunk; ++u) acc[u] = 0.0f;
    for (int v = lane; v < units; v += kWarpSize) {
      U kv[kHeadChunk] = {};
#pragma unroll
      for (int u = 0; u < kHeadChunk; ++u) {
        if (h0 + u < a.heads) {
          const QK* kh = kj + (h0 + u) * a.ksH;
          if constexpr (kVec) {
            kv[u] = reinterpret_cast<const U*>(kh)[v];
          } else {
            kv[u].v[0] = kh[v * a.ksD];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kHeadChunk; ++u) {
        if (h0 + u < a.heads) {
          const float* qh = qs + (h0 + u) * a.D + v * E;
          if constexpr (kVec) {  // D is a multiple of 4 here: 16-byte shared loads
#pragma unroll
            for (int e4 = 0; e4 < E / 4; ++e4) {
              const Pack<float> qp = reinterpret_cast<const Pack<float>*>(qh)[e4];
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[u] += qp.v[e] * static_cast<float>(kv[u].v[4 * e4 + e]);
            }
          } else {
            acc[u] += qh[0] * static_cast<float>(kv[u].v[0]);
          }
        }
      }
    }
    const float logits = warp_sum_spread(acc);  // lane u * 32 / kHeadChunk holds head h0 + u's dot product
#pragma unroll
    for (int u = 0; u < kHeadChunk; ++u) {
      const float logit = __shfl_sync(kFullMask, logits, u * (kWarpSize / kHeadChunk));
      if (h0 + u < a.heads) s = score_step<kind, float>(s, logit * a.scale);
    }
  }
  return s;
}

// tokens[b, r, :] = x[b, idx[r], :] for r = warp, warp + 16, ...: one warp per row. The 16-byte
// path issues kCopyUnroll loads per lane before the stores.
template <typename T>
__device__ __forceinline__ void gather_rows(const T* __restrict__ xb, const int64_t* idx, T* __restrict__ outb,
                                            const TokenArgs& a) {
  const int lane = lane_id();
  for (int r = warp_id(); r <= a.keep; r += kImageWarps) {
    const int64_t row = __shfl_sync(kFullMask, lane == 0 ? idx[r] : int64_t(0), 0);  // one index read per row
    const T* src = xb + row * a.xsN;
    T* dst = outb + static_cast<int64_t>(r) * a.C;
    if (a.vec_rows) {
      using P = Pack<T>;
      const int packs = static_cast<int>(a.C / P::kSize);
      const P* s = reinterpret_cast<const P*>(src);
      P* d = reinterpret_cast<P*>(dst);
      int v = lane;
      // Whole steps unconditionally (conditional elements would put t in local memory), then the rest.
      for (; v + (kCopyUnroll - 1) * kWarpSize < packs; v += kCopyUnroll * kWarpSize) {
        P t[kCopyUnroll];
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) t[u] = s[v + u * kWarpSize];
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) d[v + u * kWarpSize] = t[u];
      }
      for (; v < packs; v += kWarpSize) d[v] = s[v];
    } else {
      copy_row_warp(dst, src, a.xsC, static_cast<const T*>(nullptr), int64_t(0), a.C, false);
    }
  }
}

// kKeysInSmem: the selection keys live in dynamic shared memory after q's row (shared loads/stores),
// else in the global workspace keys_global [B, N-1].
template <typename T, typename QK, ScoreKind kind, bool kKeysInSmem>
__global__ void __launch_bounds__(kImageThreads, kCtasPerSm)
    token_pool_kernel(const T* __restrict__ x, const QK* __restrict__ q, const QK* __restrict__ k, const TokenArgs a,
                      uint64_t* keys_global, T* __restrict__ out, int64_t* index) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ SelectShared sh;
  float* qs = reinterpret_cast<float*>(dyn_smem);  // q[b, :, 0, :] as fp32, [heads, D]

  const int lane = lane_id(), warp = warp_id();
  const int n = static_cast<int>(a.N - 1);  // candidates: tokens 1..N-1, key slot i = token i+1
  const int qn = a.heads * a.D;
  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {
    int64_t* idx = index + b * (a.keep + 1);
    uint64_t* keys;
    if constexpr (kKeysInSmem) {
      keys = reinterpret_cast<uint64_t*>(dyn_smem + a.keys_offset);
    } else {
      keys = keys_global + b * n;
    }

    // 1. Scores -> keys (skipped when every patch token is kept). The previous image last read qs
    // and keys before select_topk_block's final barrier.
    if (a.keep < n) {
      const QK* qb = q + b * a.qsB;
      for (int i = threadIdx.x; i < qn; i += kImageThreads) {
        const int h = i / a.D, d = i - h * a.D;  // once per element of q's row, not per token
        qs[i] = static_cast<float>(qb[h * a.qsH + d * a.qsD]);
      }
      __syncthreads();
      const QK* kb = k + b * a.ksB;
      if (a.vec_qk) {
        for (int i = warp; i < n; i += kImageWarps) {
          const float s = token_score<QK, kind, true>(qs, kb + (i + 1) * a.ksN, a);
          if (lane == 0) keys[i] = select_key64(s, static_cast<uint32_t>(i + 1));
        }
      } else {
        for (int i = warp; i < n; i += kImageWarps) {
          const float s = token_score<QK, kind, false>(qs, kb + (i + 1) * a.ksN, a);
          if (lane == 0) keys[i] = select_key64(s, static_cast<uint32_t>(i + 1));
        }
      }
      __syncthreads();
    }

    // 2. index[b] = [0, top `keep` tokens ascending] (select_topk_block's barriers publish idx[0]).
    if (threadIdx.x == 0) idx[0] = 0;
    select_topk_block(keys, n, a.keep, idx + 1, 1, sh);

    // 3. Gather tokens[b, r, :] = x[b, idx[r], :], r = 0..keep.
    gather_rows(x + b * a.xsB, idx, out + b * (a.keep + 1) * a.C, a);
  }
}

std::tuple<at::Tensor, at::Tensor> token_pool_cuda(const at::Tensor& x, const at::Tensor& q, const at::Tensor& k,
                                                   int64_t keep, double scale, c10::string_view score) {
  check_cuda_float("token_pool", "x", x);
  TORCH_CHECK_VALUE(q.device() == x.device(), "token_pool: q must be on the same device as x (", x.device(), "), got ",
                    q.device());
  TORCH_CHECK_VALUE(k.device() == x.device(), "token_pool: k must be on the same device as x (", x.device(), "), got ",
                    k.device());
  check_cuda_float("token_pool", "q", q);
  check_token_pool_shapes(x, q, k, keep, scale);  // before k's dtype: "k must have the same dtype as q"
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK_VALUE(N <= kMaxTokens, "token_pool: the CUDA kernel takes at most 2^30 tokens, got N=", N);
  TORCH_CHECK_VALUE(B <= INT32_MAX, "token_pool: the CUDA kernel takes at most 2^31-1 images, got B=", B);
  const int64_t heads = k.size(1), D = k.size(3);
  // q's CLS row is staged in shared memory as fp32 (the keys too when they fit, else in global memory).
  const int64_t smem_limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const size_t q_bytes = static_cast<size_t>(heads * D) * sizeof(float);
  TORCH_CHECK_VALUE(heads * D * static_cast<int64_t>(sizeof(float)) <= smem_limit,
                    "token_pool: the CUDA kernel holds q's CLS row (heads * head_dim fp32 values) in shared memory; "
                    "heads * head_dim must be at most ",
                    smem_limit / static_cast<int64_t>(sizeof(float)), " on this device, got ", heads * D);
  const ScoreKind kind = parse_token_score(std::string(score));

  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor tokens = at::empty({B, keep + 1, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor index =
      at::empty({B, keep + 1}, x.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  if (B == 0) return {tokens, index};  // an empty batch: no zero-sized grid

  TokenArgs a;
  a.B = B;
  a.N = N;
  a.C = C;
  a.xsB = x.stride(0);
  a.xsN = x.stride(1);
  a.xsC = C == 1 ? 1 : x.stride(2);
  a.heads = static_cast<int>(heads);
  a.D = static_cast<int>(D);
  a.qsB = q.stride(0);
  a.qsH = q.stride(1);
  a.qsD = D == 1 ? 1 : q.stride(3);
  a.ksB = k.stride(0);
  a.ksH = k.stride(1);
  a.ksN = k.stride(2);
  a.ksD = D == 1 ? 1 : k.stride(3);
  a.keep = static_cast<int>(keep);
  a.scale = static_cast<float>(scale);
  const size_t q_region = (q_bytes + 15) / 16 * 16;  // keys start 16-byte aligned after q's row
  a.keys_offset = static_cast<int>(q_region);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(B, kCtasPerSm * sms));

  APK_DISPATCH_CUDA_FLOATS(x.scalar_type(), "token_pool_cuda", [&] {
    using x_t = scalar_t;
    const x_t* x_ptr = x.const_data_ptr<x_t>();
    constexpr int64_t xpack = Pack<x_t>::kSize;
    a.vec_rows = a.xsC == 1 && C % xpack == 0 && C / xpack <= INT32_MAX && vec_aligned<x_t>(x_ptr, a.xsB) &&
                 a.xsN % xpack == 0;
    APK_DISPATCH_CUDA_FLOATS(q.scalar_type(), "token_pool_cuda_qk", [&] {
      using qk_t = scalar_t;
      const qk_t* q_ptr = q.const_data_ptr<qk_t>();
      const qk_t* k_ptr = k.const_data_ptr<qk_t>();
      constexpr int64_t qpack = Pack<qk_t>::kSize;
      a.vec_qk = a.ksD == 1 && D % qpack == 0 && vec_aligned<qk_t>(k_ptr, a.ksB) && a.ksH % qpack == 0 &&
                 a.ksN % qpack == 0;

      dispatch_token_score(kind, [&](auto kind_c) {
        constexpr ScoreKind kind_v = decltype(kind_c)::value;
        // Keys (when scoring) after q's row: plan them as that many more 8-byte slots.
        const int64_t n_keys = keep < N - 1 ? N - 1 : 0;
        const int64_t q_slots = static_cast<int64_t>(q_region / sizeof(uint64_t));
        bool keys_in_smem = true;
        size_t smem = plan_dynamic_smem(token_pool_kernel<x_t, qk_t, kind_v, true>, q_slots + n_keys, q_region,
                                        &keys_in_smem);
        auto kernel = token_pool_kernel<x_t, qk_t, kind_v, true>;
        at::Tensor workspace;
        uint64_t* keys_global = nullptr;
        if (!keys_in_smem) {
          kernel = token_pool_kernel<x_t, qk_t, kind_v, false>;
          bool unused;
          smem = plan_dynamic_smem(kernel, 0, q_region, &unused);
          workspace = at::empty({B, N - 1}, x.options().dtype(at::kLong));
          keys_global = reinterpret_cast<uint64_t*>(workspace.data_ptr<int64_t>());
        }
        APK_LAUNCH(grid, kImageThreads, smem, at::cuda::getCurrentCUDAStream(), kernel)(
            x_ptr, q_ptr, k_ptr, a, keys_global, tokens.mutable_data_ptr<x_t>(), index.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {tokens, index};
}

}  // namespace
}  // namespace apkernels::cuda

APK_CUDA_LIBRARY_IMPL(m) {
  m.impl(APK_CUDA_OP("token_pool"), &apkernels::cuda::token_pool_cuda);
}
