// Multi-resolution hash encoding on the CPU (OpenMP); the math is hash_math.h's.
#include <algorithm>

#include "hash_math.h"
#include "ops.h"

namespace splat_cpu {

template <typename T>
bool hash_encode_forward(int64_t N, int D, int64_t L, int64_t S, int F, const T* x, const T* table,
                         const T* scales, const int32_t* res, T* out, int num_threads) {
  return hashgrid::with_shape(D, F, [&](auto dims, auto feats) {
    constexpr int kD = decltype(dims)::value, kF = decltype(feats)::value;
    // Level by level, so that one level's table is what the cache holds at a time.
    for (int64_t l = 0; l < L; ++l) {
      const T* level = table + l * S * kF;
#pragma omp parallel for schedule(static) num_threads(num_threads)
      for (int64_t n = 0; n < N; ++n)
        hashgrid::encode_level<kD, kF>(x + n * kD, scales[l], uint32_t(res[l]), uint32_t(S), level,
                                       out + n * L * kF + l * kF);
    }
  });
}

template <typename T>
bool hash_encode_backward(int64_t N, int D, int64_t L, int64_t S, int F, const T* x, const T* table,
                          const T* scales, const int32_t* res, const T* v_out, T* v_table, T* v_x,
                          int num_threads) {
  return hashgrid::with_shape(D, F, [&](auto dims, auto feats) {
    constexpr int kD = decltype(dims)::value, kF = decltype(feats)::value;
    auto add = [](T* at, T v) { *at += v; };
    // The table's gradient: one level per thread, so that no two threads write one row
    // (each clears its level first: no serial pass over the whole table).
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t l = 0; l < L; ++l) {
      std::fill(v_table + l * S * kF, v_table + (l + 1) * S * kF, T(0));
      for (int64_t n = 0; n < N; ++n)
        hashgrid::encode_level_vjp<kD, kF>(x + n * kD, scales[l], uint32_t(res[l]), uint32_t(S), table + l * S * kF,
                                           v_out + n * L * kF + l * kF, v_table + l * S * kF, (T*)nullptr, add);
    }
    if (v_x == nullptr) return;
    // The positions' gradient: one point per thread, its levels summed in order.
    auto skip = [](T*, T) {};
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n = 0; n < N; ++n) {
      T* vx = v_x + n * kD;
      std::fill(vx, vx + kD, T(0));
      for (int64_t l = 0; l < L; ++l)
        hashgrid::encode_level_vjp<kD, kF>(x + n * kD, scales[l], uint32_t(res[l]), uint32_t(S), table + l * S * kF,
                                           v_out + n * L * kF + l * kF, (T*)nullptr, vx, skip);
    }
  });
}

#define INSTANTIATE(T)                                                                                          \
  template bool hash_encode_forward<T>(int64_t, int, int64_t, int64_t, int, const T*, const T*, const T*,      \
                                       const int32_t*, T*, int);                                               \
  template bool hash_encode_backward<T>(int64_t, int, int64_t, int64_t, int, const T*, const T*, const T*,     \
                                        const int32_t*, const T*, T*, T*, int);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace splat_cpu
