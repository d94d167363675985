// Helpers shared by the CPU and CUDA kernels: the selection key and the score names.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#define APK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define APK_HOST_DEVICE inline
#endif

namespace apkernels {

// An unsigned key that orders fp32 scores like torch.sort does: larger score -> larger key,
// -0.0 == +0.0, every NaN above +inf. Selection sorts (key, position) so that equal keys go to
// the lower position; see select_key64.
APK_HOST_DEVICE uint32_t score_key(float s) {
  if (s != s) return 0xFFFFFFFFu;
  if (s == 0.0f) s = 0.0f;
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(s);
#else
  std::memcpy(&u, &s, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The same order for fp64 scores (CPU fp64).
APK_HOST_DEVICE uint64_t score_key(double s) {
  if (s != s) return 0xFFFFFFFFFFFFFFFFull;
  if (s == 0.0) s = 0.0;
  uint64_t u;
#if defined(__CUDA_ARCH__)
  u = static_cast<uint64_t>(__double_as_longlong(s));
#else
  std::memcpy(&u, &s, sizeof(u));
#endif
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// One 64-bit key per candidate: the larger key wins; among equal scores the lower position wins.
// Positions must be < 2^32.
APK_HOST_DEVICE uint64_t select_key64(float s, uint32_t pos) {
  return (static_cast<uint64_t>(score_key(s)) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - pos);
}

APK_HOST_DEVICE uint32_t select_key64_position(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

// Score reductions. Patch pooling reduces over channels, token pooling over heads.
enum class ScoreKind : int { SumAbs = 0, Sum = 1, SumSq = 2, Max = 3, MaxAbs = 4 };

inline ScoreKind parse_patch_score(const std::string& name) {
  if (name == "sum_abs") return ScoreKind::SumAbs;
  if (name == "sum") return ScoreKind::Sum;
  if (name == "sum_sq") return ScoreKind::SumSq;
  if (name == "max") return ScoreKind::Max;
  if (name == "max_abs") return ScoreKind::MaxAbs;
  TORCH_CHECK_VALUE(false, "patch_pool: score must be one of sum_abs, sum, sum_sq, max, max_abs; got '", name, "'");
}

inline ScoreKind parse_token_score(const std::string& name) {
  if (name == "sum") return ScoreKind::Sum;
  if (name == "sum_abs") return ScoreKind::SumAbs;
  if (name == "max") return ScoreKind::Max;
  TORCH_CHECK_VALUE(false, "token_pool: score must be one of sum, sum_abs, max; got '", name, "'");
}

// The score reduction, one form for every kernel (CPU and CUDA): the kind is a template argument,
// so inner loops carry no switch and vectorise. A score is score_combine over its elements'
// score_term: partial sums add, partial maxima take the NaN-propagating max (like amax), so
// partial scores (lanes, warps, thread groups) merge with score_combine too.
template <ScoreKind kind, typename acc_t>
APK_HOST_DEVICE acc_t score_init() {
  if constexpr (kind == ScoreKind::Max) return -INFINITY;
  else return acc_t(0);  // sums, and maxima of non-negative terms
}

template <ScoreKind kind, typename acc_t>
APK_HOST_DEVICE acc_t score_term(acc_t v) {
  if constexpr (kind == ScoreKind::SumAbs || kind == ScoreKind::MaxAbs) return v < 0 ? -v : v;
  else if constexpr (kind == ScoreKind::SumSq) return v * v;
  else return v;
}

template <ScoreKind kind, typename acc_t>
APK_HOST_DEVICE acc_t score_combine(acc_t a, acc_t b) {
  if constexpr (kind == ScoreKind::Max || kind == ScoreKind::MaxAbs) return (b > a || b != b) ? b : a;
  else return a + b;
}

// Apply one element to a running score (acc starts at score_init).
template <ScoreKind kind, typename acc_t>
APK_HOST_DEVICE acc_t score_step(acc_t acc, acc_t v) {
  return score_combine<kind, acc_t>(acc, score_term<kind, acc_t>(v));
}

// Calls f(std::integral_constant<ScoreKind, kind>{}) for a runtime kind, instantiating f only for
// the kinds listed (the op's parse_*_score has already rejected any other).
template <ScoreKind kFirst, ScoreKind... kRest, typename F>
inline decltype(auto) dispatch_score_kind_among(ScoreKind kind, F&& f) {
  if constexpr (sizeof...(kRest) == 0) {
    return f(std::integral_constant<ScoreKind, kFirst>{});
  } else {
    if (kind == kFirst) return f(std::integral_constant<ScoreKind, kFirst>{});
    return dispatch_score_kind_among<kRest...>(kind, std::forward<F>(f));
  }
}

// The scores of each op: patch pooling reduces over channels, token pooling over heads.
template <typename F>
inline decltype(auto) dispatch_patch_score(ScoreKind kind, F&& f) {
  return dispatch_score_kind_among<ScoreKind::SumAbs, ScoreKind::Sum, ScoreKind::SumSq, ScoreKind::Max,
                                   ScoreKind::MaxAbs>(kind, std::forward<F>(f));
}

template <typename F>
inline decltype(auto) dispatch_token_score(ScoreKind kind, F&& f) {
  return dispatch_score_kind_among<ScoreKind::Sum, ScoreKind::SumAbs, ScoreKind::Max>(kind, std::forward<F>(f));
}

}  // namespace apkernels
