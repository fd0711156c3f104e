// EWA projection of 3D Gaussians to screen space, forward and backward.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "splat_math.h"

namespace splat_cpu {
using namespace splat;

namespace {
template <typename T> Vec4<T> load_quat(const T* q) { return {q[0], q[1], q[2], q[3]}; }
template <typename T> Vec3<T> load_vec3(const T* v) { return {v[0], v[1], v[2]}; }
}  // namespace

template <typename T>
void project_forward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales,
                     const T* opacities, const T* viewmats, const T* Ks, int width, int height,
                     T eps2d, T near_plane, T far_plane, bool antialiased, int32_t* radii,
                     T* means2d, T* depths, T* conics, T* compensations, int num_threads) {
  std::vector<PinholeCamera<T>> cams(C);
  for (int64_t c = 0; c < C; ++c) cams[c] = load_camera(viewmats + c * 16, Ks + c * 9);

#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t n = 0; n < N; ++n) {
    const Vec3<T> p = load_vec3(means + n * 3);
    const Mat3<T> cov = quat_scale_to_covar(load_quat(quats + n * 4), load_vec3(scales + n * 3));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = c * N + n;
      store_projection(project_gaussian(cams[c], p, cov, opacities[n], width, height, eps2d, near_plane, far_plane,
                                        antialiased),
                       i, radii, means2d, depths, conics, compensations);
    }
  }
}

template <typename T>
void project_backward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales,
                      const T* viewmats, const T* Ks, int width, int height, T eps2d,
                      const int32_t* radii, const T* conics, const T* compensations,
                      const T* v_means2d, const T* v_depths, const T* v_conics,
                      const T* v_compensations, T* v_means, T* v_quats, T* v_scales,
                      T* v_viewmats, int num_threads) {
  std::vector<PinholeCamera<T>> cams(C);
  for (int64_t c = 0; c < C; ++c) cams[c] = load_camera(viewmats + c * 16, Ks + c * 9);
  if (v_viewmats) std::fill(v_viewmats, v_viewmats + C * 16, T(0));

#pragma omp parallel num_threads(num_threads)
  {
    // Camera gradients are summed over Gaussians: per-thread partial sums, merged once.
    std::vector<T> local_vm(v_viewmats ? C * 16 : 0, T(0));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const Vec3<T> p = load_vec3(means + n * 3);
      const Vec4<T> q = load_quat(quats + n * 4);
      const Vec3<T> s = load_vec3(scales + n * 3);
      const Mat3<T> cov = quat_scale_to_covar(q, s);
      Vec3<T> v_p_sum = {0, 0, 0};
      Mat3<T> v_cov_sum = {};
      bool any = false;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = c * N + n;
        if (radii[2 * i] <= 0 || radii[2 * i + 1] <= 0) continue;
        any = true;
        const ProjectionGrad<T> g = project_gaussian_vjp(
            cams[c], p, cov, width, height, eps2d, load_vec3(conics + 3 * i), compensations[i],
            Vec2<T>{v_means2d[2 * i], v_means2d[2 * i + 1]}, v_depths[i], load_vec3(v_conics + 3 * i),
            v_compensations != nullptr, v_compensations ? v_compensations[i] : T(0));
        v_p_sum.x += g.v_p.x; v_p_sum.y += g.v_p.y; v_p_sum.z += g.v_p.z;
        v_cov_sum = add(v_cov_sum, g.v_cov);
        if (v_viewmats) {
          T* vm = local_vm.data() + c * 16;
          for (int a = 0; a < 3; ++a)
            for (int b = 0; b < 3; ++b) vm[a * 4 + b] += g.v_R.m[a][b];
          vm[3] += g.v_t.x; vm[7] += g.v_t.y; vm[11] += g.v_t.z;
        }
      }
      Vec4<T> v_q = {0, 0, 0, 0};
      Vec3<T> v_s = {0, 0, 0};
      if (any) quat_scale_to_covar_vjp(q, s, v_cov_sum, v_q, v_s);
      v_means[3 * n] = v_p_sum.x; v_means[3 * n + 1] = v_p_sum.y; v_means[3 * n + 2] = v_p_sum.z;
      v_quats[4 * n] = v_q.w; v_quats[4 * n + 1] = v_q.x; v_quats[4 * n + 2] = v_q.y; v_quats[4 * n + 3] = v_q.z;
      v_scales[3 * n] = v_s.x; v_scales[3 * n + 1] = v_s.y; v_scales[3 * n + 2] = v_s.z;
    }
    if (v_viewmats) {
#pragma omp critical
      for (int64_t j = 0; j < C * 16; ++j) v_viewmats[j] += local_vm[j];
    }
  }
}

#define INSTANTIATE(T)                                                                          \
  template void project_forward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*,   \
                                   const T*, const T*, int, int, T, T, T, bool, int32_t*, T*,  \
                                   T*, T*, T*, int);                                           \
  template void project_backward<T>(int64_t, int64_t, const T*, const T*, const T*, const T*,  \
                                    const T*, int, int, T, const int32_t*, const T*, const T*, \
                                    const T*, const T*, const T*, const T*, T*, T*, T*, T*, int);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace splat_cpu
