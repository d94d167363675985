// Emulated build: the subset of cooperative_groups' cluster API the kernels use (see
// ../cuda_emulation.h): this_cluster(), sync(), block_rank(), num_blocks(), dim_blocks(),
// block_index(), map_shared_rank(). Call sites are recorded through __builtin_FILE/LINE, so error
// messages and mutations name the kernel's line.
#pragma once
#include "emulation/cuda_emulation.h"

namespace cooperative_groups {

class cluster_group {
 public:
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    ::apk_emu::cluster_sync(file, line);
  }
  unsigned block_rank() const { return ::apk_emu::cluster_block_rank(); }
  unsigned num_blocks() const {
    const dim3 d = ::apk_emu::cluster_dim();
    return d.x * d.y * d.z;
  }
  dim3 dim_blocks() const { return ::apk_emu::cluster_dim(); }
  dim3 block_index() const {
    const dim3 d = ::apk_emu::cluster_dim();
    const unsigned r = block_rank();
    return dim3(r % d.x, (r / d.x) % d.y, r / (d.x * d.y));
  }
  template <typename T>
  T* map_shared_rank(T* address, unsigned rank, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) const {
    return static_cast<T*>(::apk_emu::map_shared_rank(address, rank, file, line));
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
