// CPU kernel of apkernels::patch_pool, APViT's attentive patch pooling:
// score every position of x [B, C, H, W] by a channel reduction, keep the top `keep` positions
// (ascending), gather (x as tokens + pos) there. One pass of at::parallel_for over the batch;
// x is read in place through its strides (NCHW or channels_last), never copied.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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

// Tile of the NCHW gather (a transpose): kept positions x channels.
constexpr int64_t kTileTokens = 16;
constexpr int64_t kTileChannels = 64;

// Scores of the N positions of one image, x viewed as [C, N] with strides (sC, sN).
template <ScoreKind kind, typename acc_t, typename scalar_t>
void patch_scores(const scalar_t* x, int64_t C, int64_t N, int64_t sC, int64_t sN, acc_t* score) {
  if (sC == 1) {
    // channels_last: each position's channels are contiguous.
    for (int64_t n = 0; n < N; ++n) score[n] = reduce_converted<kind, acc_t>(x + n * sN, C);
    return;
  }
  // NCHW: walk the channels, the inner loop runs over contiguous positions (vectorised).
  for (int64_t n = 0; n < N; ++n) score[n] = score_init<kind, acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + c * sC;
    if (sN == 1) {
      for (int64_t n = 0; n < N; ++n) score[n] = score_step<kind, acc_t>(score[n], static_cast<acc_t>(row[n]));
    } else {
      for (int64_t n = 0; n < N; ++n)
        score[n] = score_step<kind, acc_t>(score[n], static_cast<acc_t>(row[n * sN]));
    }
  }
}

// out[k, c] = x[c, index[k]] (+ pos[index[k], c]); out is [K, C] contiguous, pos [N, C] contiguous.
template <typename scalar_t>
void gather_tokens(const scalar_t* x, int64_t C, int64_t sC, int64_t sN, const int64_t* index, int64_t K,
                   const scalar_t* pos, scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (sC == 1) {
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* src = x + index[k] * sN;
      scalar_t* dst = out + k * C;
      if (pos != nullptr) {
        const scalar_t* p = pos + index[k] * C;
        for (int64_t c = 0; c < C; ++c)
          dst[c] = static_cast<scalar_t>(static_cast<opmath_t>(src[c]) + static_cast<opmath_t>(p[c]));
      } else {
        std::copy(src, src + C, dst);
      }
    }
    return;
  }
  // Positions contiguous (NCHW): a transpose. Tiles of kTileTokens kept positions x kTileChannels
  // channels: the reads walk each channel row over nearby positions, the writes fill whole runs
  // of a token row; a plain per-token walk strides over C rows per element and runs ~10x slower.
  scalar_t tile[kTileTokens][kTileChannels];
  for (int64_t k0 = 0; k0 < K; k0 += kTileTokens) {
    const int64_t kn = std::min<int64_t>(kTileTokens, K - k0);
    int64_t offset[kTileTokens];
    for (int64_t t = 0; t < kn; ++t) offset[t] = index[k0 + t] * sN;
    for (int64_t c0 = 0; c0 < C; c0 += kTileChannels) {
      const int64_t cn = std::min<int64_t>(kTileChannels, C - c0);
      for (int64_t c = 0; c < cn; ++c) {
        const scalar_t* row = x + (c0 + c) * sC;
        for (int64_t t = 0; t < kn; ++t) tile[t][c] = row[offset[t]];
      }
      for (int64_t t = 0; t < kn; ++t) {
        scalar_t* dst = out + (k0 + t) * C + c0;
        if (pos != nullptr) {
          const scalar_t* p = pos + index[k0 + t] * C + c0;
          for (int64_t c = 0; c < cn; ++c)
            dst[c] = static_cast<scalar_t>(static_cast<opmath_t>(tile[t][c]) + static_cast<opmath_t>(p[c]));
        } else {
          std::copy(tile[t], tile[t] + cn, dst);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> patch_pool_cpu(const at::Tensor& x_in, int64_t keep,
                                                  const std::optional<at::Tensor>& pos_in, c10::string_view score) {
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "patch_pool: x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK_VALUE(at::isFloatingType(x_in.scalar_type()),
                    "patch_pool: x must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                    x_in.scalar_type());
  check_patch_pool_shapes(x_in, keep);
  const ScoreKind kind = parse_patch_score(std::string(score));
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t N = H * W;
  TORCH_CHECK_VALUE(N < (int64_t(1) << 32), "patch_pool: x must have fewer than 2^32 positions H*W, got ", N);
  at::Tensor pos = check_patch_pos(pos_in, x_in, N, C);
  if (pos.defined()) pos = pos.contiguous();
  // Positions must be one stride apart (true for NCHW, channels_last and their slices); anything
  // else is copied once.
  const at::Tensor x = (H == 1 || W == 1 || x_in.stride(2) == W * x_in.stride(3)) ? x_in : x_in.contiguous();
  const int64_t sB = x.stride(0), sC = x.stride(1);
  const int64_t sN = (W == 1) ? x.stride(2) : x.stride(3);

  at::Tensor tokens = at::empty({B, keep, C}, x.options());
  at::Tensor index = at::empty({B, keep}, x.options().dtype(at::kLong));
  int64_t* index_ptr = index.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_pool_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* pos_ptr = pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = tokens.data_ptr<scalar_t>();
    dispatch_patch_score(kind, [&](auto kind_c) {
      constexpr ScoreKind K = decltype(kind_c)::value;
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> scores(N);
        std::vector<select_key_t<acc_t>> keys, work;
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* xb = x_ptr + b * sB;
          int64_t* idx = index_ptr + b * keep;
          if (keep < N) patch_scores<K, acc_t>(xb, C, N, sC, sN, scores.data());  // keep == N: identity
          select_topk_ascending(scores.data(), N, keep, 0, idx, keys, work);
          gather_tokens(xb, C, sC, sN, idx, keep, pos_ptr, out_ptr + b * keep * C);
        }
      });
    });
  });
  return {tokens, index};
}

}  // namespace
}  // namespace apkernels::cpu

TORCH_LIBRARY_IMPL(apkernels, CPU, m) {
  m.impl("patch_pool", &apkernels::cpu::patch_pool_cpu);
}
