// Helpers shared by the CPU and CUDA kernels: the selection key and the score names.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

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

}  // namespace apkernels
