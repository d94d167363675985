// Argument checks of the DAN ops, shared by their CPU and CUDA kernels. Errors are ValueErrors that
// name the argument and say what was expected (as apkernels/ops/dan_*.py do for the public API);
// these also guard direct torch.ops.apkernels.* calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace apkernels {
namespace dan {

struct PoolDims {
  int64_t B, C, M, C2, H, W, P;
};

inline void check_float_on(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                    " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().type() == device, op, ": ", name, " must be a ", c10::DeviceTypeName(device, true),
                    " tensor for this kernel, got ", t.device());
}

inline void check_same_dtype_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                                    const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the same dtype as ", ref_name,
                    " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

// x [B, C, H, W], z [B, M, C2, H, W].
inline PoolDims check_spatial_pool(const char* op, const at::Tensor& x, const at::Tensor& z,
                                   c10::DeviceType device) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(z.dim() == 5, op, ": z must be 5-D [B, heads, C2, H, W], got shape ", z.sizes());
  TORCH_CHECK_VALUE(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
                    ": x must not be empty (C, H, W >= 1; the batch B may be 0), got shape ", x.sizes());
  TORCH_CHECK_VALUE(z.size(1) > 0 && z.size(2) > 0, op,
                    ": z must not be empty (heads, C2, H, W >= 1; the batch B may be 0), got shape ", z.sizes());
  TORCH_CHECK_VALUE(z.size(0) == x.size(0) && z.size(3) == x.size(2) && z.size(4) == x.size(3), op,
                    ": z must have shape [", x.size(0), ", heads, C2, ", x.size(2), ", ", x.size(3),
                    "] (B, H, W of x), got ", z.sizes());
  check_float_on(op, "x", x, device);
  check_same_dtype_device(op, "z", z, "x", x);
  return {x.size(0), x.size(1), z.size(1), z.size(2), x.size(2), x.size(3), x.size(2) * x.size(3)};
}

inline void check_spatial_pool_grad(const char* op, const at::Tensor& grad_g, const at::Tensor& x,
                                    const PoolDims& d) {
  TORCH_CHECK_VALUE(grad_g.dim() == 3 && grad_g.size(0) == d.B && grad_g.size(1) == d.M && grad_g.size(2) == d.C,
                    op, ": grad_g must have shape [", d.B, ", ", d.M, ", ", d.C, "] (B, heads, C), got ",
                    grad_g.sizes());
  check_same_dtype_device(op, "grad_g", grad_g, "x", x);
}

// The attention maps s [B, M, H*W] that dan_spatial_pool returns and its backward reads: contiguous,
// in the accumulation dtype (float64 for float64 x, else float32).
inline void check_saved_attention(const char* op, const at::Tensor& s, const at::Tensor& x, const PoolDims& d) {
  TORCH_CHECK_VALUE(s.dim() == 3 && s.size(0) == d.B && s.size(1) == d.M && s.size(2) == d.P, op,
                    ": s must have shape [", d.B, ", ", d.M, ", ", d.P, "] (B, heads, H*W), got ", s.sizes());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(s.scalar_type() == acc, op, ": s must be ", acc, " (the accumulation dtype of ", x.scalar_type(),
                    "), got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == x.device(), op, ": s must be on the same device as x (", x.device(), "), got ",
                    s.device());
  TORCH_CHECK_VALUE(s.is_contiguous(), op, ": s must be contiguous (the forward returns it so)");
}

// g [B, M, C] and gate_logits of the same shape.
inline void check_head_fusion(const char* op, const at::Tensor& g, const at::Tensor& gate_logits,
                              c10::DeviceType device) {
  TORCH_CHECK_VALUE(g.dim() == 3, op, ": g must be 3-D [B, heads, C], got shape ", g.sizes());
  TORCH_CHECK_VALUE(g.size(1) > 0 && g.size(2) > 0, op,
                    ": g must not be empty (heads, C >= 1; the batch B may be 0), got shape ", g.sizes());
  check_float_on(op, "g", g, device);
  TORCH_CHECK_VALUE(gate_logits.sizes() == g.sizes(), op, ": gate_logits must have the shape of g ", g.sizes(),
                    ", got ", gate_logits.sizes());
  check_same_dtype_device(op, "gate_logits", gate_logits, "g", g);
}

// The extra inputs of dan_head_fusion_backward.
inline void check_head_fusion_grads(const char* op, const at::Tensor& grad_fused, const at::Tensor& grad_heads,
                                    const at::Tensor& heads, const at::Tensor& g) {
  TORCH_CHECK_VALUE(grad_fused.dim() == 2 && grad_fused.size(0) == g.size(0) && grad_fused.size(1) == g.size(2), op,
                    ": grad_fused must have shape [", g.size(0), ", ", g.size(2), "] (B, C of g), got ",
                    grad_fused.sizes());
  check_same_dtype_device(op, "grad_fused", grad_fused, "g", g);
  TORCH_CHECK_VALUE(grad_heads.sizes() == g.sizes(), op, ": grad_heads must have the shape of g ", g.sizes(),
                    ", got ", grad_heads.sizes());
  check_same_dtype_device(op, "grad_heads", grad_heads, "g", g);
  TORCH_CHECK_VALUE(heads.sizes() == g.sizes(), op, ": heads must have the shape of g ", g.sizes(), ", got ",
                    heads.sizes());
  check_same_dtype_device(op, "heads", heads, "g", g);
}

}  // namespace dan
}  // namespace apkernels
