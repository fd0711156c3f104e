// EWA projection (3DGS) of every Gaussian into every camera: one thread per (camera,
// Gaussian); the math is splat_math.h's project_gaussian, as on the CPU.
#include <cstdint>

#include <cuda_runtime.h>

#include "launch.cuh"
#include "projection.h"
#include "splat_math.h"

namespace splat_cuda {

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    project_forward_kernel(int64_t N, const float* __restrict__ means, const float* __restrict__ quats,
                           const float* __restrict__ scales, const float* __restrict__ opacities,
                           const float* __restrict__ viewmats, const float* __restrict__ Ks, int width, int height,
                           float eps2d, float near_plane, float far_plane, bool antialiased,
                           int32_t* __restrict__ radii, float* __restrict__ means2d, float* __restrict__ depths,
                           float* __restrict__ conics, float* __restrict__ compensations) {
  const int64_t c = blockIdx.y, n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t i = c * N + n;
  const splat::PinholeCamera<float> cam = splat::load_camera(viewmats + c * 16, Ks + c * 9);
  const splat::Vec3<float> p = {means[3 * n], means[3 * n + 1], means[3 * n + 2]};
  const splat::Mat3<float> cov = splat::quat_scale_to_covar(
      splat::Vec4<float>{quats[4 * n], quats[4 * n + 1], quats[4 * n + 2], quats[4 * n + 3]},
      splat::Vec3<float>{scales[3 * n], scales[3 * n + 1], scales[3 * n + 2]});
  splat::store_projection(splat::project_gaussian(cam, p, cov, opacities[n], width, height, eps2d, near_plane,
                                                  far_plane, antialiased),
                          i, radii, means2d, depths, conics, compensations);
}

}  // namespace

cudaError_t project_forward(int64_t C, int64_t N, const float* means, const float* quats, const float* scales,
                            const float* opacities, const float* viewmats, const float* Ks, int width, int height,
                            float eps2d, float near_plane, float far_plane, bool antialiased, int32_t* radii,
                            float* means2d, float* depths, float* conics, float* compensations, cudaStream_t stream) {
  if (C == 0 || N == 0) return cudaSuccess;
  const dim3 grid(unsigned((N + kThreads - 1) / kThreads), unsigned(C)), block(kThreads);
  SPLAT_LAUNCH(project_forward_kernel, grid, block, stream, N, means, quats, scales, opacities, viewmats, Ks, width,
               height, eps2d, near_plane, far_plane, antialiased, radii, means2d, depths, conics, compensations);
  return cudaGetLastError();
}

}  // namespace splat_cuda
