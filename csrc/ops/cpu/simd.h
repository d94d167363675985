// Helpers for CPU loops that the compiler should vectorise.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

#include <c10/util/Half.h>

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

namespace apkernels::cpu {

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

// fp16 bits -> fp32, branch-free and always inlined: the same algorithm (and results) as c10's
// fp16_ieee_to_fp32_value, which GCC would otherwise leave as a scalar call inside the AVX2 clones.
APK_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_normal = -static_cast<uint32_t>(two_w >= (1u << 27));
  return std::bit_cast<float>(sign | (is_normal & std::bit_cast<uint32_t>(normalized)) |
                              (~is_normal & std::bit_cast<uint32_t>(denormalized)));
}

// An input element in the accumulation type.
template <typename acc_t, typename scalar_t>
APK_INLINE acc_t to_acc(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return static_cast<acc_t>(half_bits_to_float(v.x));
  } else {
    return static_cast<acc_t>(v);
  }
}

}  // namespace apkernels::cpu
