// CUDA emulation: what csrc/ops/cuda/*.cu need to compile as host C++ and run on the CPU.
//
// A wrapper translation unit (csrc/emulation/wrap_*.cpp) includes this header, then one .cu file.
// Every CUDA thread of a launch runs as a fiber of the launching OS thread, the blocks one after
// another (runtime.cpp): __syncthreads and the warp collectives suspend the fiber until every
// participant has arrived. __shared__ variables are thread_local (one block runs at a time on a
// thread), `extern __shared__` arrays are per-translation-unit thread_local buffers
// (APK_EMU_DYNAMIC_SHARED). The wrapper TUs are compiled with -fsanitize=thread but NOT linked
// with libtsan: runtime.cpp implements the __tsan_* entry points, so every load and store of the
// kernels reports its address, which the runtime checks (shared-memory races, uninitialised
// shared reads, global accesses outside the launch's tensors) and counts (global traffic).
#pragma once

#define APK_CUDA_EMULATION 1

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- keywords ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Block scope: static storage per OS thread (implied by thread_local), reset per block by nothing:
// like CUDA, shared memory starts undefined (the runtime reports reads before writes).
#define __shared__ thread_local
#define __constant__ const

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

constexpr int warpSize = 32;

namespace apk_emu {

// ---- the runtime (runtime.cpp, not instrumented) -----------------------------------------------
uint3 thread_index();
uint3 block_index();
dim3 block_dim();
dim3 grid_dim();

void syncthreads(const char* file, int line);

// Thread-block clusters (cooperative_groups::this_cluster(), shim/cooperative_groups.h): the blocks
// of a cluster run together (as fibers of one OS thread, one block at a time between barriers), so
// cluster.sync() and distributed shared memory work; a block's shared memory seen from another block
// of its cluster is that block's parked copy, checked like local shared memory (races, bounds,
// uninitialised reads), and not counted as global traffic.
constexpr unsigned kMaxClusterBlocks = 8;  // the portable cluster size
void cluster_sync(const char* file, int line);
unsigned cluster_block_rank();
dim3 cluster_dim();
void* map_shared_rank(const void* address, unsigned rank, const char* file, int line);

enum class Collective : int { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, MatchAny, SyncWarp };

// One warp collective: `bytes` of `value` in, `bytes` (or 4 for votes) of `result` out. `arg` is
// the source lane / delta / lane mask of the shuffles.
void collective(Collective kind, unsigned mask, const void* value, int bytes, int arg, int width, void* result,
                const char* file, int line);

// Called by the atomics below before they touch `addr` (checks and counts it as an atomic access).
void note_atomic(const void* addr, int bytes);

[[noreturn]] void kernel_assert_failed(const char* condition, const char* file, int line);

struct LaunchConfig {
  const char* kernel;
  const char* file;
  int line;
  dim3 grid, block;
  size_t shared_bytes;
  dim3 cluster;  // blocks per cluster: (1, 1, 1) for a plain launch
};

// Runs `body(closure)` on every thread of the grid. `pointers` are the kernel's pointer arguments:
// the allocations they point into are the global memory the launch may touch.
void launch(const LaunchConfig& config, void (*body)(void*), void* closure, const void* const* pointers,
            size_t n_pointers);
// Inside a fiber: from now on the fiber's accesses are checked (the kernel body starts).
void begin_kernel();

// The emulated device: shared memory per block (the opt-in limit kernels plan with), SMs, and the
// compute capability it presents (major * 10 + minor: 90 unless a test sets another).
size_t shared_memory_limit();
int multiprocessor_count();
int compute_capability();

constexpr size_t kMaxDynamicSharedBytes = 232448;  // H100's opt-in limit (227 KB)
int register_dynamic_shared(const void* address_on_this_thread, size_t bytes);

template <typename T>
const void* pointer_or_null(const T& v) {
  if constexpr (std::is_pointer_v<T>) {
    return static_cast<const void*>(v);
  } else {
    return nullptr;
  }
}

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  LaunchConfig config;

  using Args = std::tuple<std::decay_t<P>...>;
  struct Closure {
    void (*kernel)(P...);
    const Args* args;
  };

  // Runs on a fiber: copy the arguments onto the fiber's stack before checks start (the tuple lives
  // on the launching thread's stack), then call the kernel.
  static void body(void* p) {
    const Closure* c = static_cast<const Closure*>(p);
    auto fn = c->kernel;
    Args local = *c->args;
    begin_kernel();
    std::apply(fn, local);
  }

  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "APK_LAUNCH: wrong number of kernel arguments");
    const Args args(static_cast<std::decay_t<P>>(a)...);
    const void* pointers[sizeof...(P) + 1] = {nullptr};
    size_t n = 0;
    std::apply([&](const auto&... v) { ((pointers[n++] = pointer_or_null(v)), ...); }, args);
    Closure closure{kernel, &args};
    launch(config, &body, &closure, pointers, n);
  }
};

template <typename... P>
Launcher<P...> make_launcher(void (*kernel)(P...), const char* name, const char* file, int line, dim3 grid,
                             dim3 block, size_t shared_bytes, dim3 cluster = dim3(1, 1, 1)) {
  return Launcher<P...>{kernel, LaunchConfig{name, file, line, grid, block, shared_bytes, cluster}};
}

// ---- device functions -------------------------------------------------------------------------
template <typename T>
T shfl(Collective kind, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of an unsupported type");
  T r;
  collective(kind, mask, &v, static_cast<int>(sizeof(T)), arg, width, &r, file, line);
  return r;
}

inline unsigned vote(Collective kind, unsigned mask, int predicate, const char* file, int line) {
  unsigned r = 0;
  collective(kind, mask, &predicate, static_cast<int>(sizeof(int)), 0, 32, &r, file, line);
  return r;
}

template <typename T>
unsigned match_any(unsigned mask, T v, const char* file, int line) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32/64-bit values");
  unsigned r = 0;
  collective(Collective::MatchAny, mask, &v, static_cast<int>(sizeof(T)), 0, 32, &r, file, line);
  return r;
}

// Atomics: fibers of a block run on one OS thread and switch only at barriers and collectives, so
// a read-modify-write cannot interleave; the runtime records the access as atomic (no race with
// other atomics). Not instrumented (that would report the access as a plain one).
// `update` maps the old value to the new one; only this function touches *a.
template <typename T, typename Update>
__attribute__((no_sanitize("thread"))) inline T atomic_rmw(T* a, Update update) {
  note_atomic(a, sizeof(T));
  const T old = *a;
  *a = static_cast<T>(update(old));
  return old;
}

}  // namespace apk_emu

// ---- CUDA built-ins ----------------------------------------------------------------------------
#define threadIdx (::apk_emu::thread_index())
#define blockIdx (::apk_emu::block_index())
#define blockDim (::apk_emu::block_dim())
#define gridDim (::apk_emu::grid_dim())

#define __syncthreads() ::apk_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::apk_emu::syncwarp_(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
// Blocks run one after another on a sequentially consistent memory: a fence orders nothing more.
#define __threadfence() ((void)0)
namespace apk_emu {
inline void syncwarp_(const char* file, int line, unsigned mask = 0xFFFFFFFFu) {
  collective(Collective::SyncWarp, mask, nullptr, 0, 0, 32, nullptr, file, line);
}
}  // namespace apk_emu

#define __shfl_sync(mask, v, lane, ...) \
  ::apk_emu::shfl(::apk_emu::Collective::Shfl, mask, v, lane, ::apk_emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::apk_emu::shfl(::apk_emu::Collective::ShflUp, mask, v, delta, ::apk_emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, delta, ...)                                                              \
  ::apk_emu::shfl(::apk_emu::Collective::ShflDown, mask, v, delta, ::apk_emu::width_or_32(__VA_ARGS__), __FILE__, \
                  __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...)                                                               \
  ::apk_emu::shfl(::apk_emu::Collective::ShflXor, mask, v, lane_mask, ::apk_emu::width_or_32(__VA_ARGS__), __FILE__, \
                  __LINE__)
#define __ballot_sync(mask, p) ::apk_emu::vote(::apk_emu::Collective::Ballot, mask, (p) ? 1 : 0, __FILE__, __LINE__)
#define __any_sync(mask, p) \
  static_cast<int>(::apk_emu::vote(::apk_emu::Collective::Any, mask, (p) ? 1 : 0, __FILE__, __LINE__))
#define __all_sync(mask, p) \
  static_cast<int>(::apk_emu::vote(::apk_emu::Collective::All, mask, (p) ? 1 : 0, __FILE__, __LINE__))
#define __match_any_sync(mask, v) ::apk_emu::match_any(mask, v, __FILE__, __LINE__)
namespace apk_emu {
constexpr int width_or_32() { return 32; }
constexpr int width_or_32(int w) { return w; }
}  // namespace apk_emu

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename To, typename From>
inline To apk_emu_bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}
inline unsigned __float_as_uint(float v) { return apk_emu_bit_cast<unsigned>(v); }
inline int __float_as_int(float v) { return apk_emu_bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return apk_emu_bit_cast<float>(v); }
inline float __int_as_float(int v) { return apk_emu_bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return apk_emu_bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return apk_emu_bit_cast<double>(v); }

// Fast-math intrinsics: the accurate host functions (results within the intrinsics' error bounds).
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __log2f(float v) { return std::log2(v); }
inline float __sinf(float v) { return std::sin(v); }
inline float __cosf(float v) { return std::cos(v); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float v) { return 1.0f / v; }
inline float __fsqrt_rn(float v) { return std::sqrt(v); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

// CUDA's global min/max overloads.
#define APK_EMU_MINMAX(T)                             \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
APK_EMU_MINMAX(int)
APK_EMU_MINMAX(unsigned)
APK_EMU_MINMAX(long)
APK_EMU_MINMAX(unsigned long)
APK_EMU_MINMAX(long long)
APK_EMU_MINMAX(unsigned long long)
APK_EMU_MINMAX(float)
APK_EMU_MINMAX(double)
#undef APK_EMU_MINMAX

// Atomics (shared and global memory).
template <typename T>
inline T atomicAdd(T* a, T v) { return apk_emu::atomic_rmw(a, [v](T old) { return old + v; }); }
template <typename T>
inline T atomicSub(T* a, T v) { return apk_emu::atomic_rmw(a, [v](T old) { return old - v; }); }
template <typename T>
inline T atomicMax(T* a, T v) { return apk_emu::atomic_rmw(a, [v](T old) { return old < v ? v : old; }); }
template <typename T>
inline T atomicMin(T* a, T v) { return apk_emu::atomic_rmw(a, [v](T old) { return v < old ? v : old; }); }
template <typename T>
inline T atomicExch(T* a, T v) { return apk_emu::atomic_rmw(a, [v](T) { return v; }); }
template <typename T>
inline T atomicCAS(T* a, T compare, T v) {
  return apk_emu::atomic_rmw(a, [compare, v](T old) { return old == compare ? v : old; });
}
template <typename T>
inline T atomicAnd(T* a, T v) { return apk_emu::atomic_rmw(a, [v](T old) { return old & v; }); }
template <typename T>
inline T atomicOr(T* a, T v) { return apk_emu::atomic_rmw(a, [v](T old) { return old | v; }); }
template <typename T>
inline T atomicXor(T* a, T v) { return apk_emu::atomic_rmw(a, [v](T old) { return old ^ v; }); }

// Vector types.
#define APK_EMU_VEC(name, T, n, align) struct __attribute__((aligned(align))) name##n
APK_EMU_VEC(float, float, 2, 8) { float x, y; };
APK_EMU_VEC(float, float, 4, 16) { float x, y, z, w; };
APK_EMU_VEC(int, int, 2, 8) { int x, y; };
APK_EMU_VEC(int, int, 4, 16) { int x, y, z, w; };
APK_EMU_VEC(uint, unsigned, 2, 8) { unsigned x, y; };
APK_EMU_VEC(uint, unsigned, 4, 16) { unsigned x, y, z, w; };
APK_EMU_VEC(double, double, 2, 16) { double x, y; };
#undef APK_EMU_VEC
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Half precision: c10's host types (the kernels convert through fp32 like the device does).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half(float v) { return __half(v); }
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16(float v) { return __nv_bfloat16(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __half __hadd(__half a, __half b) { return __half(static_cast<float>(a) + static_cast<float>(b)); }
inline __half __hmul(__half a, __half b) { return __half(static_cast<float>(a) * static_cast<float>(b)); }

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  ((cond) ? static_cast<void>(0) : ::apk_emu::kernel_assert_failed(#cond, __FILE__, __LINE__))

// ---- the hooks of csrc/ops/cuda/launch.cuh ------------------------------------------------------
#define APK_LAUNCH(grid, block, shared_bytes, stream, ...)                                                  \
  (static_cast<void>(stream), ::apk_emu::make_launcher(__VA_ARGS__, #__VA_ARGS__, __FILE__, __LINE__, grid, \
                                                       block, shared_bytes))
#define APK_LAUNCH_CLUSTER(grid, block, cluster, shared_bytes, stream, ...)                                 \
  (static_cast<void>(stream), ::apk_emu::make_launcher(__VA_ARGS__, #__VA_ARGS__, __FILE__, __LINE__, grid, \
                                                       block, shared_bytes, cluster))
#define APK_CUDA_DEVICE_TYPE c10::DeviceType::CPU
#ifndef APK_EMU_OP_SUFFIX
#define APK_EMU_OP_SUFFIX "_cuda_emulated"
#endif
#define APK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(apkernels, CPU, m)
#define APK_CUDA_OP(name) name APK_EMU_OP_SUFFIX

// `extern __shared__ T name[];` inside a kernel refers to this thread_local buffer, defined once per
// wrapper TU in the kernel's namespace (the runtime bounds its use to the launch's dynamic bytes).
#define APK_EMU_DYNAMIC_SHARED(name)                                                                 \
  thread_local __attribute__((aligned(16))) unsigned char name[::apk_emu::kMaxDynamicSharedBytes]; \
  [[maybe_unused]] const int apk_emu_registered_##name =                                            \
      ::apk_emu::register_dynamic_shared(name, ::apk_emu::kMaxDynamicSharedBytes);
