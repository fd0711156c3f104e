// View-dependent colour from spherical-harmonic coefficients (degree 0..3).
#include <algorithm>
#include <cmath>

#include "ops.h"
#include "splat_math.h"

namespace splat_cpu {
using namespace splat;

namespace {
// Same rule as torch.nn.functional.normalize (eps = 1e-12).
template <typename T> T safe_norm(const T* d) {
  return std::max(std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), T(1e-12));
}
}  // namespace

template <typename T>
void sh_forward(int64_t C, int64_t N, int64_t K, int degree, const T* dirs, const T* coeffs,
                T* colors, int num_threads) {
  const int nb = (degree + 1) * (degree + 1);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t i = 0; i < C * N; ++i) {
    const int64_t n = i % N;
    const T* d = dirs + 3 * i;
    const T inv = T(1) / safe_norm(d);
    T basis[16];
    sh_basis(degree, Vec3<T>{d[0] * inv, d[1] * inv, d[2] * inv}, basis);
    const T* co = coeffs + n * K * 3;
    T rgb[3] = {0, 0, 0};
    for (int k = 0; k < nb; ++k)
      for (int ch = 0; ch < 3; ++ch) rgb[ch] += basis[k] * co[k * 3 + ch];
    for (int ch = 0; ch < 3; ++ch) colors[3 * i + ch] = rgb[ch];
  }
}

template <typename T>
void sh_backward(int64_t C, int64_t N, int64_t K, int degree, const T* dirs, const T* coeffs,
                 const T* v_colors, T* v_dirs, T* v_coeffs, int num_threads) {
  const int nb = (degree + 1) * (degree + 1);
  // Parallel over Gaussians so the per-Gaussian coefficient gradient needs no atomics.
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n) {
    T* vco = v_coeffs + n * K * 3;
    std::fill(vco, vco + K * 3, T(0));
    const T* co = coeffs + n * K * 3;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = c * N + n;
      const T* d = dirs + 3 * i;
      const T norm = safe_norm(d);
      const Vec3<T> u = {d[0] / norm, d[1] / norm, d[2] / norm};
      T basis[16];
      sh_basis(degree, u, basis);
      const T* g = v_colors + 3 * i;
      T w[16];
      for (int k = 0; k < nb; ++k) {
        w[k] = 0;
        for (int ch = 0; ch < 3; ++ch) {
          vco[k * 3 + ch] += basis[k] * g[ch];
          w[k] += co[k * 3 + ch] * g[ch];
        }
      }
      if (v_dirs) {
        // Through the normalisation u = d / |d|: (I - u u^T) g_u / |d|.
        const Vec3<T> gu = sh_basis_grad(degree, u, w);
        const T dot = gu.x * u.x + gu.y * u.y + gu.z * u.z;
        v_dirs[3 * i] = (gu.x - dot * u.x) / norm;
        v_dirs[3 * i + 1] = (gu.y - dot * u.y) / norm;
        v_dirs[3 * i + 2] = (gu.z - dot * u.z) / norm;
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
