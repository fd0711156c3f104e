// Per-Gaussian compositing inputs packed into one record, shared by the forward and
// backward compositing loops. A tile visits its Gaussians in depth order, i.e. in random
// memory order: from four separate arrays that costs four cache misses per (Gaussian,
// tile) pair and dominated the runtime; one record costs one, and is prefetched ahead.
#pragma once

#include <cstdint>
#include <vector>

namespace splat_cpu {

constexpr int64_t kPrefetchAhead = 8;  // records fetched ahead of the one being composited

// Record layout: mean x, mean y, conic a, b, c, opacity, then the D features.
inline int64_t packed_stride(int64_t D) { return 6 + D; }

template <typename T>
std::vector<T> pack_gaussians(int64_t M, int64_t D, const T* means2d, const T* conics, const T* opacities,
                              const T* features, int num_threads) {
  const int64_t R = packed_stride(D);
  std::vector<T> packed(M * R);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < M; ++i) {
    T* r = packed.data() + i * R;
    r[0] = means2d[2 * i];
    r[1] = means2d[2 * i + 1];
    r[2] = conics[3 * i];
    r[3] = conics[3 * i + 1];
    r[4] = conics[3 * i + 2];
    r[5] = opacities[i];
    for (int64_t d = 0; d < D; ++d) r[6 + d] = features[i * D + d];
  }
  return packed;
}

// Every cache line the record touches (a record may straddle a line boundary).
template <typename T> inline void prefetch_packed(const T* record, int64_t R) {
  const char* first = reinterpret_cast<const char*>(record);
  const char* last = first + R * static_cast<int64_t>(sizeof(T)) - 1;
  for (const char* b = first; b <= last; b += 64) __builtin_prefetch(b);
  __builtin_prefetch(last);
}

}  // namespace splat_cpu
