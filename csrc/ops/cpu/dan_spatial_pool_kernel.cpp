// DAN spatial attention + global average pool on the CPU, forward and backward.
//
// Per image b and head m: s[p] = sum_c2 relu(z[b, m, c2, p]) and g[b, m, c] = mean_p x[b, c, p] s[p],
// i.e. G = X (C x P) @ S^T (P x M) / P: the [B, M, C, H, W] product x * s of the official code never
// exists. Backward, with t[m, p] = sum_c dg[m, c] x[c, p] / P:
//   dx[c, p] = sum_m dg[m, c] s[m, p] / P,   dz[m, c2, p] = 1[z > 0] t[m, p].
// The forward returns s [B, M, P] (accumulation dtype) with g; the backward reads it instead of
// recomputing it from z. One task per image (at::parallel_for over B); every sum runs in a fixed order with fp32 (fp64 for
// fp64) accumulators, so results are deterministic and independent of the thread count.
// Strides: any. A [H, W] plane whose W stride is 1 and H stride is W (all contiguous tensors) is read
// as one flat vectorisable row; other planes (channels_last, transposed views) are read through their
// strides without a copy. Outputs are contiguous.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/cpu/simd.h"
#include "ops/dan_checks.h"

#include <type_traits>
#include <vector>

namespace apkernels::cpu {
namespace {

// One [H, W] plane of a 4-D / 5-D tensor: position p = h * W + w lies at ptr + h * sh + w * sw.
struct PlaneStrides {
  int64_t H, W, sh, sw;
  bool flat;  // the plane is one flat row: p lies at ptr + p
  PlaneStrides(int64_t H, int64_t W, int64_t sh, int64_t sw)
      : H(H), W(W), sh(sh), sw(sw), flat(sw == 1 && (sh == W || H == 1)) {}
};

// row[p] = plane[p] in the accumulation type.
template <typename scalar_t, typename acc_t>
APK_INLINE void load_plane(const scalar_t* ptr, const PlaneStrides& ps, acc_t* row) {
  if (ps.flat) {
    const int64_t P = ps.H * ps.W;
    for (int64_t p = 0; p < P; ++p) row[p] = to_acc<acc_t>(ptr[p]);
    return;
  }
  for (int64_t h = 0; h < ps.H; ++h)
    for (int64_t w = 0; w < ps.W; ++w) row[h * ps.W + w] = to_acc<acc_t>(ptr[h * ps.sh + w * ps.sw]);
}

// relu that keeps NaN (like torch.relu): NaN < 0 is false.
template <typename acc_t>
APK_INLINE acc_t relu(acc_t v) {
  return select(v < acc_t(0), acc_t(0), v);
}

// s[p] += relu(plane[p]).
template <typename scalar_t, typename acc_t>
APK_INLINE void add_relu_plane(const scalar_t* ptr, const PlaneStrides& ps, acc_t* s) {
  if (ps.flat) {
    const int64_t P = ps.H * ps.W;
    for (int64_t p = 0; p < P; ++p) s[p] += relu(to_acc<acc_t>(ptr[p]));
    return;
  }
  for (int64_t h = 0; h < ps.H; ++h)
    for (int64_t w = 0; w < ps.W; ++w) s[h * ps.W + w] += relu(to_acc<acc_t>(ptr[h * ps.sh + w * ps.sw]));
}

// out[k] = sum_p a[p] b[k * ldb + p] for k < K, each with kLanes independent partial sums (the
// compiler vectorises them without reassociating anything) combined in a fixed order. The K dot
// products run interleaved, K independent FMA chains instead of one latency-bound chain; each
// result is bit-identical to the same dot product computed alone.
template <int K, typename acc_t>
APK_INLINE void dots(const acc_t* a, const acc_t* b, int64_t ldb, int64_t n, acc_t* out) {
  constexpr int kLanes = 8;
  acc_t lanes[K][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < kLanes; ++l) lanes[k][l] += a[i + l] * b[k * ldb + i + l];
  for (int k = 0; k < K; ++k) {
    acc_t tail = 0;
    for (int64_t j = i; j < n; ++j) tail += a[j] * b[k * ldb + j];
    for (int l = 0; l < kLanes / 2; ++l) lanes[k][l] += lanes[k][l + kLanes / 2];
    out[k] = ((lanes[k][0] + lanes[k][2]) + (lanes[k][1] + lanes[k][3])) + tail;
  }
}

using Dims = dan::PoolDims;

// x [B, C, H, W] and z [B, M, C2, H, W] as pointers and strides.
template <typename scalar_t>
struct Inputs {
  const scalar_t* x;
  int64_t x_sb, x_sc;
  PlaneStrides xs;
  const scalar_t* z;
  int64_t z_sb, z_sm, z_sc2;
  PlaneStrides zs;
};

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& x, const at::Tensor& z, const Dims& d) {
  return {x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), PlaneStrides{d.H, d.W, x.stride(2), x.stride(3)},
          z.const_data_ptr<scalar_t>(), z.stride(0), z.stride(1), z.stride(2),
          PlaneStrides{d.H, d.W, z.stride(3), z.stride(4)}};
}

// s [M, P] of image b.
template <typename scalar_t, typename acc_t>
APK_INLINE void spatial_attention(const Inputs<scalar_t>& in, int64_t b, const Dims& d, acc_t* s) {
  for (int64_t i = 0; i < d.M * d.P; ++i) s[i] = acc_t(0);
  for (int64_t m = 0; m < d.M; ++m) {
    const scalar_t* zm = in.z + b * in.z_sb + m * in.z_sm;
    acc_t* sm = s + m * d.P;
    int64_t c2 = 0;
    if (in.zs.flat) {  // four channels per sweep: a quarter of the loads/stores of s and loop set-ups
      const int64_t st = in.z_sc2;
      for (; c2 + 4 <= d.C2; c2 += 4) {
        const scalar_t* r = zm + c2 * st;
        for (int k = 16; k < 20; ++k)  // the rows four sweeps ahead
          prefetch_bytes(r + k * st, d.P * static_cast<int64_t>(sizeof(scalar_t)));
        for (int64_t p = 0; p < d.P; ++p)
          sm[p] += (relu(to_acc<acc_t>(r[p])) + relu(to_acc<acc_t>(r[st + p]))) +
                   (relu(to_acc<acc_t>(r[2 * st + p])) + relu(to_acc<acc_t>(r[3 * st + p])));
      }
    }
    for (; c2 < d.C2; ++c2) add_relu_plane(zm + c2 * in.z_sc2, in.zs, sm);
  }
}

// Row c of x [C, P] of image b as accumulators: in place when x already holds them in a flat plane,
// else copied into buf.
template <typename scalar_t, typename acc_t>
APK_INLINE const acc_t* x_row(const Inputs<scalar_t>& in, int64_t b, int64_t c, acc_t* buf) {
  const scalar_t* ptr = in.x + b * in.x_sb + c * in.x_sc;
  if (in.xs.flat) prefetch_bytes(ptr + 8 * in.x_sc, in.xs.H * in.xs.W * static_cast<int64_t>(sizeof(scalar_t)));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (in.xs.flat) return ptr;
  }
  load_plane(ptr, in.xs, buf);
  return buf;
}

// g[b] [M, C] and s[b] [M, P] of one image. Scratch: row [P].
template <typename scalar_t, typename acc_t>
APK_SIMD_CLONES void pool_image(const Inputs<scalar_t>& in, int64_t b, const Dims& d, acc_t* s, acc_t* row,
                                scalar_t* g) {
  spatial_attention(in, b, d, s);
  for (int64_t c = 0; c < d.C; ++c) {
    const acc_t* xr = x_row(in, b, c, row);
    acc_t res[4];
    int64_t m = 0;
    for (; m + 4 <= d.M; m += 4) {
      dots<4>(xr, s + m * d.P, d.P, d.P, res);
      for (int k = 0; k < 4; ++k) g[(b * d.M + m + k) * d.C + c] = static_cast<scalar_t>(res[k] / acc_t(d.P));
    }
    for (; m < d.M; ++m) {
      dots<1>(xr, s + m * d.P, d.P, d.P, res);
      g[(b * d.M + m) * d.C + c] = static_cast<scalar_t>(res[0] / acc_t(d.P));
    }
  }
}

// dx[b] [C, P] and dz[b] [M, C2, P] of one image; dg points at grad_g[b] (strides dg_sm, dg_sc), s at
// the forward's saved attention maps s[b] [M, P]. Scratch: t [M * P], row, dx_row [P], w [M].
template <typename scalar_t, typename acc_t>
APK_SIMD_CLONES void pool_backward_image(const Inputs<scalar_t>& in, int64_t b, const Dims& d, const scalar_t* dg,
                                         int64_t dg_sm, int64_t dg_sc, const acc_t* s, acc_t* t, acc_t* row,
                                         acc_t* dx_row, acc_t* w, scalar_t* dx, scalar_t* dz) {
  for (int64_t i = 0; i < d.M * d.P; ++i) t[i] = acc_t(0);
  // One pass over x: t[m, :] += dg[m, c] x[c, :] and dx[c, :] = sum_m dg[m, c] s[m, :] / P.
  for (int64_t c = 0; c < d.C; ++c) {
    const acc_t* xr = x_row(in, b, c, row);
    for (int64_t m = 0; m < d.M; ++m) w[m] = to_acc<acc_t>(dg[m * dg_sm + c * dg_sc]);
    for (int64_t p = 0; p < d.P; ++p) dx_row[p] = acc_t(0);
    for (int64_t m = 0; m < d.M; ++m) {
      const acc_t wm = w[m];
      acc_t* tm = t + m * d.P;
      const acc_t* sm = s + m * d.P;
      for (int64_t p = 0; p < d.P; ++p) {
        tm[p] += wm * xr[p];
        dx_row[p] += wm * sm[p];
      }
    }
    scalar_t* out = dx + (b * d.C + c) * d.P;
    for (int64_t p = 0; p < d.P; ++p) out[p] = static_cast<scalar_t>(dx_row[p] / acc_t(d.P));
  }
  for (int64_t i = 0; i < d.M * d.P; ++i) t[i] /= acc_t(d.P);
  // dz = 1[z > 0] t: this image's z is read a second time, mostly from the cache.
  for (int64_t m = 0; m < d.M; ++m) {
    const acc_t* tm = t + m * d.P;
    for (int64_t c2 = 0; c2 < d.C2; ++c2) {
      load_plane(in.z + b * in.z_sb + m * in.z_sm + c2 * in.z_sc2, in.zs, row);
      scalar_t* out = dz + ((b * d.M + m) * d.C2 + c2) * d.P;
      // torch.relu's gradient: 0 where z <= 0 even if t is not finite, t where z is NaN.
      for (int64_t p = 0; p < d.P; ++p) out[p] = static_cast<scalar_t>(select(row[p] <= acc_t(0), acc_t(0), tm[p]));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> dan_spatial_pool_cpu(const at::Tensor& x, const at::Tensor& z) {
  const Dims d = dan::check_spatial_pool("dan_spatial_pool", x, z, c10::DeviceType::CPU);
  at::Tensor g = at::empty({d.B, d.M, d.C}, x.options());
  at::Tensor s = at::empty({d.B, d.M, d.P}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dan_spatial_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in = inputs_of<scalar_t>(x, z, d);
    scalar_t* out = g.data_ptr<scalar_t>();
    acc_t* maps = s.data_ptr<acc_t>();
    at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(d.P);
      for (int64_t b = begin; b < end; ++b) pool_image(in, b, d, maps + b * d.M * d.P, row.data(), out);
    });
  });
  return {g, s};
}

std::tuple<at::Tensor, at::Tensor> dan_spatial_pool_backward_cpu(const at::Tensor& grad_g, const at::Tensor& x,
                                                                 const at::Tensor& z, const at::Tensor& s) {
  const char* op = "dan_spatial_pool_backward";
  const Dims d = dan::check_spatial_pool(op, x, z, c10::DeviceType::CPU);
  dan::check_spatial_pool_grad(op, grad_g, x, d);
  dan::check_saved_attention(op, s, x, d);
  at::Tensor grad_x = at::empty({d.B, d.C, d.H, d.W}, x.options());
  at::Tensor grad_z = at::empty({d.B, d.M, d.C2, d.H, d.W}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dan_spatial_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in = inputs_of<scalar_t>(x, z, d);
    const scalar_t* gp = grad_g.const_data_ptr<scalar_t>();
    const acc_t* maps = s.const_data_ptr<acc_t>();
    scalar_t* dxp = grad_x.data_ptr<scalar_t>();
    scalar_t* dzp = grad_z.data_ptr<scalar_t>();
    at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> t(d.M * d.P), row(d.P), dx_row(d.P), w(d.M);
      for (int64_t b = begin; b < end; ++b)
        pool_backward_image(in, b, d, gp + b * grad_g.stride(0), grad_g.stride(1), grad_g.stride(2),
                            maps + b * d.M * d.P, t.data(), row.data(), dx_row.data(), w.data(), dxp, dzp);
    });
  });
  return {grad_x, grad_z};
}

}  // namespace
}  // namespace apkernels::cpu

TORCH_LIBRARY_IMPL(apkernels, CPU, m) {
  m.impl("dan_spatial_pool", &apkernels::cpu::dan_spatial_pool_cpu);
  m.impl("dan_spatial_pool_backward", &apkernels::cpu::dan_spatial_pool_backward_cpu);
}
