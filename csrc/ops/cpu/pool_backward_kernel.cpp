// CPU kernel of apkernels::pool_backward, the backward of both pooling ops (a row gather):
//   grad_rows [B, num_rows, C]: grad_rows[b, p] = sum of grad_tokens[b, j] over every j with
//   index[b, j] == p, in ascending j (repeated indices accumulate: the true gradient of a gather;
//   the pooling ops never produce one), zero where no j points;
//   grad_sum [num_rows, C] = grad_rows summed over the batch (the position-embedding gradient) when
//   reduce_batch, else an empty tensor [0].
// Sums run in fp32 (fp64 for fp64) in a fixed order, so results are deterministic. Index values
// outside [0, num_rows) raise a RuntimeError naming `index`; empty inputs give zeros / empty outputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "ops/pool_checks.h"

namespace apkernels::cpu {
namespace {

// Rows of grad_sum per task: enough work per task, and a task's fp32 buffer stays small.
constexpr int64_t kSumRowGrain = 8;

std::tuple<at::Tensor, at::Tensor> pool_backward_cpu(const at::Tensor& grad_tokens, const at::Tensor& index_in,
                                                     int64_t num_rows, bool reduce_batch) {
  TORCH_CHECK_VALUE(grad_tokens.device().is_cpu(), "pool_backward: grad_tokens must be a CPU tensor, got ",
                    grad_tokens.device());
  TORCH_CHECK_VALUE(at::isFloatingType(grad_tokens.scalar_type()),
                    "pool_backward: grad_tokens must be a floating-point tensor, got ", grad_tokens.scalar_type());
  check_pool_backward_args(grad_tokens, index_in, num_rows);
  const int64_t B = grad_tokens.size(0), K = grad_tokens.size(1), C = grad_tokens.size(2);

  const at::Tensor index = index_in.contiguous();
  const at::Tensor grad = grad_tokens.stride(2) == 1 ? grad_tokens : grad_tokens.contiguous();
  const int64_t* idx_ptr = index.const_data_ptr<int64_t>();
  if (B * K > 0) {
    const auto [lowest, highest] = std::minmax_element(idx_ptr, idx_ptr + B * K);
    check_pool_backward_index_range(*lowest, *highest, num_rows);
  }
  const int64_t gsB = grad.stride(0), gsK = grad.stride(1);

  at::Tensor grad_rows = at::empty({B, num_rows, C}, grad.options());
  at::Tensor grad_sum = reduce_batch ? at::empty({num_rows, C}, grad.options()) : at::empty({0}, grad.options());
  if (grad_rows.numel() == 0) {
    if (reduce_batch) grad_sum.zero_();
    return {grad_rows, grad_sum};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
    scalar_t* rows_ptr = grad_rows.data_ptr<scalar_t>();

    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> slot(num_rows);  // row -> k holding it, -1 for none
      std::vector<acc_t> acc;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* idx = idx_ptr + b * K;
        const scalar_t* gb = g_ptr + b * gsB;
        scalar_t* out = rows_ptr + b * num_rows * C;
        std::fill(slot.begin(), slot.end(), -1);
        bool repeated = false;
        for (int64_t k = 0; k < K; ++k) {
          repeated |= slot[idx[k]] >= 0;
          slot[idx[k]] = k;
        }
        if (!repeated) {
          for (int64_t r = 0; r < num_rows; ++r) {
            if (slot[r] >= 0) {
              const scalar_t* src = gb + slot[r] * gsK;
              std::copy(src, src + C, out + r * C);
            } else {
              std::fill(out + r * C, out + (r + 1) * C, scalar_t(0));
            }
          }
        } else {
          acc.assign(num_rows * C, acc_t(0));
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t* src = gb + k * gsK;
            acc_t* dst = acc.data() + idx[k] * C;
            for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<acc_t>(src[c]);
          }
          for (int64_t i = 0; i < num_rows * C; ++i) out[i] = static_cast<scalar_t>(acc[i]);
        }
      }
    });

    if (reduce_batch) {
      // Each task owns rows [r0, r1) and sums over the batch in order b = 0..B-1: deterministic.
      using sum_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      scalar_t* sum_ptr = grad_sum.data_ptr<scalar_t>();
      at::parallel_for(0, num_rows, kSumRowGrain, [&](int64_t r0, int64_t r1) {
        std::vector<sum_t> total((r1 - r0) * C, sum_t(0));
        for (int64_t b = 0; b < B; ++b) {
          const int64_t* idx = idx_ptr + b * K;
          const scalar_t* gb = g_ptr + b * gsB;
          for (int64_t k = 0; k < K; ++k) {
            if (idx[k] < r0 || idx[k] >= r1) continue;
            const scalar_t* src = gb + k * gsK;
            sum_t* dst = total.data() + (idx[k] - r0) * C;
            for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<sum_t>(src[c]);
          }
        }
        scalar_t* out = sum_ptr + r0 * C;
        for (int64_t i = 0; i < (r1 - r0) * C; ++i) out[i] = static_cast<scalar_t>(total[i]);
      });
    }
  });
  return {grad_rows, grad_sum};
}

}  // namespace
}  // namespace apkernels::cpu

TORCH_LIBRARY_IMPL(apkernels, CPU, m) {
  m.impl("pool_backward", &apkernels::cpu::pool_backward_cpu);
}
