// DAN channel gating + attention fusion on the CPU, forward and backward, fused.
//
// Forward, per image b and channel c, over the M heads:
//   h[m] = g[m] sigmoid(a[m]);  heads[m] = h[m] - logsumexp_m h  (only when M > 1);  fused = sum_m heads[m].
// Backward (gh = grad_heads + grad_fused broadcast over the heads):
//   gh[m] -= exp(heads[m]) sum_m gh   (M > 1),   dg = gh sig(a),   da = gh g sig(a) (1 - sig(a)).
// Work is split into (image, block of channels) tasks; each task reads its [M, block] slices once,
// keeps them in fp32 (fp64 for fp64) buffers and loops over the channels innermost, so the loops
// vectorise. fp32 exp/log use branch-free Cephes polynomials (about 1 ulp) because libm's scalar calls
// would cost more than the rest of the op; fp64 uses std::exp/std::log.
// Strides: any (expanded grads with stride 0 included); a unit channel stride takes the flat path.
// Outputs are contiguous.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/cpu/simd.h"
#include "ops/dan_checks.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace apkernels::cpu {
namespace {

constexpr int64_t kBlock = 256;  // channels per task (long loops amortise the vectorised loops' set-up)

// exp(x) for fp32 (Cephes expf, about 1 ulp). The input is clamped so that 2^n stays a normal float:
// above 88.72 the result is inf, below -87.34 it is 1.2e-38 instead of a subnormal (harmless where it
// is used: 1 + exp(-a) in the sigmoid and sums that contain exp(0) = 1). NaN propagates.
APK_INLINE float exp_approx(float x) {
  const float xl = select(x < -87.3365f, -87.3365f, x);
  const float xc = select(xl > 88.3762626647949f, 88.3762626647949f, xl);
  const float fx = xc * 1.44269504088896341f + 0.5f;
  float n = static_cast<float>(static_cast<int32_t>(fx));
  n -= select(n > fx, 1.0f, 0.0f);  // floor without libm
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * (r * r) + r + 1.0f;
  const float res = y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return select(x > 88.7228391f, std::numeric_limits<float>::infinity(), res);
}

// log(x) for positive normal fp32 x (Cephes logf); inf and NaN pass through. Only called on
// sum_m exp(h[m] - max h), which lies in [1, M].
APK_INLINE float log_approx(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  const float mant = std::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);  // x = mant 2^e, mant in [0.5, 1)
  const bool small = mant < 0.707106781186547524f;
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 126) - select(small, 1.0f, 0.0f);
  const float t = (mant - 1.0f) + select(small, mant, 0.0f);
  const float z = t * t;
  float y = 7.0376836292E-2f;
  y = y * t - 1.1514610310E-1f;
  y = y * t + 1.1676998740E-1f;
  y = y * t - 1.2420140846E-1f;
  y = y * t + 1.4249322787E-1f;
  y = y * t - 1.6668057665E-1f;
  y = y * t + 2.0000714765E-1f;
  y = y * t - 2.4999993993E-1f;
  y = y * t + 3.3333331174E-1f;
  y = y * t * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  const float res = t + y + e * 0.693359375f;
  return select((x != x) | (x == std::numeric_limits<float>::infinity()), x, res);
}

APK_INLINE float exp_acc(float x) { return exp_approx(x); }
APK_INLINE double exp_acc(double x) { return std::exp(x); }
APK_INLINE float log_acc(float x) { return log_approx(x); }
APK_INLINE double log_acc(double x) { return std::log(x); }

template <typename acc_t>
APK_INLINE acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

// A [B, M, C] operand (also [B, C] as [B, 1, C]) as pointer and strides.
template <typename scalar_t>
struct BMC {
  const scalar_t* p;
  int64_t sb, sm, sc;
};

template <typename scalar_t>
BMC<scalar_t> bmc_of(const at::Tensor& t) {
  if (t.dim() == 2) return {t.const_data_ptr<scalar_t>(), t.stride(0), 0, t.stride(1)};
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2)};
}

// out[i] = t[b, m, c0 + i] for i < n, in the accumulation type.
template <typename scalar_t, typename acc_t>
APK_INLINE void load_seg(const BMC<scalar_t>& t, int64_t b, int64_t m, int64_t c0, int64_t n, acc_t* out) {
  const scalar_t* p = t.p + b * t.sb + m * t.sm + c0 * t.sc;
  if (t.sc == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = to_acc<acc_t>(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = to_acc<acc_t>(p[i * t.sc]);
  }
}

// The segment t[b, m, c0 : c0 + n] as accumulators: in place when t already holds them with unit
// channel stride, else copied into buf.
template <typename scalar_t, typename acc_t>
APK_INLINE const acc_t* seg_ptr(const BMC<scalar_t>& t, int64_t b, int64_t m, int64_t c0, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (t.sc == 1) return t.p + b * t.sb + m * t.sm + c0;
  }
  load_seg(t, b, m, c0, n, buf);
  return buf;
}

template <typename scalar_t, typename acc_t>
APK_INLINE void store_seg(const acc_t* in, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(in[i]);
}

// Scratch per thread: M + 3 rows of kBlock accumulators (the M head rows, then three spare rows).
template <typename acc_t>
APK_INLINE acc_t* scratch_row(acc_t* scratch, int64_t row) {
  return scratch + row * kBlock;
}

template <typename acc_t>
APK_INLINE void fill(acc_t* p, int64_t n, acc_t v) {
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

// Tasks [begin, end) of the forward; task = b * blocks + channel block.
template <typename scalar_t, typename acc_t>
APK_SIMD_CLONES void fusion_forward_tasks(const BMC<scalar_t>& g, const BMC<scalar_t>& a, int64_t M, int64_t C,
                                          int64_t begin, int64_t end, acc_t* scratch, scalar_t* fused,
                                          scalar_t* heads) {
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  acc_t* av = scratch_row(scratch, M + 0);
  acc_t* mx = scratch_row(scratch, M + 1);
  acc_t* sum = scratch_row(scratch, M + 2);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * kBlock, n = C - c0 < kBlock ? C - c0 : kBlock;
    // Pass 1: h = g sigmoid(a) and its running max over the heads.
    for (int64_t m = 0; m < M; ++m) {
      acc_t* hm = scratch_row(scratch, m);
      const acc_t* gm = seg_ptr(g, b, m, c0, n, hm);
      const acc_t* am = seg_ptr(a, b, m, c0, n, av);
      if (m == 0) {
        for (int64_t i = 0; i < n; ++i) mx[i] = hm[i] = gm[i] * sigmoid(am[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const acc_t h = gm[i] * sigmoid(am[i]);
          hm[i] = h;
          mx[i] = select(h > mx[i], h, mx[i]);
        }
      }
    }
    if (M > 1) {  // pass 2: logsumexp over the heads, max + log sum exp(h - max)
      fill(sum, n, acc_t(0));
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* hm = scratch_row(scratch, m);
        for (int64_t i = 0; i < n; ++i) sum[i] += exp_acc(hm[i] - mx[i]);
      }
      for (int64_t i = 0; i < n; ++i) mx[i] += log_acc(sum[i]);
    } else {
      fill(mx, n, acc_t(0));  // one head: no log-softmax
    }
    // Pass 3: heads = h - logsumexp, fused = their sum.
    fill(sum, n, acc_t(0));
    for (int64_t m = 0; m < M; ++m) {
      acc_t* hm = scratch_row(scratch, m);
      scalar_t* out = heads + (b * M + m) * C + c0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {  // write the output directly
        for (int64_t i = 0; i < n; ++i) {
          out[i] = hm[i] - mx[i];
          sum[i] += out[i];
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          hm[i] -= mx[i];
          sum[i] += hm[i];
        }
        store_seg(hm, n, out);
      }
    }
    store_seg(sum, n, fused + b * C + c0);
  }
}

template <typename scalar_t, typename acc_t>
APK_SIMD_CLONES void fusion_backward_tasks(const BMC<scalar_t>& grad_fused, const BMC<scalar_t>& grad_heads,
                                           const BMC<scalar_t>& g, const BMC<scalar_t>& a,
                                           const BMC<scalar_t>& heads, int64_t M, int64_t C, int64_t begin,
                                           int64_t end, acc_t* scratch, scalar_t* grad_g,
                                           scalar_t* grad_gate) {
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  acc_t* u = scratch_row(scratch, M + 0);
  acc_t* v = scratch_row(scratch, M + 1);
  acc_t* sum = scratch_row(scratch, M + 2);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * kBlock, n = C - c0 < kBlock ? C - c0 : kBlock;
    load_seg(grad_fused, b, 0, c0, n, u);
    for (int64_t m = 0; m < M; ++m) {
      acc_t* ghm = scratch_row(scratch, m);
      load_seg(grad_heads, b, m, c0, n, ghm);
      for (int64_t i = 0; i < n; ++i) ghm[i] += u[i];
    }
    if (M > 1) {  // through the log-softmax: gh - softmax * sum_m gh
      fill(sum, n, acc_t(0));
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* ghm = scratch_row(scratch, m);
        for (int64_t i = 0; i < n; ++i) sum[i] += ghm[i];
      }
      for (int64_t m = 0; m < M; ++m) {
        acc_t* ghm = scratch_row(scratch, m);
        load_seg(heads, b, m, c0, n, u);
        for (int64_t i = 0; i < n; ++i) ghm[i] -= exp_acc(u[i]) * sum[i];
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const acc_t* ghm = scratch_row(scratch, m);
      load_seg(g, b, m, c0, n, u);
      load_seg(a, b, m, c0, n, v);
      for (int64_t i = 0; i < n; ++i) {
        const acc_t gate = sigmoid(v[i]);
        u[i] = ghm[i] * u[i] * gate * (acc_t(1) - gate);  // d/d gate_logits
        v[i] = ghm[i] * gate;                             // d/d g
      }
      store_seg(v, n, grad_g + (b * M + m) * C + c0);
      store_seg(u, n, grad_gate + (b * M + m) * C + c0);
    }
  }
}

// Tasks per parallel chunk: about 16K elements, so that small inputs stay on one thread.
APK_INLINE int64_t grain_for(int64_t M) { return std::max<int64_t>(1, 16384 / (M * kBlock)); }

std::tuple<at::Tensor, at::Tensor> dan_head_fusion_cpu(const at::Tensor& g, const at::Tensor& gate_logits) {
  dan::check_head_fusion("dan_head_fusion", g, gate_logits, c10::DeviceType::CPU);
  const int64_t B = g.size(0), M = g.size(1), C = g.size(2);
  at::Tensor fused = at::empty({B, C}, g.options());
  at::Tensor heads = at::empty({B, M, C}, g.options());
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dan_head_fusion_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BMC<scalar_t> gv = bmc_of<scalar_t>(g), av = bmc_of<scalar_t>(gate_logits);
    scalar_t* fused_p = fused.data_ptr<scalar_t>();
    scalar_t* heads_p = heads.data_ptr<scalar_t>();
    at::parallel_for(0, B * blocks, grain_for(M), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch((M + 3) * kBlock);
      fusion_forward_tasks(gv, av, M, C, begin, end, scratch.data(), fused_p, heads_p);
    });
  });
  return {fused, heads};
}

std::tuple<at::Tensor, at::Tensor> dan_head_fusion_backward_cpu(const at::Tensor& grad_fused,
                                                                const at::Tensor& grad_heads, const at::Tensor& g,
                                                                const at::Tensor& gate_logits,
                                                                const at::Tensor& heads) {
  const char* op = "dan_head_fusion_backward";
  dan::check_head_fusion(op, g, gate_logits, c10::DeviceType::CPU);
  dan::check_head_fusion_grads(op, grad_fused, grad_heads, heads, g);
  const int64_t B = g.size(0), M = g.size(1), C = g.size(2);
  at::Tensor grad_g = at::empty({B, M, C}, g.options());
  at::Tensor grad_gate = at::empty({B, M, C}, g.options());
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dan_head_fusion_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BMC<scalar_t> gf = bmc_of<scalar_t>(grad_fused), gh = bmc_of<scalar_t>(grad_heads);
    const BMC<scalar_t> gv = bmc_of<scalar_t>(g), av = bmc_of<scalar_t>(gate_logits), hv = bmc_of<scalar_t>(heads);
    scalar_t* dg_p = grad_g.data_ptr<scalar_t>();
    scalar_t* da_p = grad_gate.data_ptr<scalar_t>();
    at::parallel_for(0, B * blocks, grain_for(M), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch((M + 3) * kBlock);
      fusion_backward_tasks(gf, gh, gv, av, hv, M, C, begin, end, scratch.data(), dg_p, da_p);
    });
  });
  return {grad_g, grad_gate};
}

}  // namespace
}  // namespace apkernels::cpu

TORCH_LIBRARY_IMPL(apkernels, CPU, m) {
  m.impl("dan_head_fusion", &apkernels::cpu::dan_head_fusion_cpu);
  m.impl("dan_head_fusion_backward", &apkernels::cpu::dan_head_fusion_backward_cpu);
}
