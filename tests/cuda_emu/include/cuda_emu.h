// cuda_emu.h: runs CUDA kernels on the CPU, for tests only.
//
// The kernel sources in cuda/kernels/*.cu are compiled by g++ (C++20) with this folder
// first on the include path, so that <cuda_runtime.h> and <cooperative_groups.h> resolve
// here. The model of execution:
//   * a launch runs its blocks one after another (in grid order, or reversed / shuffled
//     when CUDA_EMU_BLOCK_ORDER=reverse|shuffle<seed>, to expose kernels whose result
//     depends on block order), so `__shared__` memory can be a function-local static;
//   * every CUDA thread of a block is an OS thread, so ThreadSanitizer sees races on
//     shared and global memory, and AddressSanitizer sees out-of-bounds accesses;
//   * __syncthreads and its _count/_or forms are barriers over the block's live threads,
//     warp collectives (shuffles, ballot, cooperative_groups' reduce) barriers over the
//     warp's; a thread that returns leaves both;
//   * mistakes a GPU would forgive silently, or hang on, abort with their source line:
//     threads of one block waiting at different __syncthreads, lanes at different warp
//     operations, a warp operation whose mask names a lane that has exited, a shuffle
//     reading such a lane, a block of more than 1024 threads.
// Atomics are relaxed std::atomic_ref operations, as CUDA's device-scope atomics.
// Not modelled: memory ordering between blocks, fast-math intrinsics (they are exact
// here), occupancy and timing, partial-mask warp operations.
#pragma once

#define CUDA_EMU 1  // sources that differ (cuda/kernels/bindings.cpp) test this

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 { float x, y; };
struct float3 { float x, y, z; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// CUDA's integer min/max and fast-math intrinsics (exact here).
template <class A, class B> std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B> std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }
// Device memory is host memory here, and every call is synchronous.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

namespace cuda_emu {

using where = std::source_location;

[[noreturn]] inline void fail(const std::string& message) {
  std::fprintf(stderr, "cuda_emu: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

inline std::string at(const where& w) {
  return std::string(w.file_name()) + ":" + std::to_string(w.line()) + ":" + std::to_string(w.column());
}

// A barrier over a changing set of members: a member that leaves (its thread returned)
// no longer holds the others back. Plain mutex + condition variable, which ThreadSanitizer
// understands: everything written before a barrier is seen by every member after it.
class Barrier {
 public:
  explicit Barrier(int members) : members_(members) {}
  // Waits for every member; returns the round's number.
  unsigned long arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long round = round_;
    if (++arrived_ == members_) release();
    else released_.wait(lock, [&] { return round_ != round; });
    return round;
  }
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    --members_;
    if (members_ > 0 && arrived_ == members_) release();
  }

 private:
  void release() { arrived_ = 0; ++round_; released_.notify_all(); }
  std::mutex mutex_;
  std::condition_variable released_;
  int members_, arrived_ = 0;
  unsigned long round_ = 0;
};

constexpr int kSlotBytes = 64;  // the largest value a warp collective exchanges

// What the members of a group (a block, or a warp) deposit at one collective: where they
// are in the source, a value; and how many collectives each joined before it returned
// (kRunning while it runs), so that a collective knows who took part. Two sets of slots,
// used by alternate collectives: a member that races ahead to the next collective writes
// the other set, and cannot come back to this one before everyone has read it (they must
// all reach the next barrier first), so one barrier per collective suffices.
constexpr unsigned kRunning = ~0u;

struct Group {
  explicit Group(int n) : barrier(n), size(n), joined(n) {
    for (auto& j : joined) j.store(kRunning);
    for (int k = 0; k < 2; ++k) site[k].resize(n), value[k].resize(n);
  }
  // Whether member m took part in collective number `round`.
  bool took_part(int m, unsigned round) const { return m < size && joined[m].load() > round; }
  void leave(int m, unsigned rounds) {
    joined[m].store(rounds);
    barrier.leave();
  }
  Barrier barrier;
  int size;
  std::vector<std::string> site[2];
  std::vector<std::array<unsigned char, kSlotBytes>> value[2];
  std::vector<std::atomic<unsigned>> joined;
};

struct BlockState {
  BlockState(dim3 id, int n) : id(id), block(n) {
    for (int w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(std::make_unique<Group>(std::min(32, n - 32 * w)));
  }
  dim3 id;
  Group block;
  std::vector<std::unique_ptr<Group>> warps;
};

inline thread_local BlockState* tl_block = nullptr;
inline thread_local int tl_rank = 0;  // linear thread index in the block
inline thread_local unsigned tl_block_round = 0, tl_warp_round = 0;  // collectives this thread has joined
inline thread_local dim3 tl_thread_idx, tl_block_idx;
inline dim3 g_grid_dim, g_block_dim;

// One collective of `group` (member `me`; `rounds` counts those it joined): deposit the
// site and value, wait for the others, check they are at the same site, then read with
// `read(group, slots, round)`.
template <class V, class Read>
auto collective(Group& group, int me, unsigned& rounds, const V& v, const where& w, Read&& read) {
  static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= kSlotBytes, "unsupported collective value");
  const unsigned round = rounds++;
  const int slots = int(round & 1u);
  group.site[slots][me] = at(w);
  std::memcpy(group.value[slots][me].data(), &v, sizeof(V));
  group.barrier.arrive_and_wait();
  for (int o = 0; o < group.size; ++o)
    if (group.took_part(o, round) && group.site[slots][o] != group.site[slots][me])
      fail("divergent collective: thread " + std::to_string(me) + " of its group is at " + group.site[slots][me] +
           ", thread " + std::to_string(o) + " at " + group.site[slots][o]);
  return read(group, slots, round);
}

template <class V> V value_of(const Group& g, int slots, int member) {
  V v;
  std::memcpy(&v, g.value[slots][member].data(), sizeof(V));
  return v;
}

inline Group& my_warp() { return *tl_block->warps[tl_rank / 32]; }
inline int my_lane() { return tl_rank % 32; }

inline void check_mask(const Group& warp, unsigned mask, unsigned round, const where& w) {
  for (int lane = 0; lane < 32; ++lane) {
    const bool named = (mask >> lane) & 1u;
    const bool live = warp.took_part(lane, round);
    if (named && !live)
      fail(at(w) + ": warp operation's mask names lane " + std::to_string(lane) + ", which has exited or does not exist");
    if (!named && live)
      fail(at(w) + ": lane " + std::to_string(lane) + " is running but not in the mask (partial masks are not modelled)");
  }
}

template <class V, class Source>
V shuffle(unsigned mask, V v, const where& w, Source source_lane) {
  Group& warp = my_warp();
  return collective(warp, my_lane(), tl_warp_round, v, w, [&](Group& g, int slots, unsigned round) {
    check_mask(g, mask, round, w);
    const int src = source_lane(my_lane());
    if (src < 0 || !g.took_part(src, round))
      fail(at(w) + ": shuffle reads lane " + std::to_string(src) + ", which is not running");
    return value_of<V>(g, slots, src);
  });
}

inline std::vector<dim3> block_order(dim3 grid) {
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  if (const char* how = std::getenv("CUDA_EMU_BLOCK_ORDER")) {
    if (!std::strcmp(how, "reverse")) std::reverse(order.begin(), order.end());
    else if (!std::strncmp(how, "shuffle", 7)) std::shuffle(order.begin(), order.end(), std::mt19937(std::atoi(how + 7)));
  }
  return order;
}

// kernel<<<grid, block, 0, stream>>>(args...)
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args&&... args) {
  const int n = int(block.x * block.y * block.z);
  if (n < 1 || n > 1024) fail("a block of " + std::to_string(n) + " threads (CUDA allows 1 to 1024)");
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  g_grid_dim = grid;
  g_block_dim = block;
  for (const dim3& id : block_order(grid)) {
    BlockState state(id, n);
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (int t = 0; t < n; ++t)
      threads.emplace_back([&, t] {
        tl_block = &state;
        tl_rank = t;
        tl_block_round = tl_warp_round = 0;
        tl_block_idx = id;
        tl_thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        std::apply(kernel, params);
        my_warp().leave(my_lane(), tl_warp_round);
        state.block.leave(t, tl_block_round);
      });
    for (auto& th : threads) th.join();
  }
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::tl_thread_idx)
#define blockIdx (::cuda_emu::tl_block_idx)
#define blockDim (::cuda_emu::g_block_dim)
#define gridDim (::cuda_emu::g_grid_dim)
#define warpSize 32

inline int __syncthreads_count(int predicate, cuda_emu::where w = cuda_emu::where::current()) {
  auto& b = cuda_emu::tl_block->block;
  return cuda_emu::collective(b, cuda_emu::tl_rank, cuda_emu::tl_block_round, int(predicate != 0), w,
                              [](cuda_emu::Group& g, int slots, unsigned round) {
                                int count = 0;
                                for (int t = 0; t < g.size; ++t)
                                  if (g.took_part(t, round)) count += cuda_emu::value_of<int>(g, slots, t);
                                return count;
                              });
}
inline void __syncthreads(cuda_emu::where w = cuda_emu::where::current()) { __syncthreads_count(0, w); }
inline int __syncthreads_or(int p, cuda_emu::where w = cuda_emu::where::current()) { return __syncthreads_count(p, w) > 0; }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, cuda_emu::where w = cuda_emu::where::current()) {
  return cuda_emu::shuffle(mask, v, w, [=](int lane) { return lane / width * width + src % width; });
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, cuda_emu::where w = cuda_emu::where::current()) {
  return cuda_emu::shuffle(mask, v, w, [=](int lane) { return lane % width + int(delta) < width ? lane + int(delta) : lane; });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int bits, int width = 32, cuda_emu::where w = cuda_emu::where::current()) {
  return cuda_emu::shuffle(mask, v, w, [=](int lane) { return (lane ^ bits) / width == lane / width ? lane ^ bits : lane; });
}
inline unsigned __ballot_sync(unsigned mask, int predicate, cuda_emu::where w = cuda_emu::where::current()) {
  auto& warp = cuda_emu::my_warp();
  return cuda_emu::collective(warp, cuda_emu::my_lane(), cuda_emu::tl_warp_round, int(predicate != 0), w,
                              [&](cuda_emu::Group& g, int slots, unsigned round) {
                                cuda_emu::check_mask(g, mask, round, w);
                                unsigned bits = 0;
                                for (int lane = 0; lane < g.size; ++lane)
                                  if (g.took_part(lane, round) && cuda_emu::value_of<int>(g, slots, lane))
                                    bits |= 1u << lane;
                                return bits;
                              });
}
inline int __any_sync(unsigned mask, int p, cuda_emu::where w = cuda_emu::where::current()) { return __ballot_sync(mask, p, w) != 0; }

template <class T> T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v, std::memory_order_relaxed);
}
template <class T> T atomicMax(T* address, T v) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (old < v && !ref.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
