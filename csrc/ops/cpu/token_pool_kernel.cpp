// CPU kernel of apkernels::token_pool, APViT's attentive token pooling: score the
// patch tokens 1..N-1 by the CLS-query row of the pre-softmax logits, q[:, h, 0] . k[:, h, j] *
// scale, reduced over the heads; keep CLS plus the top `keep` tokens (ascending) and gather x.
// q and k are read through their strides (views of a [B, N, 3, heads, d] qkv tensor need no copy)
// and only the CLS row of q is read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "ops/common.h"
#include "ops/pool_checks.h"
#include "ops/cpu/select.h"

namespace apkernels::cpu {
namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& q, const at::Tensor& k, int64_t keep, double scale) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"q", q}, {"k", k}}) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), "token_pool: ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "token_pool: ", name,
                      " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                      t.scalar_type());
  }
  check_token_pool_shapes(x, q, k, keep, scale);
  TORCH_CHECK_VALUE(x.size(1) - 1 < (int64_t(1) << 32), "token_pool: x must have fewer than 2^32 patch tokens, got ",
                    x.size(1) - 1);
}

// Scores of tokens 1..N-1 of one batch item: score[j-1] = reduce_h (q[h, 0] . k[h, j]) * scale.
template <ScoreKind kind, typename acc_t, typename scalar_t>
void token_scores(const scalar_t* q, const scalar_t* k, int64_t heads, int64_t N, int64_t D,
                  const int64_t* q_strides, const int64_t* k_strides, acc_t scale, std::vector<acc_t>& q_cls,
                  acc_t* score) {
  // The CLS query, converted once: [heads, D] contiguous in acc_t.
  q_cls.resize(heads * D);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t e = 0; e < D; ++e) q_cls[h * D + e] = static_cast<acc_t>(q[h * q_strides[0] + e * q_strides[2]]);
  for (int64_t j = 1; j < N; ++j) {
    acc_t s = score_init<kind, acc_t>();
    for (int64_t h = 0; h < heads; ++h) {
      const acc_t logit = dot(q_cls.data() + h * D, k + h * k_strides[0] + j * k_strides[1], D, k_strides[2]) * scale;
      s = score_step<kind, acc_t>(s, logit);
    }
    score[j - 1] = s;
  }
}

std::tuple<at::Tensor, at::Tensor> token_pool_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& k,
                                                  int64_t keep, double scale, c10::string_view score) {
  check_inputs(x, q, k, keep, scale);
  const ScoreKind kind = parse_token_score(std::string(score));
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int64_t heads = k.size(1), D = k.size(3);
  const int64_t K = keep + 1;

  at::Tensor tokens = at::empty({B, K, C}, x.options());
  at::Tensor index = at::empty({B, K}, x.options().dtype(at::kLong));
  int64_t* index_ptr = index.data_ptr<int64_t>();
  // Strides of q/k per (head, token, channel); the batch stride is applied per item.
  const int64_t q_strides[3] = {q.stride(1), q.stride(2), q.stride(3)};
  const int64_t k_strides[3] = {k.stride(1), k.stride(2), k.stride(3)};
  const int64_t xsB = x.stride(0), xsN = x.stride(1), xsC = x.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "token_pool_cpu_scores", [&] {
    using qk_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<qk_t, double>, double, float>;
    const qk_t* q_ptr = q.const_data_ptr<qk_t>();
    const qk_t* k_ptr = k.const_data_ptr<qk_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_pool_cpu_gather", [&] {
      const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
      scalar_t* out_ptr = tokens.data_ptr<scalar_t>();
      dispatch_token_score(kind, [&](auto kind_c) {
        constexpr ScoreKind SK = decltype(kind_c)::value;
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
          std::vector<acc_t> scores(N - 1), q_cls;
          std::vector<select_key_t<acc_t>> keys, work;
          for (int64_t b = b0; b < b1; ++b) {
            int64_t* idx = index_ptr + b * K;
            idx[0] = 0;  // CLS always first
            if (keep < N - 1) {
              token_scores<SK, acc_t>(q_ptr + b * q.stride(0), k_ptr + b * k.stride(0), heads, N, D, q_strides,
                                      k_strides, static_cast<acc_t>(scale), q_cls, scores.data());
            }
            select_topk_ascending(scores.data(), N - 1, keep, 1, idx + 1, keys, work);
            const scalar_t* xb = x_ptr + b * xsB;
            scalar_t* ob = out_ptr + b * K * C;
            for (int64_t i = 0; i < K; ++i) {
              const scalar_t* src = xb + idx[i] * xsN;
              scalar_t* dst = ob + i * C;
              if (xsC == 1) {
                std::copy(src, src + C, dst);
              } else {
                for (int64_t c = 0; c < C; ++c) dst[c] = src[c * xsC];
              }
            }
          }
        });
      });
    });
  });
  return {tokens, index};
}

}  // namespace
}  // namespace apkernels::cpu

TORCH_LIBRARY_IMPL(apkernels, CPU, m) {
  m.impl("token_pool", &apkernels::cpu::token_pool_cpu);
}
