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

// Software prefetch of the n bytes at p (a hint: addresses past the end of a tensor are harmless).
// The relu-sum and pooling loops read short rows (49 floats at 7x7) whose strided sweeps the
// hardware prefetchers follow poorly; prefetching a few sweeps ahead gains about 30% there.
APK_INLINE void prefetch_bytes(const void* p, int64_t n) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(c + off);
#else
  (void)p;
  (void)n;
#endif
}

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
