// CUDA kernels of DAN's two fused ops, in one translation unit to keep the build short.
//
// dan_spatial_pool: g[b, m, c] = mean_p x[b, c, p] s[b, m, p],  s[b, m, p] = sum_c2 relu(z[b, m, c2, p]).
//   channel_reduce_kernel   s (forward and backward) and t[b, m, p] = sum_c dg[b, m, c] x[b, c, p] / P
//                           (backward): one block per (32 positions, head, image), 8 warps split the
//                           channels, partial sums combined in shared memory in a fixed order.
//   pool_kernel             g: one warp per (image, channel), lanes over positions, shuffle reduction.
//   grad_x_kernel           dx[b, c, p] = sum_m dg[b, m, c] s[b, m, p] / P, elementwise.
//   grad_z_kernel           dz[b, m, c2, p] = 1[z > 0] t[b, m, p], elementwise.
// dan_head_fusion: one thread per (image, channel) walks the heads (online logsumexp), twice.
// No atomics: every reduction has a fixed order, so results are deterministic run to run.
// Inputs of any strides are read in place; outputs are contiguous; indices are int64; s and t are
// kept in fp32 between kernels. dtypes: fp32, fp16, bf16 (the CUDA dtype policy: float64 is rejected).
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

// One thread per (b, c): h[m] = g sigmoid(a); heads = h - logsumexp_m h (M > 1); fused = sum_m heads.
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

// s [B, M, P] (or t, with dg) in the accumulation type.
template <bool kRelu, typename scalar_t, typename acc_t>
at::Tensor channel_reduce(const at::Tensor& in, const at::Tensor* w, int64_t B, int64_t M, int64_t K, int64_t W,
                          int64_t P, acc_t divisor, const at::TensorOptions& acc_options, cudaStream_t stream) {
  at::Tensor out = at::empty({B, M, P}, acc_options);
  const int64_t tiles = (P + kWarp - 1) / kWarp;
  const int64_t blocks = B * M * tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dan_spatial_pool: B * heads * ceil(H * W / 32) = ",
              blocks, " blocks exceed the CUDA grid limit");
  APK_LAUNCH(static_cast<unsigned>(blocks), dim3(kWarp, kReduceWarps), 0, stream, channel_reduce_kernel<kRelu, scalar_t, acc_t>)(
      in.const_data_ptr<scalar_t>(), view_of(in), w ? w->const_data_ptr<scalar_t>() : nullptr,
      w ? view3_of(*w) : View3{0, 0, 0}, M, K, W, P, tiles, divisor, out.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dan_spatial_pool_cuda(const at::Tensor& x, const at::Tensor& z) {
  const dan::PoolDims d = dan::check_spatial_pool("dan_spatial_pool", x, z, APK_CUDA_DEVICE_TYPE);
  check_cuda_float("dan_spatial_pool", "x", x);
  TORCH_CHECK_VALUE(d.P <= INT32_MAX, "dan_spatial_pool: the CUDA kernel takes at most 2^31-1 positions H*W, got ",
                    d.P);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor g = at::empty({d.B, d.M, d.C}, x.options());
  if (d.B == 0) return g;  // an empty batch: no zero-sized grid
  APK_DISPATCH_CUDA_FLOATS(x.scalar_type(), "dan_spatial_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::TensorOptions acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor s =
        channel_reduce<true, scalar_t, acc_t>(z, nullptr, d.B, d.M, d.C2, d.W, d.P, acc_t(1), acc_options, stream);
    const int64_t blocks = (d.B * d.C + kPoolWarps - 1) / kPoolWarps;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dan_spatial_pool: B * C = ", d.B * d.C,
                " exceeds the CUDA grid limit");
    APK_LAUNCH(static_cast<unsigned>(blocks), dim3(kWarp, kPoolWarps), 0, stream, pool_kernel<scalar_t, acc_t>)(
        x.const_data_ptr<scalar_t>(), view_of(x), s.const_data_ptr<acc_t>(), d.B, d.C, d.M,
        Divider<uint32_t>(static_cast<uint32_t>(d.W)), static_cast<uint32_t>(d.P), g.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor> dan_spatial_pool_backward_cuda(const at::Tensor& grad_g, const at::Tensor& x,
                                                                  const at::Tensor& z) {
  const char* op = "dan_spatial_pool_backward";
  const dan::PoolDims d = dan::check_spatial_pool(op, x, z, APK_CUDA_DEVICE_TYPE);
  check_cuda_float(op, "x", x);
  dan::check_spatial_pool_grad(op, grad_g, x, d);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_x = at::empty({d.B, d.C, d.H, d.W}, x.options());
  at::Tensor grad_z = at::empty({d.B, d.M, d.C2, d.H, d.W}, z.options());
  if (d.B == 0) return {grad_x, grad_z};  // an empty batch: no zero-sized grid
  APK_DISPATCH_CUDA_FLOATS(x.scalar_type(), "dan_spatial_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::TensorOptions acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor s =
        channel_reduce<true, scalar_t, acc_t>(z, nullptr, d.B, d.M, d.C2, d.W, d.P, acc_t(1), acc_options, stream);
    const at::Tensor t = channel_reduce<false, scalar_t, acc_t>(x, &grad_g, d.B, d.M, d.C, d.W, d.P,
                                                                static_cast<acc_t>(d.P), acc_options, stream);
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
