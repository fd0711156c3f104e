// Backward of the compositing (3DGS): one block per tile, one thread per pixel, walking
// the tile's Gaussians back to front from the last one any of its pixels composited, and
// rebuilding each pixel's transmittance from its saved final value. A Gaussian's gradient
// is summed over the 32 pixels of a warp (cooperative_groups' reduce) and added to global
// memory with one atomic per warp, not one per pixel (Taming 3DGS; gsplat's warp sums);
// warps none of whose pixels the Gaussian touched skip it.
#include <cstdint>

#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
#include <cuda_runtime.h>

#include "launch.cuh"
#include "rasterize.h"
#include "splat_math.h"

namespace splat_cuda {

namespace cg = cooperative_groups;

namespace {

constexpr int kBlock = kTileSize * kTileSize;

__device__ void atomic_accumulate(float* at, float value) { atomicAdd(at, value); }

template <int D>
__global__ void __launch_bounds__(kBlock)
    rasterize_backward_kernel(const float* __restrict__ means2d, const float* __restrict__ conics,
                              const float* __restrict__ features, const float* __restrict__ opacities,
                              const float* __restrict__ backgrounds, int width, int height, int tiles_x,
                              int tiles_y, const int64_t* __restrict__ tile_offsets,
                              const int64_t* __restrict__ flat_ids, const float* __restrict__ final_T, const int32_t* __restrict__ last_ids,
                              const float* __restrict__ v_render, const float* __restrict__ v_alpha,
                              float* __restrict__ v_means2d, float* __restrict__ v_conics,
                              float* __restrict__ v_features, float* __restrict__ v_opacities,
                              float* __restrict__ v_backgrounds) {
  const cg::thread_block block = cg::this_thread_block();
  const cg::thread_block_tile<32> warp = cg::tiled_partition<32>(block);
  const int64_t c = blockIdx.z;
  const int64_t tile = (c * tiles_y + blockIdx.y) * tiles_x + blockIdx.x;
  const int rank = threadIdx.y * kTileSize + threadIdx.x;
  const int px = blockIdx.x * kTileSize + threadIdx.x, py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < width && py < height;
  const int64_t pix = (c * height + py) * width + px;
  const int64_t start = tile_offsets[tile];

  __shared__ int s_max_last;
  __shared__ int64_t s_id[kBlock];
  __shared__ float2 s_mean[kBlock];
  __shared__ float4 s_conic_opacity[kBlock];
  __shared__ float s_feature[kBlock * D];

  const float t_final = inside ? final_T[pix] : 1.f;
  const int32_t last = inside ? last_ids[pix] : 0;
  float v_rgb[D], bg_dot = 0.f;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    v_rgb[d] = inside ? v_render[pix * D + d] : 0.f;
    if (backgrounds) bg_dot += backgrounds[c * D + d] * v_rgb[d];
  }
  const float v_a_pixel = inside && v_alpha ? v_alpha[pix] : 0.f;

  if (v_backgrounds && backgrounds) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const float sum = cg::reduce(warp, t_final * v_rgb[d], cg::plus<float>());
      if (warp.thread_rank() == 0) atomicAdd(v_backgrounds + c * D + d, sum);
    }
  }

  if (rank == 0) s_max_last = 0;
  __syncthreads();
  atomicMax(&s_max_last, int(last));
  __syncthreads();
  const int64_t stop = start + s_max_last;  // one past the last entry any pixel composited

  float trans = t_final, behind[D] = {};
  const float fx = px + 0.5f, fy = py + 0.5f;
  for (int64_t batch_end = stop; batch_end > start; batch_end -= kBlock) {
    __syncthreads();  // the previous batch has been read by every thread
    const int64_t entry = batch_end - 1 - rank;
    if (entry >= start) {
      const int64_t g = flat_ids[entry];
      s_id[rank] = g;
      s_mean[rank] = make_float2(means2d[2 * g], means2d[2 * g + 1]);
      s_conic_opacity[rank] = make_float4(conics[3 * g], conics[3 * g + 1], conics[3 * g + 2], opacities[g]);
#pragma unroll
      for (int d = 0; d < D; ++d) s_feature[rank * D + d] = features[g * D + d];
    }
    __syncthreads();
    const int count = int(min(int64_t(kBlock), batch_end - start));
    for (int k = 0; k < count; ++k) {
      const int64_t list_rank = batch_end - 1 - k - start;  // the entry's place in the tile's list
      const float4 co = s_conic_opacity[k];
      const splat::Vec3<float> conic = {co.x, co.y, co.z};
      const float dx = fx - s_mean[k].x, dy = fy - s_mean[k].y;
      const float sigma = splat::gaussian_sigma(conic, dx, dy);
      const float gauss = (sigma < 0.f || sigma > splat::max_sigma(co.w)) ? 0.f : __expf(-sigma);
      const float a = fminf(float(splat::kAlphaMax), co.w * gauss);
      const bool valid = list_rank < last && a >= float(splat::kAlphaMin);
      if (!warp.any(valid)) continue;

      splat::SplatGrad<float> grad;
      float g_f[D] = {};
      if (valid) {
        const float ra = 1.f / (1.f - a);
        const float t_before = trans * ra;
        const float w = a * t_before;
        const float* f = s_feature + k * D;
        float v_a = 0.f;
#pragma unroll
        for (int d = 0; d < D; ++d) {
          g_f[d] = w * v_rgb[d];
          v_a += v_rgb[d] * (f[d] * t_before - behind[d] * ra);
          behind[d] += f[d] * w;
        }
        v_a += (v_a_pixel - bg_dot) * t_final * ra;
        trans = t_before;
        splat::pixel_alpha_vjp(conic, co.w, gauss, dx, dy, v_a, grad);
      }
      const cg::plus<float> sum;
      grad.mean_x = cg::reduce(warp, grad.mean_x, sum);
      grad.mean_y = cg::reduce(warp, grad.mean_y, sum);
      grad.conic_a = cg::reduce(warp, grad.conic_a, sum);
      grad.conic_b = cg::reduce(warp, grad.conic_b, sum);
      grad.conic_c = cg::reduce(warp, grad.conic_c, sum);
      grad.opacity = cg::reduce(warp, grad.opacity, sum);
#pragma unroll
      for (int d = 0; d < D; ++d) g_f[d] = cg::reduce(warp, g_f[d], sum);
      if (warp.thread_rank() == 0) {
        const int64_t g = s_id[k];
        splat::add_splat_grad(grad, g, v_means2d, v_conics, v_opacities, atomic_accumulate);
#pragma unroll
        for (int d = 0; d < D; ++d) atomicAdd(v_features + g * D + d, g_f[d]);
      }
    }
  }
}

}  // namespace

cudaError_t rasterize_backward(int64_t C, int64_t N, int D, const float* means2d, const float* conics,
                               const float* features, const float* opacities, const float* backgrounds, int width,
                               int height, int tile_size, int tiles_x, int tiles_y, const int64_t* tile_offsets,
                               const int64_t* flat_ids, int64_t n_isects, const float* final_T,
                               const int32_t* last_ids, const float* v_render, const float* v_alpha, float* v_means2d,
                               float* v_conics, float* v_features, float* v_opacities, float* v_backgrounds,
                               cudaStream_t stream) {
  if (tile_size != kTileSize) return cudaErrorInvalidValue;
  if (C == 0 || N == 0 || tiles_x == 0 || tiles_y == 0) return cudaSuccess;
  const dim3 grid(tiles_x, tiles_y, unsigned(C)), block(kTileSize, kTileSize, 1);
  return with_channels(D, [&](auto channels) {
    SPLAT_LAUNCH(rasterize_backward_kernel<decltype(channels)::value>, grid, block, stream, means2d, conics, features,
                 opacities, backgrounds, width, height, tiles_x, tiles_y, tile_offsets, flat_ids, final_T, last_ids,
                 v_render, v_alpha, v_means2d, v_conics, v_features, v_opacities, v_backgrounds);
  });
}

}  // namespace splat_cuda
