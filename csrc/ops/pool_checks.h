// Argument checks of the pooling ops shared by their CPU and CUDA kernels (ValueErrors naming the
// argument, like apkernels/ops/patch_pool.py; these also guard direct torch.ops.apkernels.* calls).
#pragma once

#include <cmath>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace apkernels {

// patch_pool's shapes: x [B, C, H, W] not empty, keep in [1, H*W]. Device, dtype and the kernels'
// own size limits are checked by each kernel.
inline void check_patch_pool_shapes(const at::Tensor& x, int64_t keep) {
  TORCH_CHECK_VALUE(x.dim() == 4, "patch_pool: x must be 4-D [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.numel() > 0, "patch_pool: x must not be empty (B, C, H, W >= 1), got shape ", x.sizes());
  const int64_t N = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(keep >= 1 && keep <= N, "patch_pool: keep must be in [1, ", N,
                    "] (1 to the number of positions H*W), got ", keep);
}

// token_pool's shapes: x [B, N, C] with the CLS token and >= 1 patch token, q and k [B, heads, N,
// head_dim] of one dtype, keep in [1, N-1], a finite scale. Device and dtype checks are the kernels'.
inline void check_token_pool_shapes(const at::Tensor& x, const at::Tensor& q, const at::Tensor& k, int64_t keep,
                                    double scale) {
  TORCH_CHECK_VALUE(x.dim() == 3, "token_pool: x must be 3-D [B, N, C], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.numel() > 0, "token_pool: x must not be empty (B, N, C >= 1), got shape ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(N >= 2, "token_pool: x must hold the CLS token and at least one patch token (N >= 2), got N=", N);
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == B && k.size(2) == N && k.size(1) >= 1 && k.size(3) >= 1,
                    "token_pool: k must have shape [", B, ", heads, ", N, ", head_dim] (B, N of x), got ", k.sizes());
  TORCH_CHECK_VALUE(q.sizes() == k.sizes(), "token_pool: q must have the same shape as k ", k.sizes(), ", got ",
                    q.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type(), "token_pool: k must have the same dtype as q (",
                    q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK_VALUE(keep >= 1 && keep <= N - 1, "token_pool: keep must be in [1, ", N - 1,
                    "] (1 to the number of patch tokens N-1), got ", keep);
  TORCH_CHECK_VALUE(std::isfinite(scale), "token_pool: scale must be a finite float, got ", scale);
}

// patch_pool's position embedding: None, [N, C] or [1, N, C], on x's device with x's dtype.
// Returns an undefined tensor for None, else an [N, C] view of it (no copy).
inline at::Tensor check_patch_pos(const std::optional<at::Tensor>& pos_in, const at::Tensor& x, int64_t N,
                                  int64_t C) {
  if (!pos_in.has_value() || !pos_in->defined()) return at::Tensor();
  const at::Tensor& p = *pos_in;
  TORCH_CHECK_VALUE((p.dim() == 2 && p.size(0) == N && p.size(1) == C) ||
                        (p.dim() == 3 && p.size(0) == 1 && p.size(1) == N && p.size(2) == C),
                    "patch_pool: pos must have shape [", N, ", ", C, "] or [1, ", N, ", ", C, "] (H*W, C), got ",
                    p.sizes());
  TORCH_CHECK_VALUE(p.device() == x.device(), "patch_pool: pos must be on the same device as x (", x.device(),
                    "), got ", p.device());
  TORCH_CHECK_VALUE(p.scalar_type() == x.scalar_type(), "patch_pool: pos must have the same dtype as x (",
                    x.scalar_type(), "), got ", p.scalar_type());
  return p.dim() == 3 ? p.select(0, 0) : p;
}

// pool_backward's arguments: grad_tokens [B, K, C], index int64 [B, K] on its device, num_rows >= 0.
// Empty inputs (B == 0, K == 0, C == 0, num_rows == 0) are valid. dtype checks are each kernel's.
inline void check_pool_backward_args(const at::Tensor& grad_tokens, const at::Tensor& index, int64_t num_rows) {
  TORCH_CHECK_VALUE(grad_tokens.dim() == 3, "pool_backward: grad_tokens must be 3-D [B, K, C], got shape ",
                    grad_tokens.sizes());
  const int64_t B = grad_tokens.size(0), K = grad_tokens.size(1);
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong, "pool_backward: index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.device() == grad_tokens.device(), "pool_backward: index must be on the same device as ",
                    "grad_tokens (", grad_tokens.device(), "), got ", index.device());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == B && index.size(1) == K,
                    "pool_backward: index must have shape [", B, ", ", K, "] (B, K of grad_tokens), got ",
                    index.sizes());
  TORCH_CHECK_VALUE(num_rows >= 0, "pool_backward: num_rows must be >= 0, got ", num_rows);
}

// pool_backward's index values, given their smallest and largest: every one in [0, num_rows).
// A RuntimeError (the values, not the arguments' form, are wrong), raised before any kernel runs.
inline void check_pool_backward_index_range(int64_t lowest, int64_t highest, int64_t num_rows) {
  TORCH_CHECK(lowest >= 0 && highest < num_rows, "pool_backward: index must be in [0, ", num_rows,
              ") (num_rows), got ", lowest < 0 ? lowest : highest);
}

}  // namespace apkernels
