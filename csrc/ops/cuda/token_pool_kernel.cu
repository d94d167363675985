// CUDA kernel of apkernels::token_pool (APViT attentive token pooling).
//
// ONE launch, one block per image: a warp per patch token j = 1..N-1 computes the CLS-row logits
// q[b, h, 0] . k[b, h, j] * scale per head (fp32) and reduces them over heads by `score`; the
// block selects the top `keep` in shared memory (select_topk_block), writes index = [0, kept
// tokens ascending], and gathers x's rows there. q and k are read through their strides (views of
// a [B, N, 3, heads, head_dim] qkv tensor), never copied; only q's CLS row is read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>

#include "ops/common.h"
#include "ops/pool_checks.h"
#include "ops/cuda/helpers.cuh"

namespace apkernels::cuda {
namespace {

constexpr int64_t kMaxTokens = int64_t(1) << 30;

struct TokenArgs {
  int64_t N, C;
  int64_t xsB, xsN, xsC;
  int64_t heads, D;
  int64_t qsB, qsH, qsD;  // q at token 0
  int64_t ksB, ksH, ksN, ksD;
  int keep;
  float scale;
  bool vec_qk;    // q, k head rows can be read as 16-byte packs
  bool vec_rows;  // x rows (and the output) can move 16-byte packs
};

// kKeysInSmem: the selection keys live in dynamic shared memory (shared loads/stores), else in the
// global workspace keys_global [B, N-1].
template <typename T, typename QK, ScoreKind kind, bool kKeysInSmem>
__global__ void __launch_bounds__(kImageThreads)
    token_pool_kernel(const T* __restrict__ x, const QK* __restrict__ q, const QK* __restrict__ k, const TokenArgs a,
                      uint64_t* keys_global, T* __restrict__ out, int64_t* index) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ SelectShared sh;

  const int lane = lane_id(), warp = warp_id();
  const int64_t b = blockIdx.x;
  const int n = static_cast<int>(a.N - 1);  // candidates: tokens 1..N-1, key slot i = token i+1
  int64_t* idx = index + b * (a.keep + 1);
  uint64_t* keys;
  if constexpr (kKeysInSmem) {
    keys = reinterpret_cast<uint64_t*>(dyn_smem);
  } else {
    keys = keys_global + b * n;
  }

  // 1. Scores -> keys (skipped when every patch token is kept).
  if (a.keep < n) {
    const QK* qb = q + b * a.qsB;
    for (int i = warp; i < n; i += kImageWarps) {
      const int64_t j = i + 1;
      const QK* kj = k + b * a.ksB + j * a.ksN;
      float s = score_init<kind, float>();
      // Unrolled so that the loads of several heads are in flight before their shuffles.
#pragma unroll 4
      for (int64_t h = 0; h < a.heads; ++h) {
        const QK* qh = qb + h * a.qsH;
        const QK* kh = kj + h * a.ksH;
        float acc = 0.0f;
        if (a.vec_qk) {
          using P = Pack<QK>;
          const int64_t packs = a.D / P::kSize;
          for (int64_t v = lane; v < packs; v += 32) {
            const P qp = reinterpret_cast<const P*>(qh)[v];
            const P kp = reinterpret_cast<const P*>(kh)[v];
#pragma unroll
            for (int e = 0; e < P::kSize; ++e) acc += static_cast<float>(qp.v[e]) * static_cast<float>(kp.v[e]);
          }
        } else {
          for (int64_t d = lane; d < a.D; d += 32) acc += static_cast<float>(qh[d * a.qsD]) * static_cast<float>(kh[d * a.ksD]);
        }
        // The logit of head h (identical on every lane), then the reduction over heads in order.
        s = score_step<kind, float>(s, warp_sum(acc) * a.scale);
      }
      if (lane == 0) keys[i] = select_key64(s, static_cast<uint32_t>(j));
    }
    __syncthreads();
  }

  // 2. index[b] = [0, top `keep` tokens ascending] (select_topk_block's barriers publish idx[0]).
  if (threadIdx.x == 0) idx[0] = 0;
  select_topk_block(keys, n, a.keep, idx + 1, 1, sh);

  // 3. Gather tokens[b, r, :] = x[b, idx[r], :], r = 0..keep.
  const T* xb = x + b * a.xsB;
  T* outb = out + b * (a.keep + 1) * a.C;
  for (int r = warp; r <= a.keep; r += kImageWarps) {
    copy_row_warp(outb + r * a.C, xb + idx[r] * a.xsN, a.xsC, static_cast<const T*>(nullptr), int64_t(0), a.C,
                  a.vec_rows);
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
  const ScoreKind kind = parse_token_score(std::string(score));

  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor tokens = at::empty({B, keep + 1, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor index =
      at::empty({B, keep + 1}, x.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  if (B == 0) return {tokens, index};  // an empty batch: no zero-sized grid

  TokenArgs a;
  a.N = N;
  a.C = C;
  a.xsB = x.stride(0);
  a.xsN = x.stride(1);
  a.xsC = C == 1 ? 1 : x.stride(2);
  a.heads = k.size(1);
  a.D = k.size(3);
  a.qsB = q.stride(0);
  a.qsH = q.stride(1);
  a.qsD = a.D == 1 ? 1 : q.stride(3);
  a.ksB = k.stride(0);
  a.ksH = k.stride(1);
  a.ksN = k.stride(2);
  a.ksD = a.D == 1 ? 1 : k.stride(3);
  a.keep = static_cast<int>(keep);
  a.scale = static_cast<float>(scale);

  APK_DISPATCH_CUDA_FLOATS(x.scalar_type(), "token_pool_cuda", [&] {
    using x_t = scalar_t;
    const x_t* x_ptr = x.const_data_ptr<x_t>();
    constexpr int64_t xpack = Pack<x_t>::kSize;
    a.vec_rows = a.xsC == 1 && C % xpack == 0 && vec_aligned<x_t>(x_ptr, a.xsB) && a.xsN % xpack == 0;
    APK_DISPATCH_CUDA_FLOATS(q.scalar_type(), "token_pool_cuda_qk", [&] {
      using qk_t = scalar_t;
      const qk_t* q_ptr = q.const_data_ptr<qk_t>();
      const qk_t* k_ptr = k.const_data_ptr<qk_t>();
      constexpr int64_t qpack = Pack<qk_t>::kSize;
      a.vec_qk = a.qsD == 1 && a.ksD == 1 && a.D % qpack == 0 && vec_aligned<qk_t>(q_ptr, a.qsB) &&
                 a.qsH % qpack == 0 && vec_aligned<qk_t>(k_ptr, a.ksB) && a.ksH % qpack == 0 && a.ksN % qpack == 0;

      dispatch_token_score(kind, [&](auto kind_c) {
        constexpr ScoreKind kind_v = decltype(kind_c)::value;
        const int64_t n_keys = keep < N - 1 ? N - 1 : 0;
        bool keys_in_smem = true;
        size_t smem = plan_dynamic_smem(token_pool_kernel<x_t, qk_t, kind_v, true>, n_keys, 0, &keys_in_smem);
        auto kernel = token_pool_kernel<x_t, qk_t, kind_v, true>;
        at::Tensor workspace;
        uint64_t* keys_global = nullptr;
        if (!keys_in_smem) {
          kernel = token_pool_kernel<x_t, qk_t, kind_v, false>;
          bool unused;
          smem = plan_dynamic_smem(kernel, 0, 0, &unused);
          workspace = at::empty({B, N - 1}, x.options().dtype(at::kLong));
          keys_global = reinterpret_cast<uint64_t*>(workspace.data_ptr<int64_t>());
        }
        APK_LAUNCH(static_cast<unsigned>(B), kImageThreads, smem, at::cuda::getCurrentCUDAStream(), kernel)(
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
