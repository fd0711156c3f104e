// The cooperative_groups subset the kernels use, under cuda_emu (tests only): the block,
// and its tiles of 32 threads (warps). Every tile operation is a warp collective of
// cuda_emu.h, checked the same way.
#pragma once
#include "cuda_emu.h"

namespace cooperative_groups {

class thread_block {
 public:
  unsigned thread_rank() const { return unsigned(cuda_emu::tl_rank); }
  unsigned size() const { return blockDim.x * blockDim.y * blockDim.z; }
  dim3 group_index() const { return blockIdx; }
  dim3 thread_index() const { return threadIdx; }
  void sync(cuda_emu::where w = cuda_emu::where::current()) const { __syncthreads(w); }
};

inline thread_block this_thread_block() { return {}; }

template <unsigned Size>
class thread_block_tile {
  static_assert(Size == 32, "cuda_emu models tiles of a whole warp only");

 public:
  unsigned thread_rank() const { return unsigned(cuda_emu::my_lane()); }
  unsigned meta_group_rank() const { return unsigned(cuda_emu::tl_rank / 32); }
  unsigned size() const { return Size; }
  unsigned num_threads() const { return Size; }
  // Every lane of the warp still running: the mask CUDA uses for a tile's own operations.
  // A lane that returned did so after its last collective, so the lanes that can join this
  // one are those that have not returned before it.
  static unsigned running_mask() {
    const auto& warp = cuda_emu::my_warp();
    unsigned mask = 0;
    for (int lane = 0; lane < warp.size; ++lane)
      if (warp.took_part(lane, cuda_emu::tl_warp_round)) mask |= 1u << lane;
    return mask;
  }
  void sync(cuda_emu::where w = cuda_emu::where::current()) const { __ballot_sync(running_mask(), 0, w); }
  unsigned ballot(int p, cuda_emu::where w = cuda_emu::where::current()) const { return __ballot_sync(running_mask(), p, w); }
  bool any(int p, cuda_emu::where w = cuda_emu::where::current()) const { return ballot(p, w) != 0; }
  bool all(int p, cuda_emu::where w = cuda_emu::where::current()) const { return ballot(p, w) == running_mask(); }
  template <class T>
  T shfl(T v, int src, cuda_emu::where w = cuda_emu::where::current()) const { return __shfl_sync(running_mask(), v, src, 32, w); }
  template <class T>
  T shfl_down(T v, unsigned d, cuda_emu::where w = cuda_emu::where::current()) const {
    return __shfl_down_sync(running_mask(), v, d, 32, w);
  }
};

template <unsigned Size>
thread_block_tile<Size> tiled_partition(const thread_block&) { return {}; }

}  // namespace cooperative_groups
