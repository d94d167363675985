// Helpers for CPU loops that the compiler should vectorise.
#pragma once

#include <bit>
#include <cstdint>

// APK_SIMD_CLONES: compile a hot loop function twice, for x86-64-v3 (AVX2 + FMA) and for the
// baseline the extension is built for, and pick one at load time (GCC function multi-versioning,
// ifunc): the build stays portable while machines with AVX2 get 8-wide loops. Elsewhere (clang,
// non-x86, non-ELF) it expands to nothing.
// GCC inlines a function into a clone of another -march only when it is always_inline, so every
// helper called inside an APK_SIMD_CLONES function is APK_INLINE (else it stays a scalar call).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__) \
    && !defined(__CUDACC__)
#define APK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define APK_SIMD_CLONES
#endif
#if defined(__GNUC__)
#define APK_INLINE inline __attribute__((always_inline))
#else
#define APK_INLINE inline
#endif

namespace apkernels {

// Branch-free c ? a : b. Under the default -ftrapping-math GCC does not if-convert a float `?:`
// whose arms compute or load, which keeps the whole loop scalar; integer masks vectorise.
APK_INLINE float select(bool c, float a, float b) {
  const int32_t mask = -static_cast<int32_t>(c);
  return std::bit_cast<float>((mask & std::bit_cast<int32_t>(a)) | (~mask & std::bit_cast<int32_t>(b)));
}

APK_INLINE double select(bool c, double a, double b) {
  const int64_t mask = -static_cast<int64_t>(c);
  return std::bit_cast<double>((mask & std::bit_cast<int64_t>(a)) | (~mask & std::bit_cast<int64_t>(b)));
}

}  // namespace apkernels
