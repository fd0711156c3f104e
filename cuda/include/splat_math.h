// Shared Gaussian-splatting math for the C++ CPU path and the CUDA path.
//
// Every function is inline, branch-light and templated on the scalar type T, so the
// CPU extension can run in float (speed) or double (finite-difference checks) and
// the CUDA kernels reuse the exact same code in float. Each forward function has a
// hand-written vector-Jacobian product (`*_vjp`) next to it.
//
// Conventions (identical to gsplat and Inria 3DGS):
//   quaternions are (w, x, y, z), normalised inside; scales are linear (not log);
//   matrices are row-major 3x3; pixel centres sit at (i + 0.5, j + 0.5);
//   conic = inverse 2D covariance stored as (a, b, c) for [[a, b], [b, c]];
//   sigma = 0.5 * (a dx^2 + c dy^2) + b dx dy,  alpha = min(0.99, opacity * exp(-sigma)).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SPLAT_HD __host__ __device__ __forceinline__
#else
#define SPLAT_HD inline
#endif

namespace splat {

// 3DGS numerical conventions.
constexpr double kAlphaMin = 1.0 / 255.0;   // contributions below this are skipped
constexpr double kAlphaMax = 0.99;          // alpha clamp (keeps 1 - alpha invertible)
constexpr double kTransmittanceMin = 1e-4;  // front-to-back early stop
constexpr double kClipFov = 0.3;            // Jacobian clamp margin beyond the frustum

template <typename T> struct Vec2 { T x, y; };
template <typename T> struct Vec3 { T x, y, z; };
template <typename T> struct Vec4 { T w, x, y, z; };
template <typename T> struct Mat2 { T m[2][2]; };
template <typename T> struct Mat3 { T m[3][3]; };

// ---------------------------------------------------------------- small algebra
template <typename T> SPLAT_HD Vec3<T> matvec(const Mat3<T>& A, const Vec3<T>& v) {
  return {A.m[0][0] * v.x + A.m[0][1] * v.y + A.m[0][2] * v.z,
          A.m[1][0] * v.x + A.m[1][1] * v.y + A.m[1][2] * v.z,
          A.m[2][0] * v.x + A.m[2][1] * v.y + A.m[2][2] * v.z};
}
template <typename T> SPLAT_HD Vec3<T> matTvec(const Mat3<T>& A, const Vec3<T>& v) {
  return {A.m[0][0] * v.x + A.m[1][0] * v.y + A.m[2][0] * v.z,
          A.m[0][1] * v.x + A.m[1][1] * v.y + A.m[2][1] * v.z,
          A.m[0][2] * v.x + A.m[1][2] * v.y + A.m[2][2] * v.z};
}
template <typename T> SPLAT_HD Mat3<T> matmul(const Mat3<T>& A, const Mat3<T>& B) {
  Mat3<T> C;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      C.m[i][j] = A.m[i][0] * B.m[0][j] + A.m[i][1] * B.m[1][j] + A.m[i][2] * B.m[2][j];
  return C;
}
template <typename T> SPLAT_HD Mat3<T> transpose(const Mat3<T>& A) {
  Mat3<T> B;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) B.m[i][j] = A.m[j][i];
  return B;
}
template <typename T> SPLAT_HD Mat3<T> add(const Mat3<T>& A, const Mat3<T>& B) {
  Mat3<T> C;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) C.m[i][j] = A.m[i][j] + B.m[i][j];
  return C;
}

// ---------------------------------------------------------------- rotation
template <typename T> SPLAT_HD Vec4<T> normalize_quat(const Vec4<T>& q) {
  const T inv = T(1) / sqrt(q.w * q.w + q.x * q.x + q.y * q.y + q.z * q.z);
  return {q.w * inv, q.x * inv, q.y * inv, q.z * inv};
}

// R(q) for a unit quaternion.
template <typename T> SPLAT_HD Mat3<T> quat_to_rotmat(const Vec4<T>& q) {
  const T w = q.w, x = q.x, y = q.y, z = q.z;
  Mat3<T> R;
  R.m[0][0] = 1 - 2 * (y * y + z * z); R.m[0][1] = 2 * (x * y - w * z); R.m[0][2] = 2 * (x * z + w * y);
  R.m[1][0] = 2 * (x * y + w * z); R.m[1][1] = 1 - 2 * (x * x + z * z); R.m[1][2] = 2 * (y * z - w * x);
  R.m[2][0] = 2 * (x * z - w * y); R.m[2][1] = 2 * (y * z + w * x); R.m[2][2] = 1 - 2 * (x * x + y * y);
  return R;
}

// VJP of R(normalize(q_raw)) with respect to the raw quaternion.
template <typename T>
SPLAT_HD Vec4<T> quat_to_rotmat_vjp(const Vec4<T>& q_raw, const Mat3<T>& v_R) {
  const Vec4<T> q = normalize_quat(q_raw);
  const T w = q.w, x = q.x, y = q.y, z = q.z;
  const auto& v = v_R.m;
  Vec4<T> g;  // gradient with respect to the unit quaternion
  g.w = 2 * (-z * v[0][1] + y * v[0][2] + z * v[1][0] - x * v[1][2] - y * v[2][0] + x * v[2][1]);
  g.x = 2 * (y * v[0][1] + z * v[0][2] + y * v[1][0] - 2 * x * v[1][1] - w * v[1][2] + z * v[2][0] +
             w * v[2][1] - 2 * x * v[2][2]);
  g.y = 2 * (-2 * y * v[0][0] + x * v[0][1] + w * v[0][2] + x * v[1][0] + z * v[1][2] - w * v[2][0] +
             z * v[2][1] - 2 * y * v[2][2]);
  g.z = 2 * (-2 * z * v[0][0] - w * v[0][1] + x * v[0][2] + w * v[1][0] - 2 * z * v[1][1] + y * v[1][2] +
             x * v[2][0] + y * v[2][1]);
  // Through the normalisation: (I - q q^T) g / |q_raw|.
  const T inv_norm = T(1) / sqrt(q_raw.w * q_raw.w + q_raw.x * q_raw.x + q_raw.y * q_raw.y + q_raw.z * q_raw.z);
  const T dot = g.w * w + g.x * x + g.y * y + g.z * z;
  return {(g.w - dot * w) * inv_norm, (g.x - dot * x) * inv_norm, (g.y - dot * y) * inv_norm,
          (g.z - dot * z) * inv_norm};
}

// ---------------------------------------------------------------- 3D covariance
// Sigma = R S S^T R^T with S = diag(scales).
template <typename T>
SPLAT_HD Mat3<T> quat_scale_to_covar(const Vec4<T>& q_raw, const Vec3<T>& s) {
  const Mat3<T> R = quat_to_rotmat(normalize_quat(q_raw));
  const T sv[3] = {s.x, s.y, s.z};
  Mat3<T> M;  // M = R S
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) M.m[i][j] = R.m[i][j] * sv[j];
  return matmul(M, transpose(M));
}

template <typename T>
SPLAT_HD void quat_scale_to_covar_vjp(const Vec4<T>& q_raw, const Vec3<T>& s, const Mat3<T>& v_cov,
                                      Vec4<T>& v_q, Vec3<T>& v_s) {
  const Mat3<T> R = quat_to_rotmat(normalize_quat(q_raw));
  const T sv[3] = {s.x, s.y, s.z};
  Mat3<T> M;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) M.m[i][j] = R.m[i][j] * sv[j];
  const Mat3<T> v_M = matmul(add(v_cov, transpose(v_cov)), M);  // d(M M^T)
  Mat3<T> v_R;
  T gs[3] = {0, 0, 0};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      v_R.m[i][j] = v_M.m[i][j] * sv[j];
      gs[j] += v_M.m[i][j] * R.m[i][j];
    }
  v_q = quat_to_rotmat_vjp(q_raw, v_R);
  v_s = {gs[0], gs[1], gs[2]};
}

// ---------------------------------------------------------------- world -> camera
template <typename T>
SPLAT_HD void world_to_cam(const Mat3<T>& R, const Vec3<T>& t, const Vec3<T>& p, const Mat3<T>& cov,
                           Vec3<T>& p_c, Mat3<T>& cov_c) {
  const Vec3<T> rp = matvec(R, p);
  p_c = {rp.x + t.x, rp.y + t.y, rp.z + t.z};
  cov_c = matmul(matmul(R, cov), transpose(R));
}

// Accumulates into v_R, v_t (camera) and writes v_p, v_cov (Gaussian).
template <typename T>
SPLAT_HD void world_to_cam_vjp(const Mat3<T>& R, const Vec3<T>& p, const Mat3<T>& cov,
                               const Vec3<T>& v_pc, const Mat3<T>& v_covc, Mat3<T>& v_R,
                               Vec3<T>& v_t, Vec3<T>& v_p, Mat3<T>& v_cov) {
  v_p = matTvec(R, v_pc);
  v_t.x += v_pc.x; v_t.y += v_pc.y; v_t.z += v_pc.z;
  const T pv[3] = {p.x, p.y, p.z};
  const T gv[3] = {v_pc.x, v_pc.y, v_pc.z};
  // d(R cov R^T)/dR = (V + V^T) R cov, for symmetric cov.
  const Mat3<T> vR_cov = matmul(matmul(add(v_covc, transpose(v_covc)), R), cov);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) v_R.m[i][j] += gv[i] * pv[j] + vR_cov.m[i][j];
  v_cov = matmul(matmul(transpose(R), v_covc), R);
}

// ---------------------------------------------------------------- perspective (EWA)
// Projects a camera-space Gaussian. The Jacobian is evaluated at the mean clamped to
// the frustum widened by kClipFov (3DGS), so Gaussians far off-axis stay stable.
template <typename T>
SPLAT_HD void persp_proj(const Vec3<T>& p, const Mat3<T>& cov, T fx, T fy, T cx, T cy, int width,
                         int height, Vec2<T>& mean2d, Mat2<T>& cov2d) {
  const T z = p.z, rz = T(1) / z, rz2 = rz * rz;
  const T tan_fovx = T(0.5) * width / fx, tan_fovy = T(0.5) * height / fy;
  const T lim_x_pos = (width - cx) / fx + T(kClipFov) * tan_fovx;
  const T lim_x_neg = cx / fx + T(kClipFov) * tan_fovx;
  const T lim_y_pos = (height - cy) / fy + T(kClipFov) * tan_fovy;
  const T lim_y_neg = cy / fy + T(kClipFov) * tan_fovy;
  const T tx = z * fmin(lim_x_pos, fmax(-lim_x_neg, p.x * rz));
  const T ty = z * fmin(lim_y_pos, fmax(-lim_y_neg, p.y * rz));
  // J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]
  const T J[2][3] = {{fx * rz, 0, -fx * tx * rz2}, {0, fy * rz, -fy * ty * rz2}};
  T JS[2][3];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      JS[i][j] = J[i][0] * cov.m[0][j] + J[i][1] * cov.m[1][j] + J[i][2] * cov.m[2][j];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      cov2d.m[i][j] = JS[i][0] * J[j][0] + JS[i][1] * J[j][1] + JS[i][2] * J[j][2];
  mean2d = {fx * p.x * rz + cx, fy * p.y * rz + cy};
}

template <typename T>
SPLAT_HD void persp_proj_vjp(const Vec3<T>& p, const Mat3<T>& cov, T fx, T fy, T cx, T cy, int width,
                             int height, const Vec2<T>& v_mean2d, const Mat2<T>& v_cov2d,
                             Vec3<T>& v_p, Mat3<T>& v_cov) {
  const T x = p.x, y = p.y, z = p.z, rz = T(1) / z, rz2 = rz * rz, rz3 = rz2 * rz;
  const T tan_fovx = T(0.5) * width / fx, tan_fovy = T(0.5) * height / fy;
  const T lim_x_pos = (width - cx) / fx + T(kClipFov) * tan_fovx;
  const T lim_x_neg = cx / fx + T(kClipFov) * tan_fovx;
  const T lim_y_pos = (height - cy) / fy + T(kClipFov) * tan_fovy;
  const T lim_y_neg = cy / fy + T(kClipFov) * tan_fovy;
  const T ux = x * rz, uy = y * rz;
  const bool x_clipped = ux < -lim_x_neg || ux > lim_x_pos;
  const bool y_clipped = uy < -lim_y_neg || uy > lim_y_pos;
  const T tx = z * fmin(lim_x_pos, fmax(-lim_x_neg, ux));
  const T ty = z * fmin(lim_y_pos, fmax(-lim_y_neg, uy));
  const T J[2][3] = {{fx * rz, 0, -fx * tx * rz2}, {0, fy * rz, -fy * ty * rz2}};

  // cov2d = J cov J^T:  v_cov = J^T V J,  v_J = (V + V^T) J cov.
  T Vs[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) Vs[i][j] = v_cov2d.m[i][j] + v_cov2d.m[j][i];
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 3; ++b) {
      T acc = 0;
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) acc += J[i][a] * v_cov2d.m[i][j] * J[j][b];
      v_cov.m[a][b] = acc;
    }
  T JC[2][3];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      JC[i][j] = J[i][0] * cov.m[0][j] + J[i][1] * cov.m[1][j] + J[i][2] * cov.m[2][j];
  T v_J[2][3];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) v_J[i][j] = Vs[i][0] * JC[0][j] + Vs[i][1] * JC[1][j];

  // mean2d = (fx x/z + cx, fy y/z + cy)
  v_p.x = fx * rz * v_mean2d.x;
  v_p.y = fy * rz * v_mean2d.y;
  v_p.z = -(fx * x * v_mean2d.x + fy * y * v_mean2d.y) * rz2;
  // J's dependence on z and on the (possibly clamped) tx, ty.
  v_p.z += -fx * rz2 * v_J[0][0] - fy * rz2 * v_J[1][1] + 2 * fx * tx * rz3 * v_J[0][2] +
           2 * fy * ty * rz3 * v_J[1][2];
  const T v_tx = -fx * rz2 * v_J[0][2], v_ty = -fy * rz2 * v_J[1][2];
  if (x_clipped) v_p.z += v_tx * tx * rz; else v_p.x += v_tx;
  if (y_clipped) v_p.z += v_ty * ty * rz; else v_p.y += v_ty;
}

// ---------------------------------------------------------------- 2D low-pass + inverse
// Adds eps2d to the diagonal (the 0.3 px dilation); returns det of the dilated matrix
// and the antialiasing compensation sqrt(det_orig / det_dilated) (Mip-Splatting).
template <typename T>
SPLAT_HD T add_blur(Mat2<T>& cov2d, T eps2d, T& compensation) {
  const T det_orig = cov2d.m[0][0] * cov2d.m[1][1] - cov2d.m[0][1] * cov2d.m[1][0];
  cov2d.m[0][0] += eps2d;
  cov2d.m[1][1] += eps2d;
  const T det = cov2d.m[0][0] * cov2d.m[1][1] - cov2d.m[0][1] * cov2d.m[1][0];
  compensation = det > 0 ? sqrt(fmax(T(0), det_orig / det)) : T(0);
  return det;
}

// VJP of the compensation factor with respect to the undilated covariance,
// accumulated into v_cov2d. cov2d_blur is the dilated matrix.
template <typename T>
SPLAT_HD void add_blur_vjp(const Mat2<T>& cov2d_blur, T eps2d, T compensation, T v_compensation,
                           Mat2<T>& v_cov2d) {
  if (!(compensation > 0)) return;
  const T a1 = cov2d_blur.m[0][0], c1 = cov2d_blur.m[1][1];
  const T b = T(0.5) * (cov2d_blur.m[0][1] + cov2d_blur.m[1][0]);
  const T a0 = a1 - eps2d, c0 = c1 - eps2d;
  const T det0 = a0 * c0 - b * b, det1 = a1 * c1 - b * b;
  const T k = v_compensation / (2 * compensation);
  const T r = det0 / (det1 * det1);
  // d det/d cov = adj(cov)^T for each entry of the full 2x2 matrix.
  v_cov2d.m[0][0] += k * (c0 / det1 - r * c1);
  v_cov2d.m[1][1] += k * (a0 / det1 - r * a1);
  v_cov2d.m[0][1] += k * (-b / det1 + r * b);
  v_cov2d.m[1][0] += k * (-b / det1 + r * b);
}

// conic = (a, b, c) of the inverse of cov2d.
template <typename T> SPLAT_HD Vec3<T> inverse_conic(const Mat2<T>& cov2d, T det) {
  const T inv = T(1) / det;
  return {cov2d.m[1][1] * inv, -T(0.5) * (cov2d.m[0][1] + cov2d.m[1][0]) * inv, cov2d.m[0][0] * inv};
}

// VJP of the conic: v_cov = -Sigma^-1 G Sigma^-1 with G the symmetric gradient of
// the inverse (its off-diagonal entry appears twice).
template <typename T>
SPLAT_HD void inverse_conic_vjp(const Vec3<T>& conic, const Vec3<T>& v_conic, Mat2<T>& v_cov2d) {
  const T I[2][2] = {{conic.x, conic.y}, {conic.y, conic.z}};
  const T G[2][2] = {{v_conic.x, T(0.5) * v_conic.y}, {T(0.5) * v_conic.y, v_conic.z}};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      T acc = 0;
      for (int k = 0; k < 2; ++k)
        for (int l = 0; l < 2; ++l) acc += I[i][k] * G[k][l] * I[l][j];
      v_cov2d.m[i][j] = -acc;
    }
}

// Opacity-aware extent (StopThePop-style): beyond this many standard deviations the
// Gaussian's alpha is below 1/255 and is skipped anyway. Returns 0 when the Gaussian
// can never reach the threshold. Never exceeds 3.33 (= sqrt(2 ln 255)) for opacity <= 1.
template <typename T> SPLAT_HD T extent_sigmas(T opacity) {
  const T q = T(2) * log(opacity / T(kAlphaMin));
  return q > 0 ? sqrt(q) : T(0);
}

// Largest sigma at which opacity * exp(-sigma) still reaches 1/255: pixels beyond it are
// skipped before paying for exp().
template <typename T> SPLAT_HD T max_sigma(T opacity) { return log(opacity / T(kAlphaMin)); }

// ---------------------------------------------------------------- one Gaussian, one camera
template <typename T> struct PinholeCamera {
  Mat3<T> R;
  Vec3<T> t;
  T fx, fy, cx, cy;
};

// viewmat: 4x4 world-to-camera, row-major; K: 3x3 intrinsics, row-major.
template <typename T> SPLAT_HD PinholeCamera<T> load_camera(const T* viewmat, const T* K) {
  PinholeCamera<T> cam;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) cam.R.m[i][j] = viewmat[i * 4 + j];
  cam.t = {viewmat[3], viewmat[7], viewmat[11]};
  cam.fx = K[0];
  cam.fy = K[4];
  cam.cx = K[2];
  cam.cy = K[5];
  return cam;
}

// What the rasterizer needs of one Gaussian in one camera. Invisible Gaussians (behind
// the near plane, degenerate, too faint to reach 1/255, or off screen) have radius 0 and
// zero mean, conic and compensation; the depth is always the camera z.
template <typename T> struct Projection {
  int radius_x = 0, radius_y = 0;  // pixel extent of the opacity-aware footprint
  Vec2<T> mean = {0, 0};
  T depth = 0;
  Vec3<T> conic = {0, 0, 0};
  T compensation = 0;
};

// EWA projection (3DGS) of a Gaussian at p with world covariance cov and opacity, with the
// eps2d (0.3 px) dilation; `antialiased` scales the opacity by the compensation
// (Mip-Splatting) before the extent is taken.
template <typename T>
SPLAT_HD Projection<T> project_gaussian(const PinholeCamera<T>& cam, const Vec3<T>& p, const Mat3<T>& cov,
                                        T opacity, int width, int height, T eps2d, T near_plane, T far_plane,
                                        bool antialiased) {
  Projection<T> out;
  Vec3<T> pc;
  Mat3<T> covc;
  world_to_cam(cam.R, cam.t, p, cov, pc, covc);
  out.depth = pc.z;
  if (!(pc.z > near_plane && pc.z < far_plane)) return out;  // also rejects NaN
  Vec2<T> m2;
  Mat2<T> cov2d;
  persp_proj(pc, covc, cam.fx, cam.fy, cam.cx, cam.cy, width, height, m2, cov2d);
  T comp;
  const T det = add_blur(cov2d, eps2d, comp);
  if (!(det > 0)) return out;  // degenerate
  const T k = extent_sigmas(antialiased ? opacity * comp : opacity);
  if (!(k > 0)) return out;  // can never reach alpha >= 1/255
  using std::ceil;  // in T's precision (unqualified, float would be computed as double)
  using std::sqrt;
  const T rx = ceil(k * sqrt(cov2d.m[0][0])), ry = ceil(k * sqrt(cov2d.m[1][1]));
  if (!(rx > 0 && ry > 0)) return out;
  if (m2.x + rx <= 0 || m2.x - rx >= width || m2.y + ry <= 0 || m2.y - ry >= height) return out;
  out.radius_x = static_cast<int>(rx);
  out.radius_y = static_cast<int>(ry);
  out.mean = m2;
  out.conic = inverse_conic(cov2d, det);
  out.compensation = comp;
  return out;
}

// Writes projection `pr` as entry i of the outputs' layouts (radii [.,2], means2d [.,2],
// depths [.], conics [.,3], compensations [.]).
template <typename T>
SPLAT_HD void store_projection(const Projection<T>& pr, int64_t i, int32_t* radii, T* means2d, T* depths, T* conics,
                               T* compensations) {
  depths[i] = pr.depth;
  radii[2 * i] = pr.radius_x;
  radii[2 * i + 1] = pr.radius_y;
  means2d[2 * i] = pr.mean.x;
  means2d[2 * i + 1] = pr.mean.y;
  conics[3 * i] = pr.conic.x;
  conics[3 * i + 1] = pr.conic.y;
  conics[3 * i + 2] = pr.conic.z;
  compensations[i] = pr.compensation;
}

// Gradients of one visible Gaussian's projection into one camera.
template <typename T> struct ProjectionGrad {
  Vec3<T> v_p = {0, 0, 0};   // world mean
  Mat3<T> v_cov = {};        // world covariance
  Mat3<T> v_R = {};          // camera rotation
  Vec3<T> v_t = {0, 0, 0};   // camera translation
};

// VJP of project_gaussian for a visible Gaussian, given its conic and compensation from
// the forward pass; has_v_compensation: whether v_compensation carries a gradient.
template <typename T>
SPLAT_HD ProjectionGrad<T> project_gaussian_vjp(const PinholeCamera<T>& cam, const Vec3<T>& p, const Mat3<T>& cov,
                                                int width, int height, T eps2d, const Vec3<T>& conic,
                                                T compensation, const Vec2<T>& v_mean, T v_depth,
                                                const Vec3<T>& v_conic, bool has_v_compensation, T v_compensation) {
  ProjectionGrad<T> g;
  Vec3<T> pc;
  Mat3<T> covc;
  world_to_cam(cam.R, cam.t, p, cov, pc, covc);
  Vec2<T> m2;
  Mat2<T> cov2d;
  persp_proj(pc, covc, cam.fx, cam.fy, cam.cx, cam.cy, width, height, m2, cov2d);
  T comp;
  add_blur(cov2d, eps2d, comp);
  Mat2<T> v_cov2d;
  inverse_conic_vjp(conic, v_conic, v_cov2d);
  if (has_v_compensation) add_blur_vjp(cov2d, eps2d, compensation, v_compensation, v_cov2d);
  Vec3<T> v_pc;
  Mat3<T> v_covc;
  persp_proj_vjp(pc, covc, cam.fx, cam.fy, cam.cx, cam.cy, width, height, v_mean, v_cov2d, v_pc, v_covc);
  v_pc.z += v_depth;
  world_to_cam_vjp(cam.R, p, cov, v_pc, v_covc, g.v_R, g.v_t, g.v_p, g.v_cov);
  return g;
}

// ---------------------------------------------------------------- tile binning
// The tiles [x0, x1) x [y0, y1) that a Gaussian's screen extent (mean +- radius) touches,
// clamped to the grid. Float arithmetic, as the torch reference does it, so that every
// backend lists the same tiles.
struct TileRect {
  int x0, y0, x1, y1;
  SPLAT_HD int64_t count() const { return int64_t(x1 - x0) * (y1 - y0); }
};
SPLAT_HD int clamp_tile(int v, int hi) { return v < 0 ? 0 : (v > hi ? hi : v); }
SPLAT_HD TileRect tile_rect(float mx, float my, float rx, float ry, int tile_size, int tiles_x, int tiles_y) {
  using std::ceil;
  using std::floor;
  const float ts = static_cast<float>(tile_size);
  return {clamp_tile(static_cast<int>(floor((mx - rx) / ts)), tiles_x),
          clamp_tile(static_cast<int>(floor((my - ry) / ts)), tiles_y),
          clamp_tile(static_cast<int>(ceil((mx + rx) / ts)), tiles_x),
          clamp_tile(static_cast<int>(ceil((my + ry) / ts)), tiles_y)};
}

// A depth's sort key: depths exceed the near plane (> 0), so their float bit patterns
// order like the values.
SPLAT_HD uint32_t depth_key(float depth) {
  uint32_t key;
  memcpy(&key, &depth, sizeof(key));
  return key;
}

// The bits a (camera, tile) index below `n` needs: the sort key is (camera * tiles + tile)
// above 32 bits of depth, and only 32 + this many bits need sorting.
SPLAT_HD int index_bits(int64_t n) {
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) < n) ++bits;
  return bits;
}

// ---------------------------------------------------------------- pixel evaluation
template <typename T> SPLAT_HD T gaussian_sigma(const Vec3<T>& conic, T dx, T dy) {
  return T(0.5) * (conic.x * dx * dx + conic.z * dy * dy) + conic.y * dx * dy;
}

// Gradient of a Gaussian's 2D parameters (mean, conic, opacity), summed over pixels.
template <typename T> struct SplatGrad {
  T mean_x = 0, mean_y = 0, conic_a = 0, conic_b = 0, conic_c = 0, opacity = 0;
};

// VJP of alpha = min(0.99, opacity * gauss) at one pixel, gauss = exp(-sigma(conic, dx, dy))
// and (dx, dy) = pixel centre - mean: adds v_alpha's pull into g (the clamp's is zero).
template <typename T>
SPLAT_HD void pixel_alpha_vjp(const Vec3<T>& conic, T opacity, T gauss, T dx, T dy, T v_alpha, SplatGrad<T>& g) {
  const T og = opacity * gauss;
  if (og > T(kAlphaMax)) return;
  g.opacity += gauss * v_alpha;
  const T v_sigma = -og * v_alpha;
  g.conic_a += T(0.5) * dx * dx * v_sigma;
  g.conic_b += dx * dy * v_sigma;
  g.conic_c += T(0.5) * dy * dy * v_sigma;
  g.mean_x -= (conic.x * dx + conic.y * dy) * v_sigma;
  g.mean_y -= (conic.y * dx + conic.z * dy) * v_sigma;
}

// Adds g as Gaussian i's entry of v_means2d [.,2], v_conics [.,3] and v_opacities [.],
// through `add(address, value)` (an atomic add on both paths: tiles or warps share it).
template <typename T, typename Add>
SPLAT_HD void add_splat_grad(const SplatGrad<T>& g, int64_t i, T* v_means2d, T* v_conics, T* v_opacities, Add add) {
  add(v_means2d + 2 * i, g.mean_x);
  add(v_means2d + 2 * i + 1, g.mean_y);
  add(v_conics + 3 * i, g.conic_a);
  add(v_conics + 3 * i + 1, g.conic_b);
  add(v_conics + 3 * i + 2, g.conic_c);
  add(v_opacities + i, g.opacity);
}

// ---------------------------------------------------------------- spherical harmonics
// Real SH bases up to degree 3 in the ordering and constants of Sloan (JCGT 2013),
// as used by 3DGS and gsplat. `dir` must be unit length. Writes (degree+1)^2 values.
template <typename T> SPLAT_HD void sh_basis(int degree, const Vec3<T>& dir, T* b) {
  const T x = dir.x, y = dir.y, z = dir.z;
  b[0] = T(0.2820947917738781);
  if (degree < 1) return;
  b[1] = T(-0.48860251190292) * y;
  b[2] = T(0.48860251190292) * z;
  b[3] = T(-0.48860251190292) * x;
  if (degree < 2) return;
  const T z2 = z * z, c1 = x * x - y * y, s1 = 2 * x * y;
  b[4] = T(0.5462742152960395) * s1;
  b[5] = T(-1.092548430592079) * z * y;
  b[6] = T(0.9461746957575601) * z2 - T(0.3153915652525201);
  b[7] = T(-1.092548430592079) * z * x;
  b[8] = T(0.5462742152960395) * c1;
  if (degree < 3) return;
  const T tc = T(-2.285228997322329) * z2 + T(0.4570457994644658);
  const T tb = T(1.445305721320277) * z;
  const T ta = T(-0.5900435899266435);
  const T c2 = x * c1 - y * s1, s2 = x * s1 + y * c1;
  b[9] = ta * s2;
  b[10] = tb * s1;
  b[11] = tc * y;
  b[12] = z * (T(1.865881662950577) * z2 - T(1.119528997770346));
  b[13] = tc * x;
  b[14] = tb * c1;
  b[15] = ta * c2;
}

// Gradient of sum_k w[k] * basis_k(dir) with respect to the (unit) direction
// components, treating x, y, z as independent.
template <typename T> SPLAT_HD Vec3<T> sh_basis_grad(int degree, const Vec3<T>& dir, const T* w) {
  const T x = dir.x, y = dir.y, z = dir.z;
  Vec3<T> g = {0, 0, 0};
  if (degree < 1) return g;
  const T k1 = T(0.48860251190292);
  g.y += -k1 * w[1];
  g.z += k1 * w[2];
  g.x += -k1 * w[3];
  if (degree < 2) return g;
  const T a2 = T(0.5462742152960395), b2 = T(1.092548430592079);
  g.x += 2 * a2 * y * w[4];
  g.y += 2 * a2 * x * w[4];
  g.y += -b2 * z * w[5];
  g.z += -b2 * y * w[5];
  g.z += 2 * T(0.9461746957575601) * z * w[6];
  g.x += -b2 * z * w[7];
  g.z += -b2 * x * w[7];
  g.x += 2 * a2 * x * w[8];
  g.y += -2 * a2 * y * w[8];
  if (degree < 3) return g;
  const T z2 = z * z, c1 = x * x - y * y, s1 = 2 * x * y;
  const T tc = T(-2.285228997322329) * z2 + T(0.4570457994644658);
  const T dtc_dz = 2 * T(-2.285228997322329) * z;
  const T kb = T(1.445305721320277);
  const T ta = T(-0.5900435899266435);
  // b9 = ta * s2, ds2 = (3 s1, 3 c1, 0);  b15 = ta * c2, dc2 = (3 c1, -3 s1, 0)
  g.x += 3 * ta * s1 * w[9];
  g.y += 3 * ta * c1 * w[9];
  g.x += kb * z * 2 * y * w[10];
  g.y += kb * z * 2 * x * w[10];
  g.z += kb * s1 * w[10];
  g.y += tc * w[11];
  g.z += dtc_dz * y * w[11];
  g.z += (3 * T(1.865881662950577) * z2 - T(1.119528997770346)) * w[12];
  g.x += tc * w[13];
  g.z += dtc_dz * x * w[13];
  g.x += kb * z * 2 * x * w[14];
  g.y += -kb * z * 2 * y * w[14];
  g.z += kb * c1 * w[14];
  g.x += 3 * ta * c1 * w[15];
  g.y += -3 * ta * s1 * w[15];
  return g;
}

// Colour of one Gaussian's SH coefficients co [(degree+1)^2, 3] seen along d (any length;
// normalised as torch.nn.functional.normalize does, eps 1e-12).
template <typename T> SPLAT_HD Vec3<T> sh_colour(int degree, const T* d, const T* co) {
  using std::fmax;  // in T's precision
  using std::sqrt;
  const T norm = fmax(sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), T(1e-12));
  T basis[16];
  sh_basis(degree, Vec3<T>{d[0] / norm, d[1] / norm, d[2] / norm}, basis);
  T rgb[3] = {0, 0, 0};
  for (int k = 0; k < (degree + 1) * (degree + 1); ++k)
    for (int ch = 0; ch < 3; ++ch) rgb[ch] += basis[k] * co[k * 3 + ch];
  return {rgb[0], rgb[1], rgb[2]};
}

// VJP of sh_colour for the colour gradient g [3]: adds into v_co [(degree+1)^2, 3] (through
// `add(address, value)`: plain on the CPU, atomic on CUDA) and returns the direction's
// gradient (through the normalisation: (I - u u^T) g_u / |d|).
template <typename T, typename Add>
SPLAT_HD Vec3<T> sh_colour_vjp(int degree, const T* d, const T* co, const T* g, T* v_co, Add add) {
  using std::fmax;
  using std::sqrt;
  const T norm = fmax(sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), T(1e-12));
  const Vec3<T> u = {d[0] / norm, d[1] / norm, d[2] / norm};
  T basis[16], w[16];
  sh_basis(degree, u, basis);
  for (int k = 0; k < (degree + 1) * (degree + 1); ++k) {
    w[k] = 0;
    for (int ch = 0; ch < 3; ++ch) {
      add(v_co + k * 3 + ch, basis[k] * g[ch]);
      w[k] += co[k * 3 + ch] * g[ch];
    }
  }
  const Vec3<T> gu = sh_basis_grad(degree, u, w);
  const T dot = gu.x * u.x + gu.y * u.y + gu.z * u.z;
  return {(gu.x - dot * u.x) / norm, (gu.y - dot * u.y) / norm, (gu.z - dot * u.z) / norm};
}

}  // namespace splat
