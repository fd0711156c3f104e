// cooperative_groups::reduce under cuda_emu (tests only): one warp collective; every lane
// gets the fold of all running lanes' values, in lane order.
#pragma once
#include "../cooperative_groups.h"

namespace cooperative_groups {

template <class T> struct plus { T operator()(T a, T b) const { return a + b; } };
template <class T> struct greater { T operator()(T a, T b) const { return a > b ? a : b; } };

template <unsigned Size, class T, class Op>
T reduce(const thread_block_tile<Size>&, T v, Op op, cuda_emu::where w = cuda_emu::where::current()) {
  auto& warp = cuda_emu::my_warp();
  return cuda_emu::collective(warp, cuda_emu::my_lane(), cuda_emu::tl_warp_round, v, w, [&](cuda_emu::Group& g, int slots, unsigned round) {
    bool first = true;
    T acc{};
    for (int lane = 0; lane < g.size; ++lane) {
      if (!g.took_part(lane, round)) continue;
      const T x = cuda_emu::value_of<T>(g, slots, lane);
      acc = first ? x : op(acc, x);
      first = false;
    }
    return acc;
  });
}

}  // namespace cooperative_groups
