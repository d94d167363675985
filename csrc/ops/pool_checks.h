// Argument checks of the pooling ops shared by their CPU and CUDA kernels (ValueErrors naming the
// argument, like apkernels/ops/patch_pool.py; these also guard direct torch.ops.apkernels.* calls).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace apkernels {

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

}  // namespace apkernels
