// View-dependent colour from spherical-harmonic coefficients (degree 0..3).
#include <algorithm>
#include <cmath>

#include "ops.h"
#include "splat_math.h"

namespace splat_cpu {
using namespace splat;

template <typename T>
void sh_forward(int64_t C, int64_t N, int64_t K, int degree, const T* dirs, const T* coeffs,
                T* colors, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t i = 0; i < C * N; ++i) {
    const Vec3<T> rgb = sh_colour(degree, dirs + 3 * i, coeffs + (i % N) * K * 3);
    colors[3 * i] = rgb.x;
    colors[3 * i + 1] = rgb.y;
    colors[3 * i + 2] = rgb.z;
  }
}

template <typename T>
void sh_backward(int64_t C, int64_t N, int64_t K, int degree, const T* dirs, const T* coeffs,
                 const T* v_colors, T* v_dirs, T* v_coeffs, int num_threads) {
  // Parallel over Gaussians so the per-Gaussian coefficient gradient needs no atomics.
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n) {
    T* vco = v_coeffs + n * K * 3;
    std::fill(vco, vco + K * 3, T(0));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = c * N + n;
      const Vec3<T> vd = sh_colour_vjp(degree, dirs + 3 * i, coeffs + n * K * 3, v_colors + 3 * i, vco,
                                       [](T* at, T v) { *at += v; });
      if (v_dirs) {
        v_dirs[3 * i] = vd.x;
        v_dirs[3 * i + 1] = vd.y;
        v_dirs[3 * i + 2] = vd.z;
      }
    }
  }
}

#define INSTANTIATE(T)                                                                         \
  template void sh_forward<T>(int64_t, int64_t, int64_t, int, const T*, const T*, T*, int);    \
  template void sh_backward<T>(int64_t, int64_t, int64_t, int, const T*, const T*, const T*,   \
                               T*, T*, int);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace splat_cpu
