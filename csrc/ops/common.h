// Helpers shared by the CPU and CUDA kernels: the selection key and the score names.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

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

// Apply one element to a running score (acc starts at score_init(kind)).
template <typename acc_t>
APK_HOST_DEVICE acc_t score_init(ScoreKind kind) {
  return (kind == ScoreKind::Max) ? -INFINITY : acc_t(0);
}

template <typename acc_t>
APK_HOST_DEVICE acc_t score_step(ScoreKind kind, acc_t acc, acc_t v) {
  switch (kind) {
    case ScoreKind::SumAbs: return acc + (v < 0 ? -v : v);
    case ScoreKind::Sum: return acc + v;
    case ScoreKind::SumSq: return acc + v * v;
    case ScoreKind::Max: return (v > acc || v != v) ? v : acc;  // NaN propagates, like amax
    case ScoreKind::MaxAbs: {
      acc_t a = v < 0 ? -v : v;
      return (a > acc || a != a) ? a : acc;
    }
  }
  return acc;
}

// Compile-time versions of score_init / score_step (the kind as a template argument, so that the
// inner loops carry no switch and vectorise), plus score_combine, which merges two partial scores
// of the same kind (partial sums add; partial maxima take the NaN-propagating max).
template <ScoreKind kind, typename acc_t>
APK_HOST_DEVICE acc_t score_init_t() {
  if constexpr (kind == ScoreKind::Max) return -INFINITY;
  else return acc_t(0);
}

template <ScoreKind kind, typename acc_t>
APK_HOST_DEVICE acc_t score_step_t(acc_t acc, acc_t v) {
  if constexpr (kind == ScoreKind::SumAbs) return acc + (v < 0 ? -v : v);
  else if constexpr (kind == ScoreKind::Sum) return acc + v;
  else if constexpr (kind == ScoreKind::SumSq) return acc + v * v;
  else if constexpr (kind == ScoreKind::Max) return (v > acc || v != v) ? v : acc;
  else {
    acc_t a = v < 0 ? -v : v;
    return (a > acc || a != a) ? a : acc;
  }
}

template <ScoreKind kind, typename acc_t>
APK_HOST_DEVICE acc_t score_combine(acc_t a, acc_t b) {
  if constexpr (kind == ScoreKind::Max || kind == ScoreKind::MaxAbs) return (b > a || b != b) ? b : a;
  else return a + b;
}

// Calls f(std::integral_constant<ScoreKind, kind>{}) for a runtime kind: one instantiation per kind.
template <typename F>
inline decltype(auto) dispatch_score_kind(ScoreKind kind, F&& f) {
  switch (kind) {
    case ScoreKind::SumAbs: return f(std::integral_constant<ScoreKind, ScoreKind::SumAbs>{});
    case ScoreKind::Sum: return f(std::integral_constant<ScoreKind, ScoreKind::Sum>{});
    case ScoreKind::SumSq: return f(std::integral_constant<ScoreKind, ScoreKind::SumSq>{});
    case ScoreKind::Max: return f(std::integral_constant<ScoreKind, ScoreKind::Max>{});
    case ScoreKind::MaxAbs: break;
  }
  return f(std::integral_constant<ScoreKind, ScoreKind::MaxAbs>{});
}

}  // namespace apkernels
