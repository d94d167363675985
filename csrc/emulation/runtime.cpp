// The CUDA emulation runtime (see cuda_emulation.h): fibers and their scheduler, barriers and warp
// collectives, the __tsan_* entry points that check every load and store of the emulated kernels,
// the allocation tracker that tells the launch which global memory it may touch, traffic counters,
// and the Python module apkernels._C_emulated. This file is compiled WITHOUT -fsanitize=thread.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "emulation/cuda_emulation.h"

namespace apk_emu {
namespace {

// ---- allocations: the global memory a launch may touch ------------------------------------------

struct TrackedBlock {
  size_t size;
  c10::DeleterFnPtr deleter;
};

std::mutex g_alloc_mutex;
std::map<uintptr_t, TrackedBlock>& tracked() {
  static auto* blocks = new std::map<uintptr_t, TrackedBlock>();  // never destroyed: frees may come late
  return *blocks;
}

void tracked_delete(void* p) {
  c10::DeleterFnPtr deleter = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    auto it = tracked().find(reinterpret_cast<uintptr_t>(p));
    if (it != tracked().end()) {
      deleter = it->second.deleter;
      tracked().erase(it);
    }
  }
  if (deleter != nullptr) deleter(p);
}

// Wraps the CPU allocator and records every live block, so that a launch can map the pointers it is
// given to whole allocations (what compute-sanitizer's memcheck checks against).
struct TrackingAllocator final : c10::Allocator {
  c10::Allocator* inner;
  explicit TrackingAllocator(c10::Allocator* a) : inner(a) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr d = inner->allocate(n);
    void* p = d.get();
    if (p == nullptr || d.get_context() != p || d.get_deleter() == nullptr) return d;
    c10::DeleterFnPtr deleter = d.get_deleter();
    const c10::Device device = d.device();
    d.release_context();
    {
      std::lock_guard<std::mutex> lock(g_alloc_mutex);
      tracked()[reinterpret_cast<uintptr_t>(p)] = TrackedBlock{n, deleter};
    }
    return c10::DataPtr(p, p, &tracked_delete, device);
  }
  c10::DeleterFnPtr raw_deleter() const override { return &tracked_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

void install_tracking_allocator() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  c10::SetCPUAllocator(new TrackingAllocator(c10::GetCPUAllocator()), /*priority=*/100);
}

// ---- the module's own memory: thread-local (shared memory) block and read-only segments ----------

thread_local volatile char t_tls_anchor = 0;

struct ModuleInfo {
  std::string path;
  uintptr_t base = 0;
  std::vector<std::pair<uintptr_t, uintptr_t>> readonly, writable;  // [lo, hi)
  size_t tls_size = 0;
};

const ModuleInfo& module_info() {
  static ModuleInfo info = [] {
    ModuleInfo m;
    Dl_info dl{};
    dladdr(reinterpret_cast<void*>(&install_tracking_allocator), &dl);
    m.path = dl.dli_fname ? dl.dli_fname : "";
    m.base = reinterpret_cast<uintptr_t>(dl.dli_fbase);
    dl_iterate_phdr(
        [](dl_phdr_info* p, size_t, void* arg) -> int {
          auto* mi = static_cast<ModuleInfo*>(arg);
          if (p->dlpi_name == nullptr || mi->path != p->dlpi_name) return 0;
          for (int i = 0; i < p->dlpi_phnum; ++i) {
            const auto& ph = p->dlpi_phdr[i];
            if (ph.p_type == PT_LOAD) {
              (ph.p_flags & PF_W ? mi->writable : mi->readonly)
                  .emplace_back(p->dlpi_addr + ph.p_vaddr, p->dlpi_addr + ph.p_vaddr + ph.p_memsz);
            }
            if (ph.p_type == PT_TLS) mi->tls_size = ph.p_memsz;
          }
          return 1;
        },
        &m);
    return m;
  }();
  return info;
}

// This thread's block of the module's thread_local variables: the __shared__ variables of every
// emulated kernel (and a few bytes of this runtime, which are never touched by instrumented code).
std::pair<uintptr_t, uintptr_t> tls_block() {
  (void)t_tls_anchor;  // make sure the block is allocated on this thread
  const ModuleInfo& mi = module_info();
  struct Arg {
    const ModuleInfo* mi;
    uintptr_t lo = 0;
  } arg{&mi};
  dl_iterate_phdr(
      [](dl_phdr_info* p, size_t, void* v) -> int {
        auto* a = static_cast<Arg*>(v);
        if (p->dlpi_name == nullptr || a->mi->path != p->dlpi_name) return 0;
        a->lo = reinterpret_cast<uintptr_t>(p->dlpi_tls_data);
        return 1;
      },
      &arg);
  return {arg.lo, arg.lo + mi.tls_size};
}

// The kernel's name for messages and counters, from the module's symbol table (kernels live in
// anonymous namespaces: local symbols that dladdr does not see): "patch_pool_kernel<float, ...>".
std::string kernel_name(const void* fn, const char* fallback) {
  static std::mutex mutex;
  static std::map<uintptr_t, std::string>* symbols = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  const ModuleInfo& mi = module_info();
  if (symbols == nullptr) {
    symbols = new std::map<uintptr_t, std::string>();
    std::ifstream in(mi.path, std::ios::binary);
    const std::vector<char> elf((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (elf.size() >= sizeof(Elf64_Ehdr) && std::memcmp(elf.data(), ELFMAG, SELFMAG) == 0) {
      const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(elf.data());
      const auto* sh = reinterpret_cast<const Elf64_Shdr*>(elf.data() + eh->e_shoff);
      for (int i = 0; i < eh->e_shnum; ++i) {
        if (sh[i].sh_type != SHT_SYMTAB) continue;
        const char* strtab = elf.data() + sh[sh[i].sh_link].sh_offset;
        const auto* sym = reinterpret_cast<const Elf64_Sym*>(elf.data() + sh[i].sh_offset);
        for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
          if (ELF64_ST_TYPE(sym[k].st_info) == STT_FUNC && sym[k].st_value != 0) {
            (*symbols)[sym[k].st_value] = strtab + sym[k].st_name;
          }
        }
      }
    }
  }
  auto it = symbols->find(reinterpret_cast<uintptr_t>(fn) - mi.base);
  if (it == symbols->end()) return fallback;
  int status = 0;
  char* demangled = abi::__cxa_demangle(it->second.c_str(), nullptr, nullptr, &status);
  std::string name = status == 0 && demangled ? demangled : it->second;
  std::free(demangled);
  // Drop the parameter list (the last balanced parentheses) and the namespaces.
  if (!name.empty() && name.back() == ')') {
    int depth = 0;
    for (size_t i = name.size(); i-- > 0;) {
      depth += name[i] == ')' ? 1 : name[i] == '(' ? -1 : 0;
      if (depth == 0) {
        name.resize(i);
        break;
      }
    }
  }
  const size_t angle = name.find('<');
  const size_t colons = name.rfind("::", angle);
  if (colons != std::string::npos) name = name.substr(colons + 2);
  return name;
}

struct DynamicShared {
  uintptr_t offset;  // from the start of the TLS block
  size_t bytes;
};
std::vector<DynamicShared>& dynamic_shared() {
  static auto* v = new std::vector<DynamicShared>();
  return *v;
}

// ---- emulated device ----------------------------------------------------------------------------

size_t g_shared_limit = kMaxDynamicSharedBytes;
int g_compute_capability = 90;  // sm_90: thread-block clusters and distributed shared memory
int g_multiprocessors = 4;  // few SMs: grid-stride loops get several iterations at small sizes

struct Mutation {
  std::string kind;  // "" none, "skip_syncthreads", "divergent_syncthreads", "drop_mask_lane", "wrong_source_lane", "skip_cluster_sync"
  std::string file;  // suffix of the call site's file
  int line = 0;
  int hits = 0;
};
Mutation g_mutation;

bool mutation_at(const char* kind, const char* file, int line) {
  if (g_mutation.kind != kind || g_mutation.line != line) return false;
  const size_t n = std::strlen(file), m = g_mutation.file.size();
  if (m > n || std::strcmp(file + n - m, g_mutation.file.c_str()) != 0) return false;
  ++g_mutation.hits;
  return true;
}

// ---- launches -----------------------------------------------------------------------------------

enum class State : uint8_t { Runnable, Barrier, ClusterBarrier, Collective, Exited };

struct Fiber {
  ucontext_t ctx;
  uintptr_t stack_lo = 0, stack_hi = 0;
  State state = State::Runnable;
  bool checking = false;
  // The collective this lane waits in.
  Collective kind = Collective::Shfl;
  unsigned mask = 0;
  int arg = 0, width = 32, bytes = 0;
  bool wrong_source_lane = false;  // mutation: a shuffle reads the lane after its source
  unsigned char value[16] = {};
  void* result = nullptr;
  const char* file = "";
  int line = 0;
};

struct Region {
  uintptr_t base;
  size_t size;
  std::vector<uint64_t> read_bits, write_bits;
};

// Shadow state of one byte of shared memory (the TLS block; one shadow per block rank of a cluster).
// Epochs are global counters, so stale entries from earlier blocks never match and nothing needs
// clearing between blocks. Threads are named by their cluster-wide id (rank * threads + tid), warps
// likewise (rank * warps + warp), so accesses through distributed shared memory (another block of
// the cluster) are recorded like local ones.
struct Cell {
  uint32_t init_block = 0;  // block serial of the last write
  uint32_t w_epoch = 0;     // last plain write: the writer's block epoch, thread, its warp's epoch
  uint16_t w_tid = 0, w_wepoch = 0;
  uint32_t r_epoch = 0;  // plain reads since: first reader, or several (multi: latest epoch; same
  uint16_t r_tid = 0, r_wepoch = 0, r_warp = 0, r_rank = 0;  // warp / rank or 0xFFFF)
  uint8_t r_multi = 0;
  uint32_t a_epoch = 0;  // atomics, same scheme
  uint16_t a_tid = 0, a_wepoch = 0, a_warp = 0, a_rank = 0;
  uint8_t a_multi = 0;
};

struct LaunchRecord {
  std::string kernel, site;
  dim3 grid, block, cluster;
  size_t shared_bytes = 0;
  uint64_t read = 0, written = 0, read_distinct = 0, written_distinct = 0;
};

std::mutex g_launch_mutex;
std::mutex g_records_mutex;
std::vector<LaunchRecord> g_records;
std::vector<char*> g_stacks;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
uint32_t g_epoch = 0;
uint32_t g_block_serial = 0;

// Zero-filled memory committed page by page as it is touched (shadows, parked shared memory).
void* lazy_zeroed(size_t bytes) {
  void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(m != MAP_FAILED, "apkernels CUDA emulation: cannot map ", bytes, " bytes");
  return m;
}

// Per block rank of a cluster (rank 0 only without clusters): the shadow of its shared memory and,
// in a cluster launch, the buffer its shared memory is parked in while another block runs.
struct RankMemory {
  Cell* shadow = nullptr;
  unsigned char* parked = nullptr;
};
std::vector<RankMemory> g_ranks;

// The state of one block (CTA). A launch runs the blocks of one cluster at a time as fibers of this
// OS thread; the running block's state is the Launch itself (a Launch is a Cta), the others wait in
// Launch::parked, and their shared memory in RankMemory::parked (the __shared__ variables are this
// OS thread's thread_local block, so only one block's shared memory can be in place).
struct Cta {
  uint3 block_index{0, 0, 0};
  uint32_t block_epoch = 0, block_serial = 0;
  int barrier_arrived = 0;
  int live = 0;  // threads not exited
  std::vector<Fiber> fibers;
  std::vector<uint16_t> warp_epoch;
  std::vector<unsigned> warp_arrived;  // lanes waiting in the warp's pending collective
  std::vector<unsigned> warp_mask;     // its mask
};

struct Launch : Cta {
  LaunchConfig config;
  std::string name;
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
  std::vector<Region> regions;
  size_t last_region = 0;
  int threads = 0;  // per block
  int current = 0;  // running thread of the running block
  int rank = 0;     // the running block's rank in its cluster
  int ranks = 1;    // blocks per cluster
  std::vector<Cta> parked;  // [ranks]; parked[rank] is empty while that block runs
  int cluster_arrived = 0;  // threads waiting in cluster.sync()
  // Accesses with an epoch below this happened before the last cluster barrier (or the cluster's
  // start): ordered before everything that runs now.
  uint32_t cluster_mark = 0;
  uintptr_t tls_lo = 0, tls_hi = 0;
  std::vector<std::pair<uintptr_t, uintptr_t>> dynamic;  // [base, base + max) of the dynamic buffers
  bool failed = false;
  std::string error;
  ucontext_t scheduler;
  uint64_t read = 0, written = 0;
};

thread_local Launch* t_launch = nullptr;
thread_local Fiber* t_fiber = nullptr;

const char* collective_name(Collective k) {
  switch (k) {
    case Collective::Shfl: return "__shfl_sync";
    case Collective::ShflUp: return "__shfl_up_sync";
    case Collective::ShflDown: return "__shfl_down_sync";
    case Collective::ShflXor: return "__shfl_xor_sync";
    case Collective::Ballot: return "__ballot_sync";
    case Collective::Any: return "__any_sync";
    case Collective::All: return "__all_sync";
    case Collective::MatchAny: return "__match_any_sync";
    case Collective::SyncWarp: return "__syncwarp";
  }
  return "collective";
}

std::string base_name(const char* file) {
  const char* slash = std::strrchr(file, '/');
  return slash ? slash + 1 : file;
}

std::string site(const char* file, int line) { return base_name(file) + ":" + std::to_string(line); }

std::string thread_name(const Launch& L, int tid) {
  const dim3 b = L.config.block;
  std::ostringstream s;
  s << "(" << tid % b.x << "," << (tid / b.x) % b.y << "," << tid / (b.x * b.y) << ")";
  return s.str();
}

std::string where(const Launch& L, int tid) {
  std::ostringstream s;
  s << "kernel " << L.config.kernel << " (launched at " << site(L.config.file, L.config.line) << "), block ("
    << L.block_index.x << "," << L.block_index.y << "," << L.block_index.z << ")";
  if (L.ranks > 1) s << " (cluster rank " << L.rank << ")";
  s << ", thread " << thread_name(L, tid);
  return s.str();
}

std::string hex(uintptr_t a) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%" PRIxPTR, a);
  return buf;
}

std::string code_address(const void* pc) {
  if (pc == nullptr) return "";
  const ModuleInfo& mi = module_info();
  return " (code at " + base_name(mi.path.c_str()) + "+" + hex(reinterpret_cast<uintptr_t>(pc) - mi.base) +
         ": addr2line -f -C -e " + mi.path + " " + hex(reinterpret_cast<uintptr_t>(pc) - mi.base) + ")";
}

// Records the first error of the launch and leaves the fiber for good (its frames are abandoned:
// kernels keep no objects with destructors on their stacks).
[[noreturn]] void fail(const std::string& what) {
  Launch* L = t_launch;
  if (!L->failed) {
    L->failed = true;
    L->error = "apkernels CUDA emulation: " + what;
  }
  Fiber* f = t_fiber;
  f->checking = false;
  swapcontext(&f->ctx, &L->scheduler);
  std::abort();  // never resumed
}

// ---- memory checks ------------------------------------------------------------------------------

// Runtime code called from a fiber suspends its checks: library code it calls (std::string...)
// may be the instrumented copy from a wrapper TU (the linker keeps one of the COMDAT copies).
struct Unchecked {
  Fiber* f;
  bool was;
  Unchecked() : f(t_fiber), was(f != nullptr && f->checking) {
    if (f != nullptr) f->checking = false;
  }
  ~Unchecked() {
    if (f != nullptr) f->checking = was;
  }
};

// Cluster-wide names: thread rank * threads + tid, warp rank * warps + warp.
inline int cluster_tid(const Launch& L, int tid) { return L.rank * L.threads + tid; }
inline int cluster_warp(const Launch& L, int tid) { return L.rank * static_cast<int>(L.warp_epoch.size()) + tid / 32; }

// Does an access recorded as (epoch, thread) happen before the running thread `cur` (block-local id)
// accesses now? Yes when it is the same thread, came before the last cluster barrier, or came from
// this block before its last __syncthreads (or from this warp before its last __syncwarp).
inline bool ordered(const Launch& L, uint32_t epoch, uint16_t ctid, uint16_t wepoch, int cur) {
  if (ctid == cluster_tid(L, cur) || epoch < L.cluster_mark) return true;
  if (ctid / L.threads != L.rank) return false;  // another block of the cluster, since the cluster barrier
  if (epoch != L.block_epoch) return true;
  const int tid = ctid % L.threads;
  return tid / 32 == cur / 32 && L.warp_epoch[cur / 32] != wepoch;
}

inline bool readers_ordered(const Launch& L, uint32_t epoch, uint16_t ctid, uint16_t wepoch, uint16_t cwarp,
                            uint16_t rank, uint8_t multi, int cur) {
  if (epoch < L.cluster_mark) return true;
  if (!multi) return ordered(L, epoch, ctid, wepoch, cur);
  if (rank != L.rank) return false;        // readers in other blocks (or several blocks)
  if (epoch != L.block_epoch) return true;  // the latest reader of this block came before its barrier
  return cwarp == cluster_warp(L, cur) && L.warp_epoch[cur / 32] != wepoch;
}

enum class Access { Read, Write, Atomic };

// `a`: the address in the running block's view (its own shared memory, or the parked memory of block
// rank `owner` reached through distributed shared memory); `offset`: from the start of shared memory.
[[noreturn]] void race(const Launch& L, int tid, Access access, uintptr_t a, size_t offset, int owner, int bytes,
                       const char* other, int other_ctid, const void* pc) {
  std::ostringstream s;
  const char* what = access == Access::Read ? "read" : access == Access::Write ? "write" : "atomic";
  s << "shared-memory data race in " << where(L, tid) << ": " << what << " of " << bytes << " bytes at address "
    << hex(a) << " (shared offset " << offset;
  if (owner != L.rank) s << " of cluster rank " << owner << ", through distributed shared memory";
  s << ") conflicts with " << other << " by thread ";
  if (other_ctid >= 0) {
    s << thread_name(L, other_ctid % L.threads);
    if (L.ranks > 1) s << " of cluster rank " << other_ctid / L.threads;
  } else {
    s << "(several)";
  }
  s << (L.ranks > 1 ? " since the last barrier (__syncthreads of its block, or cluster.sync())" : " since the last barrier")
    << code_address(pc);
  fail(s.str());
}

// An access of `bytes` at `a` to the shared memory of block rank `owner` (L.rank: the running block's
// own; else through distributed shared memory, `a` then lies in that block's parked memory).
void shared_access(Launch& L, int tid, uintptr_t a, int bytes, Access access, const void* pc, int owner) {
  const uintptr_t view = owner == L.rank ? L.tls_lo : reinterpret_cast<uintptr_t>(g_ranks[owner].parked);
  const uintptr_t view_a = a;
  a = a - view + L.tls_lo;  // the same byte in the thread_local block's coordinates
  const Cta& owner_cta = owner == L.rank ? static_cast<const Cta&>(L) : L.parked[owner];
  Cell* shadow = g_ranks[owner].shadow;
  const int ctid = cluster_tid(L, tid), cwarp = cluster_warp(L, tid);
  for (const auto& [lo, hi] : L.dynamic) {
    if (a >= lo && a < hi && a + bytes > lo + L.config.shared_bytes) {
      fail("dynamic shared memory out of bounds in " + where(L, tid) + ": " + std::to_string(bytes) +
           " bytes at offset " + std::to_string(a - lo) + " of `extern __shared__`, the launch has " +
           std::to_string(L.config.shared_bytes) + " bytes" + code_address(pc));
    }
  }
  const uint16_t wepoch = L.warp_epoch[tid / 32];
  for (int i = 0; i < bytes; ++i) {
    const uintptr_t byte = a + i;
    if (byte >= L.tls_hi) break;
    Cell& c = shadow[byte - L.tls_lo];
    const size_t offset = a - L.tls_lo;
    if (access != Access::Write && c.init_block != owner_cta.block_serial) {
      fail("read of uninitialised shared memory in " + where(L, tid) + ": address " + hex(view_a) + " (shared offset " +
           std::to_string(offset) + (owner == L.rank ? ") was not written by this block"
                                                     : " of cluster rank " + std::to_string(owner) +
                                                           ", through distributed shared memory) was not written by that block") +
           code_address(pc));
    }
    if (c.w_epoch && !ordered(L, c.w_epoch, c.w_tid, c.w_wepoch, tid)) {
      race(L, tid, access, view_a, offset, owner, bytes, "a write", c.w_tid, pc);
    }
    if (access != Access::Atomic && c.a_epoch &&
        !readers_ordered(L, c.a_epoch, c.a_tid, c.a_wepoch, c.a_warp, c.a_rank, c.a_multi, tid)) {
      race(L, tid, access, view_a, offset, owner, bytes, "an atomic", c.a_multi ? -1 : c.a_tid, pc);
    }
    if (access != Access::Read && c.r_epoch &&
        !readers_ordered(L, c.r_epoch, c.r_tid, c.r_wepoch, c.r_warp, c.r_rank, c.r_multi, tid)) {
      race(L, tid, access, view_a, offset, owner, bytes, "a read", c.r_multi ? -1 : c.r_tid, pc);
    }
    // Add the running thread to a reader (or atomic) set: it replaces the set when every earlier
    // member happened before it, else the set becomes "several" (latest epoch, common warp / rank).
    auto add = [&](uint32_t& epoch, uint16_t& t, uint16_t& we, uint16_t& w, uint16_t& rk, uint8_t& multi) {
      if (readers_ordered(L, epoch, t, we, w, rk, multi, tid)) {
        epoch = L.block_epoch;
        t = static_cast<uint16_t>(ctid);
        w = static_cast<uint16_t>(cwarp);
        rk = static_cast<uint16_t>(L.rank);
        multi = 0;
      } else {
        multi = 1;
        epoch = std::max(epoch, L.block_epoch);
        if (w != cwarp) w = 0xFFFF;
        if (rk != L.rank) rk = 0xFFFF;
      }
      we = wepoch;
    };
    if (access == Access::Read) {
      add(c.r_epoch, c.r_tid, c.r_wepoch, c.r_warp, c.r_rank, c.r_multi);
    } else if (access == Access::Atomic) {
      add(c.a_epoch, c.a_tid, c.a_wepoch, c.a_warp, c.a_rank, c.a_multi);
      c.init_block = owner_cta.block_serial;
    } else {
      c.w_epoch = L.block_epoch;
      c.w_tid = static_cast<uint16_t>(ctid);
      c.w_wepoch = wepoch;
      c.r_epoch = 0;
      c.a_epoch = 0;
      c.init_block = owner_cta.block_serial;
    }
  }
}

inline void mark(std::vector<uint64_t>& bits, size_t from, size_t n) {
  for (size_t i = from; i < from + n; ++i) bits[i >> 6] |= uint64_t(1) << (i & 63);
}

void check_access(const void* address, size_t bytes, Access access, const void* pc) {
  Fiber* f = t_fiber;
  if (f == nullptr || !f->checking) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (a >= f->stack_lo && a + bytes <= f->stack_hi) return;  // the thread's own locals
  Unchecked unchecked;
  Launch& L = *t_launch;
  const int tid = L.current;
  if (a >= L.tls_lo && a < L.tls_hi) {
    shared_access(L, tid, a, static_cast<int>(bytes), access, pc, L.rank);
    return;
  }
  if (L.ranks > 1) {  // distributed shared memory: another block's parked shared memory
    const size_t tls_bytes = L.tls_hi - L.tls_lo;
    for (int r = 0; r < L.ranks; ++r) {
      const uintptr_t lo = reinterpret_cast<uintptr_t>(g_ranks[r].parked);
      if (a < lo || a >= lo + tls_bytes) continue;
      if (r == L.rank) {
        fail("access to the running block's own shared memory through a pointer map_shared_rank gave another "
             "block in " + where(L, tid) + code_address(pc));
      }
      if (L.parked[r].live == 0) {
        fail("distributed shared memory access in " + where(L, tid) + " to cluster rank " + std::to_string(r) +
             ", whose threads have all exited (a block's shared memory ends with it: cluster.sync() before exit)" +
             code_address(pc));
      }
      shared_access(L, tid, a, static_cast<int>(bytes), access, pc, r);
      return;
    }
  }
  const size_t n = L.regions.size();
  for (size_t k = 0; k < n; ++k) {
    Region& r = L.regions[(L.last_region + k) % n];
    if (a >= r.base && a + bytes <= r.base + r.size) {
      L.last_region = (L.last_region + k) % n;
      if (access != Access::Write) {
        L.read += bytes;
        mark(r.read_bits, a - r.base, bytes);
      }
      if (access != Access::Read) {
        L.written += bytes;
        mark(r.write_bits, a - r.base, bytes);
      }
      return;
    }
  }
  if (access == Access::Read) {
    for (const auto& [lo, hi] : module_info().readonly) {
      if (a >= lo && a + bytes <= hi) return;  // constants of the module
    }
  }
  // A gcov build (APKERNELS_EMULATION_COVERAGE=1) counts arcs in the module's data: not the kernel's.
  static const bool coverage = std::getenv("APKERNELS_EMULATION_COVERAGE") != nullptr;
  if (coverage) {
    for (const auto& [lo, hi] : module_info().writable) {
      if (a >= lo && a + bytes <= hi) return;
    }
  }
  std::ostringstream s;
  s << "out-of-bounds global memory " << (access == Access::Read ? "read" : access == Access::Write ? "write" : "atomic")
    << " in " << where(L, tid) << ": " << bytes << " bytes at address " << hex(a)
    << " are outside every tensor passed to the launch";
  for (const Region& r : L.regions) {
    if (a + bytes > r.base && a < r.base + r.size + 4096) {
      s << " (allocation [" << hex(r.base) << ", " << hex(r.base + r.size) << ") of " << r.size << " bytes)";
      break;
    }
    if (a < r.base && a + 4096 >= r.base) {
      s << " (" << (r.base - a) << " bytes before the allocation at " << hex(r.base) << ")";
      break;
    }
  }
  s << code_address(pc);
  fail(s.str());
}

// ---- scheduling ---------------------------------------------------------------------------------

void fiber_entry() {
  Launch* L = t_launch;
  L->body(L->closure);
  Fiber* f = t_fiber;
  f->checking = false;
  f->state = State::Exited;
  swapcontext(&f->ctx, &L->scheduler);
  std::abort();
}

void yield() {
  Fiber* f = t_fiber;
  swapcontext(&f->ctx, &t_launch->scheduler);
}

std::string describe_waits(const Launch& L, unsigned lanes_of_warp, int warp) {
  std::ostringstream s;
  int shown = 0;
  for (int l = 0; l < 32 && shown < 4; ++l) {
    if (!((lanes_of_warp >> l) & 1u)) continue;
    const int t = warp * 32 + l;
    if (t >= L.threads) continue;
    const Fiber& f = L.fibers[t];
    s << (shown++ ? "; " : "") << "thread " << thread_name(L, t);
    if (f.state == State::Exited) {
      s << " exited";
    } else if (f.state == State::Barrier) {
      s << " waits in __syncthreads at " << site(f.file, f.line);
    } else if (f.state == State::Collective) {
      s << " waits in " << collective_name(f.kind) << " at " << site(f.file, f.line) << " with mask " << hex(f.mask);
    }
  }
  return s.str();
}

std::string deadlock(const Launch& L) {
  std::ostringstream s;
  // A barrier some threads never reach.
  int at_barrier = -1, exited = 0, other = -1;
  for (int t = 0; t < L.threads; ++t) {
    const State st = L.fibers[t].state;
    if (st == State::Barrier && at_barrier < 0) at_barrier = t;
    if (st == State::Exited) ++exited;
    if (st == State::Collective && other < 0) other = t;
  }
  if (at_barrier >= 0) {
    const Fiber& f = L.fibers[at_barrier];
    s << "__syncthreads at " << site(f.file, f.line) << " is not reached by every thread of the block in "
      << where(L, at_barrier) << ": " << L.barrier_arrived << " of " << L.threads << " threads wait there";
    for (int t = 0; t < L.threads; ++t) {
      const Fiber& g = L.fibers[t];
      if (g.state == State::Exited) {
        s << "; thread " << thread_name(L, t) << " exited (" << exited << " threads exited)";
        break;
      }
      if (g.state == State::Collective) {
        s << "; thread " << thread_name(L, t) << " waits in " << collective_name(g.kind) << " at "
          << site(g.file, g.line);
        break;
      }
      if (g.state == State::ClusterBarrier) {
        s << "; thread " << thread_name(L, t) << " waits in cluster.sync() at " << site(g.file, g.line);
        break;
      }
    }
    return s.str();
  }
  const Fiber& f = L.fibers[other];
  const int warp = other / 32;
  const unsigned missing = f.mask & ~L.warp_arrived[warp];
  s << collective_name(f.kind) << " at " << site(f.file, f.line) << " with mask " << hex(f.mask)
    << " never completes in " << where(L, other) << ": lanes of the mask that do not arrive: "
    << describe_waits(L, missing, warp);
  return s.str();
}

Cta& cta(Launch& L, int r) { return r == L.rank ? static_cast<Cta&>(L) : L.parked[r]; }

// After a copy over the thread_local block: the compiler cannot see that the copy rewrote these two
// (their addresses never escape), so plain stores of their old values would be dropped as redundant.
void restore_runtime_thread_locals(Launch* launch, Fiber* fiber) {
  asm volatile("" ::: "memory");
  *const_cast<Launch* volatile*>(&t_launch) = launch;
  *const_cast<Fiber* volatile*>(&t_fiber) = fiber;
}

// Makes block rank r the running block: its state into the Launch, its shared memory into the
// thread_local block (the previous block's parked). The runtime's own thread_locals (t_launch,
// t_fiber) live in the same block: kept across the copy.
void switch_block(Launch& L, int r) {
  if (r == L.rank) return;
  std::swap(static_cast<Cta&>(L), L.parked[L.rank]);
  std::swap(static_cast<Cta&>(L), L.parked[r]);
  Launch* launch = t_launch;
  Fiber* fiber = t_fiber;
  unsigned char* tls = reinterpret_cast<unsigned char*>(L.tls_lo);
  const size_t bytes = L.tls_hi - L.tls_lo;
  std::memcpy(g_ranks[L.rank].parked, tls, bytes);
  std::memcpy(tls, g_ranks[r].parked, bytes);
  restore_runtime_thread_locals(launch, fiber);
  L.rank = r;
}

std::string cluster_deadlock(Launch& L) {
  // A __syncthreads some threads of a block never reach, or a collective: the block's own report.
  for (State wanted : {State::Barrier, State::Collective}) {
    for (int r = 0; r < L.ranks; ++r) {
      for (const Fiber& f : cta(L, r).fibers) {
        if (f.state == wanted) {
          switch_block(L, r);
          return deadlock(L);
        }
      }
    }
  }
  // Otherwise threads wait in cluster.sync() that others never reach (they exited).
  std::ostringstream s;
  const Fiber* waiting = nullptr;
  int exited = 0, exited_rank = -1, exited_tid = -1;
  for (int r = 0; r < L.ranks; ++r) {
    const std::vector<Fiber>& fibers = cta(L, r).fibers;
    for (int t = 0; t < L.threads; ++t) {
      if (fibers[t].state == State::ClusterBarrier && waiting == nullptr) waiting = &fibers[t];
      if (fibers[t].state == State::Exited && exited++ == 0) {
        exited_rank = r;
        exited_tid = t;
      }
    }
  }
  s << "cluster.sync() at " << (waiting ? site(waiting->file, waiting->line) : "?") << " in kernel " << L.config.kernel
    << " (launched at " << site(L.config.file, L.config.line) << ") is not reached by every thread of the cluster: "
    << L.cluster_arrived << " of " << L.ranks * L.threads << " threads wait there";
  if (exited_rank >= 0) {
    s << "; thread " << thread_name(L, exited_tid) << " of cluster rank " << exited_rank << " exited (" << exited
      << " threads exited)";
  }
  return s.str();
}

// Runs the blocks of one cluster (one block without clusters) to completion: each block's fibers run
// until all of them wait (in a barrier, a collective, cluster.sync()) or exited, then the next block.
void run_cluster(Launch& L, uint3 first_block) {
  const int n = L.threads;
  const dim3 cd = L.config.cluster;
  L.cluster_mark = ++g_epoch;
  L.cluster_arrived = 0;
  for (int r = 0; r < L.ranks; ++r) {
    Cta& C = cta(L, r);
    C.block_index = uint3{first_block.x + r % cd.x, first_block.y + (r / cd.x) % cd.y, first_block.z + r / (cd.x * cd.y)};
    C.block_serial = ++g_block_serial;
    C.block_epoch = ++g_epoch;
    C.barrier_arrived = 0;
    C.live = n;
    std::fill(C.warp_arrived.begin(), C.warp_arrived.end(), 0u);
    for (int t = 0; t < n; ++t) {
      Fiber& f = C.fibers[t];
      char* stack = g_stacks[static_cast<size_t>(r) * n + t];
      f.state = State::Runnable;
      f.checking = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stack + kGuardBytes;
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = nullptr;
      f.stack_lo = reinterpret_cast<uintptr_t>(stack + kGuardBytes);
      f.stack_hi = f.stack_lo + kStackBytes;
      makecontext(&f.ctx, &fiber_entry, 0);
    }
  }
  for (;;) {
    bool ran = false, live = false;
    for (int r = 0; r < L.ranks; ++r) {
      Cta& C = cta(L, r);
      if (C.live == 0) continue;
      live = true;
      if (std::none_of(C.fibers.begin(), C.fibers.end(), [](const Fiber& f) { return f.state == State::Runnable; })) {
        continue;
      }
      switch_block(L, r);
      for (bool again = true; again;) {
        again = false;
        for (int t = 0; t < n; ++t) {
          Fiber& f = L.fibers[t];
          if (f.state != State::Runnable) continue;
          L.current = t;
          t_fiber = &f;
          swapcontext(&L.scheduler, &f.ctx);
          t_fiber = nullptr;
          ran = again = true;
          if (L.failed) return;
          if (f.state == State::Exited) --L.live;
        }
      }
    }
    if (!live) return;
    if (!ran) {
      L.failed = true;
      L.error = "apkernels CUDA emulation: " + cluster_deadlock(L);
      return;
    }
  }
}

// ---- collectives --------------------------------------------------------------------------------

void complete(Launch& L, int warp, unsigned mask) {
  const int base = warp * 32;
  Fiber* lanes = &L.fibers[base];
  const Fiber& first = lanes[__builtin_ctz(mask)];
  const Collective kind = first.kind;
  if (kind == Collective::SyncWarp) ++L.warp_epoch[warp];
  unsigned ballot = 0, matching[32] = {};
  if (kind == Collective::Ballot || kind == Collective::Any || kind == Collective::All) {
    for (int l = 0; l < 32; ++l) {
      int p = 0;
      if ((mask >> l) & 1u) std::memcpy(&p, lanes[l].value, sizeof(int));
      if (((mask >> l) & 1u) && p) ballot |= 1u << l;
    }
  }
  if (kind == Collective::MatchAny) {
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      for (int o = 0; o < 32; ++o) {
        if (((mask >> o) & 1u) && std::memcmp(lanes[l].value, lanes[o].value, lanes[l].bytes) == 0) {
          matching[l] |= 1u << o;
        }
      }
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    Fiber& f = lanes[l];
    f.state = State::Runnable;
    switch (kind) {
      case Collective::SyncWarp: break;
      case Collective::Ballot: std::memcpy(f.result, &ballot, 4); break;
      case Collective::Any: {
        const unsigned r = ballot != 0;
        std::memcpy(f.result, &r, 4);
        break;
      }
      case Collective::All: {
        const unsigned r = ballot == mask;
        std::memcpy(f.result, &r, 4);
        break;
      }
      case Collective::MatchAny: std::memcpy(f.result, &matching[l], 4); break;
      default: {
        const int width = f.width, seg = l & ~(width - 1), pos = l - seg;
        int src = l;
        if (kind == Collective::Shfl) {
          src = seg + (f.arg % width + width) % width;
        } else if (kind == Collective::ShflUp) {
          src = pos - f.arg >= 0 ? l - f.arg : l;
        } else if (kind == Collective::ShflDown) {
          src = pos + f.arg < width ? l + f.arg : l;
        } else {
          const int x = l ^ f.arg;
          src = (x >= seg && x < seg + width) ? x : l;
        }
        if (f.wrong_source_lane) src = seg + (src - seg + 1) % width;
        if (!((mask >> src) & 1u)) {
          Launch* Lp = &L;
          (void)Lp;
          fail(std::string(collective_name(kind)) + " at " + site(f.file, f.line) + " in " + where(L, base + l) +
               " reads lane " + std::to_string(src) + ", which is not in the mask " + hex(mask));
        }
        std::memcpy(f.result, lanes[src].value, f.bytes);
      }
    }
  }
  L.warp_arrived[warp] = 0;
  L.warp_mask[warp] = 0;
}

}  // namespace

// ---- API used by the emulated kernels (cuda_emulation.h) --------------------------------------

uint3 thread_index() {
  const Launch& L = *t_launch;
  const dim3 b = L.config.block;
  const unsigned t = static_cast<unsigned>(L.current);
  return uint3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
}
uint3 block_index() { return t_launch->block_index; }
dim3 block_dim() { return t_launch->config.block; }
dim3 grid_dim() { return t_launch->config.grid; }

void begin_kernel() { t_fiber->checking = true; }

void syncthreads(const char* file, int line) {
  Unchecked unchecked;
  Launch& L = *t_launch;
  Fiber& f = *t_fiber;
  if (mutation_at("skip_syncthreads", file, line)) return;
  if (mutation_at("divergent_syncthreads", file, line) && (L.current / 32) % 2 == 1) return;
  f.state = State::Barrier;
  f.file = file;
  f.line = line;
  if (++L.barrier_arrived == L.threads) {
    L.barrier_arrived = 0;
    L.block_epoch = ++g_epoch;
    for (Fiber& g : L.fibers) {
      if (g.state == State::Barrier) g.state = State::Runnable;
    }
    return;
  }
  yield();
}

void cluster_sync(const char* file, int line) {
  Unchecked unchecked;
  Launch& L = *t_launch;
  Fiber& f = *t_fiber;
  if (mutation_at("skip_cluster_sync", file, line)) return;
  f.state = State::ClusterBarrier;
  f.file = file;
  f.line = line;
  if (++L.cluster_arrived == L.ranks * L.threads) {
    // Everything before is ordered before everything after, in every block of the cluster.
    L.cluster_arrived = 0;
    L.cluster_mark = ++g_epoch;
    for (int r = 0; r < L.ranks; ++r) {
      Cta& C = cta(L, r);
      C.block_epoch = ++g_epoch;
      for (Fiber& g : C.fibers) {
        if (g.state == State::ClusterBarrier) g.state = State::Runnable;
      }
    }
    return;
  }
  yield();
}

unsigned cluster_block_rank() { return static_cast<unsigned>(t_launch->rank); }
dim3 cluster_dim() { return t_launch->config.cluster; }

void* map_shared_rank(const void* address, unsigned rank, const char* file, int line) {
  Unchecked unchecked;
  Launch& L = *t_launch;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (a < L.tls_lo || a >= L.tls_hi) {
    fail("map_shared_rank at " + site(file, line) + " in " + where(L, L.current) + ": address " + hex(a) +
         " is not in this block's shared memory");
  }
  if (rank >= static_cast<unsigned>(L.ranks)) {
    fail("map_shared_rank at " + site(file, line) + " in " + where(L, L.current) + ": rank " + std::to_string(rank) +
         " is not below the cluster's " + std::to_string(L.ranks) + " blocks");
  }
  if (static_cast<int>(rank) == L.rank) return const_cast<void*>(address);
  return g_ranks[rank].parked + (a - L.tls_lo);
}

void collective(Collective kind, unsigned mask, const void* value, int bytes, int arg, int width, void* result,
                const char* file, int line) {
  Unchecked unchecked;
  Launch& L = *t_launch;
  Fiber& f = *t_fiber;
  const int tid = L.current, warp = tid / 32, lane = tid % 32;
  if (mutation_at("drop_mask_lane", file, line)) mask &= 0x7FFFFFFFu;
  // An off-by-one source lane (the lane after the one the shuffle names, within its width): within
  // a full mask nothing here can tell, the kernel's result is wrong; outside a partial mask it
  // "reads lane ..., which is not in the mask". (Not arg + 1: a xor butterfly over 17, 9, 5, 3, 2
  // still reaches every lane and sums correctly.)
  f.wrong_source_lane = mutation_at("wrong_source_lane", file, line);
  const char* name = collective_name(kind);
  if (!((mask >> lane) & 1u)) {
    fail(std::string(name) + " at " + site(file, line) + " in " + where(L, tid) + ": the mask " + hex(mask) +
         " does not include the calling lane " + std::to_string(lane));
  }
  const int lanes_in_warp = std::min(32, L.threads - warp * 32);
  if (lanes_in_warp < 32 && (mask >> lanes_in_warp) != 0) {
    fail(std::string(name) + " at " + site(file, line) + " in " + where(L, tid) + ": the mask " + hex(mask) +
         " names lanes beyond the block's last thread");
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail(std::string(name) + " at " + site(file, line) + " in " + where(L, tid) + ": width " + std::to_string(width) +
         " is not a power of two <= 32");
  }
  if (L.warp_arrived[warp] != 0) {
    const unsigned pending = L.warp_mask[warp];
    // The lanes already waiting: the first of them describes the pending collective.
    const Fiber& w = L.fibers[warp * 32 + __builtin_ctz(L.warp_arrived[warp])];
    if (pending != mask || w.kind != kind || w.line != line || std::strcmp(w.file, file) != 0) {
      fail(std::string(name) + " at " + site(file, line) + " with mask " + hex(mask) + " in " + where(L, tid) +
           " meets lanes of its warp waiting in " + collective_name(w.kind) + " at " + site(w.file, w.line) +
           " with mask " + hex(pending) + " (every lane of a mask must call the same collective with the same mask)");
    }
  }
  f.kind = kind;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.bytes = bytes;
  if (bytes > 0) std::memcpy(f.value, value, bytes);
  f.result = result;
  f.file = file;
  f.line = line;
  L.warp_mask[warp] = mask;
  L.warp_arrived[warp] |= 1u << lane;
  f.state = State::Collective;
  if (L.warp_arrived[warp] == mask) {
    complete(L, warp, mask);
    return;
  }
  yield();
}

void note_atomic(const void* addr, int bytes) { check_access(addr, bytes, Access::Atomic, __builtin_return_address(0)); }

void kernel_assert_failed(const char* condition, const char* file, int line) {
  Unchecked unchecked;
  fail(std::string("device-side assert `") + condition + "` failed at " + site(file, line) + " in " +
       where(*t_launch, t_launch->current));
}

size_t shared_memory_limit() { return g_shared_limit; }
int compute_capability() { return g_compute_capability; }
int multiprocessor_count() { return g_multiprocessors; }

int register_dynamic_shared(const void* address, size_t bytes) {
  const auto [lo, hi] = tls_block();
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (lo != 0 && a >= lo && a < hi) dynamic_shared().push_back({a - lo, bytes});
  return 0;
}

void launch(const LaunchConfig& config, void (*body)(void*), void* closure, const void* const* pointers,
            size_t n_pointers) {
  std::unique_lock<std::mutex> guard(g_launch_mutex);
  const dim3 g = config.grid, b = config.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  TORCH_CHECK(g.x >= 1 && g.y >= 1 && g.z >= 1 && g.y <= 65535 && g.z <= 65535,
              "apkernels CUDA emulation: invalid grid (", g.x, ",", g.y, ",", g.z, ") for kernel ", config.kernel);
  TORCH_CHECK(threads >= 1 && threads <= 1024 && b.z <= 64, "apkernels CUDA emulation: invalid block (", b.x, ",", b.y,
              ",", b.z, ") for kernel ", config.kernel);
  TORCH_CHECK(config.shared_bytes <= g_shared_limit, "apkernels CUDA emulation: kernel ", config.kernel, " asks for ",
              config.shared_bytes, " bytes of dynamic shared memory, the emulated device allows ", g_shared_limit);
  const dim3 cd = config.cluster;
  const uint64_t ranks = uint64_t(cd.x) * cd.y * cd.z;
  TORCH_CHECK(ranks >= 1 && ranks <= kMaxClusterBlocks, "apkernels CUDA emulation: cluster (", cd.x, ",", cd.y, ",",
              cd.z, ") of kernel ", config.kernel, " has ", ranks, " blocks; the portable limit is ", kMaxClusterBlocks);
  TORCH_CHECK(ranks == 1 || g_compute_capability >= 90, "apkernels CUDA emulation: kernel ", config.kernel,
              " launched with a cluster on an emulated device of compute capability ", g_compute_capability / 10, ".",
              g_compute_capability % 10, " (clusters need 9.0)");
  TORCH_CHECK(g.x % cd.x == 0 && g.y % cd.y == 0 && g.z % cd.z == 0, "apkernels CUDA emulation: grid (", g.x, ",",
              g.y, ",", g.z, ") of kernel ", config.kernel, " is not a multiple of its cluster (", cd.x, ",", cd.y, ",",
              cd.z, ")");

  auto L = std::make_unique<Launch>();
  L->config = config;
  // The Launcher's closure starts with the kernel's address (cuda_emulation.h, Launcher::Closure).
  L->name = kernel_name(*static_cast<void* const*>(closure), config.kernel);
  L->config.kernel = L->name.c_str();
  L->body = body;
  L->closure = closure;
  L->threads = static_cast<int>(threads);
  L->ranks = static_cast<int>(ranks);
  const int warps = (L->threads + 31) / 32;
  L->parked.resize(L->ranks);
  for (int r = 0; r < L->ranks; ++r) {
    Cta& C = r == 0 ? static_cast<Cta&>(*L) : L->parked[r];
    C.warp_epoch.assign(warps, 1);
    C.warp_arrived.assign(warps, 0u);
    C.warp_mask.assign(warps, 0u);
    C.fibers.resize(L->threads);
  }
  {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    for (size_t i = 0; i < n_pointers; ++i) {
      const uintptr_t p = reinterpret_cast<uintptr_t>(pointers[i]);
      if (p == 0) continue;
      auto it = tracked().upper_bound(p);
      if (it == tracked().begin()) continue;
      --it;
      if (p >= it->first + it->second.size) continue;  // not a tensor: any access through it is an error
      bool seen = false;
      for (const Region& r : L->regions) seen = seen || r.base == it->first;
      if (!seen) {
        const size_t words = (it->second.size + 63) / 64;
        L->regions.push_back(Region{it->first, it->second.size, std::vector<uint64_t>(words), std::vector<uint64_t>(words)});
      }
    }
  }
  const auto [lo, hi] = tls_block();
  L->tls_lo = lo;
  L->tls_hi = hi;
  while (g_ranks.size() < ranks) {
    RankMemory m;
    m.shadow = static_cast<Cell*>(lazy_zeroed((hi - lo) * sizeof(Cell)));
    m.parked = static_cast<unsigned char*>(lazy_zeroed(hi - lo));
    g_ranks.push_back(m);
  }
  for (const DynamicShared& d : dynamic_shared()) L->dynamic.emplace_back(lo + d.offset, lo + d.offset + d.bytes);
  // A cluster launch moves shared memory in and out of the thread_local block: keep the rest of that
  // block (host-side thread_locals of the module) as it was, and restore it afterwards.
  std::vector<unsigned char> host_tls;
  if (ranks > 1) {
    host_tls.assign(reinterpret_cast<unsigned char*>(lo), reinterpret_cast<unsigned char*>(hi));
    for (uint64_t r = 0; r < ranks; ++r) std::memcpy(g_ranks[r].parked, host_tls.data(), hi - lo);
  }
  while (g_stacks.size() < static_cast<size_t>(L->threads) * ranks) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "apkernels CUDA emulation: cannot map a fiber stack");
    mprotect(m, kGuardBytes, PROT_NONE);
    g_stacks.push_back(static_cast<char*>(m));
  }

  Launch* previous = t_launch;
  t_launch = L.get();
  for (unsigned z = 0; z < g.z && !L->failed; z += cd.z) {
    for (unsigned y = 0; y < g.y && !L->failed; y += cd.y) {
      for (unsigned x = 0; x < g.x && !L->failed; x += cd.x) run_cluster(*L, uint3{x, y, z});
    }
  }
  if (ranks > 1) std::memcpy(reinterpret_cast<void*>(lo), host_tls.data(), hi - lo);
  restore_runtime_thread_locals(previous, nullptr);
  t_launch = previous;
  t_fiber = nullptr;

  LaunchRecord rec;
  rec.kernel = L->name;
  rec.site = site(config.file, config.line);
  rec.grid = g;
  rec.block = b;
  rec.cluster = cd;
  rec.shared_bytes = config.shared_bytes;
  rec.read = L->read;
  rec.written = L->written;
  for (const Region& r : L->regions) {
    for (uint64_t w : r.read_bits) rec.read_distinct += __builtin_popcountll(w);
    for (uint64_t w : r.write_bits) rec.written_distinct += __builtin_popcountll(w);
  }
  {
    std::lock_guard<std::mutex> lock(g_records_mutex);
    if (g_records.size() < 1000000) g_records.push_back(std::move(rec));
  }
  if (L->failed) {
    const std::string error = L->error;
    guard.unlock();
    TORCH_CHECK(false, error);
  }
}

}  // namespace apk_emu

// ---- the __tsan_* entry points of the instrumented wrapper TUs ---------------------------------
// Memory accesses are checked while a fiber runs a kernel body; every other call returns at once.
// The atomics (from inline ATen code in the wrapper TUs, on any thread) really are atomic.
extern "C" {
#define APK_TSAN_ACCESS(n)                                                                                    \
  void __tsan_read##n(void* a) { apk_emu::check_access(a, n, apk_emu::Access::Read, __builtin_return_address(0)); }   \
  void __tsan_write##n(void* a) { apk_emu::check_access(a, n, apk_emu::Access::Write, __builtin_return_address(0)); } \
  void __tsan_unaligned_read##n(void* a) {                                                                    \
    apk_emu::check_access(a, n, apk_emu::Access::Read, __builtin_return_address(0));                          \
  }                                                                                                           \
  void __tsan_unaligned_write##n(void* a) {                                                                   \
    apk_emu::check_access(a, n, apk_emu::Access::Write, __builtin_return_address(0));                         \
  }                                                                                                           \
  void __tsan_volatile_read##n(void* a) {                                                                     \
    apk_emu::check_access(a, n, apk_emu::Access::Read, __builtin_return_address(0));                          \
  }                                                                                                           \
  void __tsan_volatile_write##n(void* a) {                                                                    \
    apk_emu::check_access(a, n, apk_emu::Access::Write, __builtin_return_address(0));                         \
  }
APK_TSAN_ACCESS(1)
APK_TSAN_ACCESS(2)
APK_TSAN_ACCESS(4)
APK_TSAN_ACCESS(8)
APK_TSAN_ACCESS(16)
#undef APK_TSAN_ACCESS

void __tsan_read_range(void* a, unsigned long n) {
  if (n) apk_emu::check_access(a, n, apk_emu::Access::Read, __builtin_return_address(0));
}
void __tsan_write_range(void* a, unsigned long n) {
  if (n) apk_emu::check_access(a, n, apk_emu::Access::Write, __builtin_return_address(0));
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_ignore_thread_begin() {}
void __tsan_ignore_thread_end() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

#define APK_TSAN_ATOMIC(n, T)                                                                                      \
  T __tsan_atomic##n##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }             \
  void __tsan_atomic##n##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }             \
  T __tsan_atomic##n##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##n##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##n##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##n##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##n##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }     \
  T __tsan_atomic##n##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##n##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                            \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
  }                                                                                                                \
  int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                              \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                         \
  }                                                                                                                \
  T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                                  \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                              \
    return c;                                                                                                      \
  }
APK_TSAN_ATOMIC(8, unsigned char)
APK_TSAN_ATOMIC(16, unsigned short)
APK_TSAN_ATOMIC(32, unsigned int)
APK_TSAN_ATOMIC(64, unsigned long long)
#undef APK_TSAN_ATOMIC
}

// ---- the Python module --------------------------------------------------------------------------
namespace py = pybind11;

PYBIND11_MODULE(_C_emulated, m) {
  m.doc() = "apkernels' CUDA kernels compiled for the CPU emulator (ops apkernels::<op>_cuda_emulated)";
  apk_emu::install_tracking_allocator();
  m.def("counters", [] {
    std::lock_guard<std::mutex> lock(apk_emu::g_records_mutex);
    py::list out;
    for (const auto& r : apk_emu::g_records) {
      py::dict d;
      d["kernel"] = r.kernel;
      d["site"] = r.site;
      d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
      d["block"] = py::make_tuple(r.block.x, r.block.y, r.block.z);
      d["cluster"] = py::make_tuple(r.cluster.x, r.cluster.y, r.cluster.z);
      d["dynamic_shared_bytes"] = r.shared_bytes;
      d["global_read_bytes"] = r.read;
      d["global_write_bytes"] = r.written;
      d["global_read_distinct_bytes"] = r.read_distinct;
      d["global_write_distinct_bytes"] = r.written_distinct;
      out.append(d);
    }
    return out;
  }, "One dict per launch since the last reset_counters(): kernel, launch site, grid, block, cluster, "
     "dynamic shared bytes, global bytes read/written (total and distinct).");
  m.def("reset_counters", [] {
    std::lock_guard<std::mutex> lock(apk_emu::g_records_mutex);
    apk_emu::g_records.clear();
  });
  m.def("shared_memory_limit", [] { return apk_emu::g_shared_limit; },
        "Dynamic shared memory per block of the emulated device (bytes).");
  m.def("set_shared_memory_limit", [](size_t bytes) {
    TORCH_CHECK_VALUE(bytes <= apk_emu::kMaxDynamicSharedBytes, "set_shared_memory_limit: at most ",
                      apk_emu::kMaxDynamicSharedBytes, " bytes, got ", bytes);
    apk_emu::g_shared_limit = bytes;
  });
  m.def("multiprocessor_count", [] { return apk_emu::g_multiprocessors; });
  m.def("set_multiprocessor_count", [](int sms) {
    TORCH_CHECK_VALUE(sms >= 1 && sms <= 1024, "set_multiprocessor_count: 1 to 1024, got ", sms);
    apk_emu::g_multiprocessors = sms;
  }, "SMs of the emulated device (4 unless set): grid sizes that follow the SM count (grid-stride loops, "
     "persistent grids) then match a real device's, e.g. 132 for an H100.");
  m.def("compute_capability", [] { return py::make_tuple(apk_emu::g_compute_capability / 10, apk_emu::g_compute_capability % 10); },
        "(major, minor) of the emulated device: (9, 0) unless set_compute_capability changed it.");
  m.def("set_compute_capability", [](int major, int minor) {
    TORCH_CHECK_VALUE(major >= 7 && major <= 12 && minor >= 0 && minor <= 9, "set_compute_capability: got ", major, ".",
                      minor);
    apk_emu::g_compute_capability = major * 10 + minor;
  }, "Present the emulated device as another compute capability (e.g. 8, 0: no clusters; host code "
     "then takes its pre-sm_90 paths).");
  m.def("set_mutation", [](const std::string& kind, const std::string& file, int line) {
    TORCH_CHECK_VALUE(kind.empty() || kind == "skip_syncthreads" || kind == "divergent_syncthreads" ||
                          kind == "drop_mask_lane" || kind == "wrong_source_lane" || kind == "skip_cluster_sync",
                      "set_mutation: kind must be skip_syncthreads, divergent_syncthreads, drop_mask_lane, "
                      "wrong_source_lane or skip_cluster_sync, got '",
                      kind, "'");
    std::lock_guard<std::mutex> lock(apk_emu::g_launch_mutex);
    apk_emu::g_mutation = apk_emu::Mutation{kind, file, line, 0};
  }, "Runtime mutation at one call site (file suffix, line): skip a __syncthreads, skip it in odd warps, "
     "drop lane 31 from a warp collective's mask, shuffle from the lane after the source lane, or skip a "
     "cluster.sync(). kind='' clears it.");
  m.def("mutation_hits", [] { return apk_emu::g_mutation.hits; });
}
