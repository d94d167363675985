// CPU helpers shared by the pooling kernels: top-k selection on packed keys and short reductions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/common.h"

namespace apkernels::cpu {

// One key per candidate, unique per position, ordered like a stable descending torch.sort:
// larger score first, equal scores -> lower position first (see common.h). fp32 scores pack into
// 64 bits; fp64 scores need the full 64-bit score key plus the position.
inline uint64_t select_key(float s, uint32_t pos) { return select_key64(s, pos); }
inline std::pair<uint64_t, uint32_t> select_key(double s, uint32_t pos) { return {score_key(s), 0xFFFFFFFFu - pos}; }

template <typename acc_t>
using select_key_t = decltype(select_key(acc_t(0), 0u));

// Writes the positions of the `keep` largest of scores[0, n) in ascending order, plus `offset`,
// to out. O(n): nth_element finds the keep-th largest key, then one scan in position order keeps
// every key at or above it (keys are unique, so exactly `keep` of them). `keys`/`work` are scratch
// buffers reused across calls.
template <typename acc_t>
void select_topk_ascending(const acc_t* scores, int64_t n, int64_t keep, int64_t offset, int64_t* out,
                           std::vector<select_key_t<acc_t>>& keys, std::vector<select_key_t<acc_t>>& work) {
  if (keep >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = i + offset;
    return;
  }
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = select_key(scores[i], static_cast<uint32_t>(i));
  work.assign(keys.begin(), keys.end());
  std::nth_element(work.begin(), work.begin() + (keep - 1), work.end(), std::greater<>());
  const auto threshold = work[keep - 1];
  int64_t j = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] >= threshold) out[j++] = i + offset;
  }
}

// Lanes of independent partial accumulators in the reductions below: breaks the dependency chain
// and lets the compiler vectorise without -ffast-math (the order differs from a serial sum only
// by rounding, within the tests' tolerances).
constexpr int kLanes = 16;

// The score of one contiguous run v[0, len) of acc_t values.
template <ScoreKind kind, typename acc_t>
inline acc_t reduce_contiguous(const acc_t* v, int64_t len) {
  acc_t part[kLanes];
  for (int j = 0; j < kLanes; ++j) part[j] = score_init<kind, acc_t>();
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] = score_step<kind, acc_t>(part[j], v[i + j]);
  }
  acc_t acc = part[0];
  for (int j = 1; j < kLanes; ++j) acc = score_combine<kind, acc_t>(acc, part[j]);
  for (; i < len; ++i) acc = score_step<kind, acc_t>(acc, v[i]);
  return acc;
}

// The same for reduced-precision values: converted to acc_t in chunks first (a plain conversion
// loop vectorises; converting inside the lanes above does not, ~8x slower for bf16).
template <ScoreKind kind, typename acc_t, typename scalar_t>
inline acc_t reduce_converted(const scalar_t* v, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return reduce_contiguous<kind, acc_t>(v, len);
  } else {
    constexpr int64_t kChunk = 256;
    acc_t buf[kChunk];
    acc_t acc = score_init<kind, acc_t>();
    for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
      const int64_t n = std::min(kChunk, len - i0);
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(v[i0 + i]);
      acc = score_combine<kind, acc_t>(acc, reduce_contiguous<kind, acc_t>(static_cast<const acc_t*>(buf), n));
    }
    return acc;
  }
}

// sum_e a[e] * b[e * stride_b], a already in acc_t.
template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t len, int64_t stride_b) {
  acc_t acc = 0;
  if (stride_b == 1) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < len; ++i) acc += a[i] * static_cast<acc_t>(b[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) acc += a[i] * static_cast<acc_t>(b[i * stride_b]);
  }
  return acc;
}

}  // namespace apkernels::cpu
