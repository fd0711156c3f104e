// Backward of the projection: one thread per (camera, Gaussian), blocks of one camera.
// Each visible pair adds its mean, quaternion and scale gradients atomically (a Gaussian
// seen by C cameras gets C adds); the camera's gradient is summed over the warp first
// (cooperative_groups' reduce), then added once per warp.
#include <cstdint>

#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
#include <cuda_runtime.h>

#include "launch.cuh"
#include "projection.h"
#include "splat_math.h"

namespace splat_cuda {

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    project_backward_kernel(int64_t N, const float* __restrict__ means, const float* __restrict__ quats,
                            const float* __restrict__ scales, const float* __restrict__ viewmats,
                            const float* __restrict__ Ks, int width, int height, float eps2d,
                            const int32_t* __restrict__ radii, const float* __restrict__ conics,
                            const float* __restrict__ compensations, const float* __restrict__ v_means2d,
                            const float* __restrict__ v_depths, const float* __restrict__ v_conics,
                            const float* __restrict__ v_compensations, float* __restrict__ v_means,
                            float* __restrict__ v_quats, float* __restrict__ v_scales,
                            float* __restrict__ v_viewmats) {
  const cg::thread_block_tile<32> warp = cg::tiled_partition<32>(cg::this_thread_block());
  const int64_t c = blockIdx.y, n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i = c * N + n;
  // Threads past the end take part in the warp's sums with zeros: no early return.
  const bool visible = n < N && radii[2 * i] > 0 && radii[2 * i + 1] > 0;
  if (!warp.any(visible)) return;

  splat::ProjectionGrad<float> g;
  if (visible) {
    const splat::PinholeCamera<float> cam = splat::load_camera(viewmats + c * 16, Ks + c * 9);
    const splat::Vec3<float> p = {means[3 * n], means[3 * n + 1], means[3 * n + 2]};
    const splat::Vec4<float> q = {quats[4 * n], quats[4 * n + 1], quats[4 * n + 2], quats[4 * n + 3]};
    const splat::Vec3<float> s = {scales[3 * n], scales[3 * n + 1], scales[3 * n + 2]};
    const splat::Mat3<float> cov = splat::quat_scale_to_covar(q, s);
    g = splat::project_gaussian_vjp(cam, p, cov, width, height, eps2d,
                                    splat::Vec3<float>{conics[3 * i], conics[3 * i + 1], conics[3 * i + 2]},
                                    compensations[i], splat::Vec2<float>{v_means2d[2 * i], v_means2d[2 * i + 1]},
                                    v_depths[i],
                                    splat::Vec3<float>{v_conics[3 * i], v_conics[3 * i + 1], v_conics[3 * i + 2]},
                                    v_compensations != nullptr, v_compensations ? v_compensations[i] : 0.f);
    splat::Vec4<float> v_q = {0, 0, 0, 0};
    splat::Vec3<float> v_s = {0, 0, 0};
    splat::quat_scale_to_covar_vjp(q, s, g.v_cov, v_q, v_s);
    atomicAdd(v_means + 3 * n, g.v_p.x);
    atomicAdd(v_means + 3 * n + 1, g.v_p.y);
    atomicAdd(v_means + 3 * n + 2, g.v_p.z);
    atomicAdd(v_quats + 4 * n, v_q.w);
    atomicAdd(v_quats + 4 * n + 1, v_q.x);
    atomicAdd(v_quats + 4 * n + 2, v_q.y);
    atomicAdd(v_quats + 4 * n + 3, v_q.z);
    atomicAdd(v_scales + 3 * n, v_s.x);
    atomicAdd(v_scales + 3 * n + 1, v_s.y);
    atomicAdd(v_scales + 3 * n + 2, v_s.z);
  }
  if (v_viewmats == nullptr) return;
  const cg::plus<float> sum;
  float* vm = v_viewmats + c * 16;
  for (int a = 0; a < 3; ++a) {
    for (int b = 0; b < 3; ++b) {
      const float r = cg::reduce(warp, g.v_R.m[a][b], sum);
      if (warp.thread_rank() == 0) atomicAdd(vm + a * 4 + b, r);
    }
  }
  const float t[3] = {cg::reduce(warp, g.v_t.x, sum), cg::reduce(warp, g.v_t.y, sum), cg::reduce(warp, g.v_t.z, sum)};
  if (warp.thread_rank() == 0)
    for (int a = 0; a < 3; ++a) atomicAdd(vm + a * 4 + 3, t[a]);
}

}  // namespace

cudaError_t project_backward(int64_t C, int64_t N, const float* means, const float* quats, const float* scales,
                             const float* viewmats, const float* Ks, int width, int height, float eps2d,
                             const int32_t* radii, const float* conics, const float* compensations,
                             const float* v_means2d, const float* v_depths, const float* v_conics,
                             const float* v_compensations, float* v_means, float* v_quats, float* v_scales,
                             float* v_viewmats, cudaStream_t stream) {
  if (C == 0 || N == 0) return cudaSuccess;
  const dim3 grid(unsigned((N + kThreads - 1) / kThreads), unsigned(C)), block(kThreads);
  SPLAT_LAUNCH(project_backward_kernel, grid, block, stream, N, means, quats, scales, viewmats, Ks, width, height,
               eps2d, radii, conics, compensations, v_means2d, v_depths, v_conics, v_compensations, v_means, v_quats,
               v_scales, v_viewmats);
  return cudaGetLastError();
}

}  // namespace splat_cuda
