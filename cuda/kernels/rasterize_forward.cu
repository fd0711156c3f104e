// Forward compositing (3DGS): one block per 16x16 tile, one thread per pixel. The block
// walks its tile's depth-sorted Gaussians in batches of 256 that its threads load into
// shared memory together; each thread composites front to back: alpha = min(0.99, o G),
// contributions below 1/255 skipped, and it stops once its transmittance would fall below
// 1e-4. The whole block stops as soon as every pixel has (__syncthreads_count).
#include <cstdint>

#include <cuda_runtime.h>

#include "launch.cuh"
#include "rasterize.h"
#include "splat_math.h"

namespace splat_cuda {

namespace {

constexpr int kBlock = kTileSize * kTileSize;

template <int D>
__global__ void __launch_bounds__(kBlock)
    rasterize_forward_kernel(const float* __restrict__ means2d, const float* __restrict__ conics,
                             const float* __restrict__ features, const float* __restrict__ opacities,
                             const float* __restrict__ backgrounds, int width, int height, int tiles_x, int tiles_y,
                             const int64_t* __restrict__ tile_offsets, const int64_t* __restrict__ flat_ids,
                             int64_t n_isects, float* __restrict__ render, float* __restrict__ alpha,
                             float* __restrict__ final_T, int32_t* __restrict__ last_ids) {
  const int64_t c = blockIdx.z;
  const int64_t tile = (c * tiles_y + blockIdx.y) * tiles_x + blockIdx.x;
  const int rank = threadIdx.y * kTileSize + threadIdx.x;
  const int px = blockIdx.x * kTileSize + threadIdx.x, py = blockIdx.y * kTileSize + threadIdx.y;
  const bool inside = px < width && py < height;

  const int64_t start = tile_offsets[tile];
  const int64_t end = tile + 1 < int64_t(gridDim.z) * tiles_y * tiles_x ? tile_offsets[tile + 1] : n_isects;

  __shared__ int64_t s_id[kBlock];
  __shared__ float2 s_mean[kBlock];
  __shared__ float4 s_conic_opacity[kBlock];

  const float fx = px + 0.5f, fy = py + 0.5f;
  float trans = 1.f, acc[D] = {};
  int32_t last = 0;
  bool done = !inside;

  for (int64_t batch = start; batch < end; batch += kBlock) {
    // Every thread reaches this barrier once per batch; it also keeps this batch's loads
    // from overwriting shared memory that slower threads still read.
    if (__syncthreads_count(done) == kBlock) break;
    if (batch + rank < end) {
      const int64_t g = flat_ids[batch + rank];
      s_id[rank] = g;
      s_mean[rank] = make_float2(means2d[2 * g], means2d[2 * g + 1]);
      s_conic_opacity[rank] = make_float4(conics[3 * g], conics[3 * g + 1], conics[3 * g + 2], opacities[g]);
    }
    __syncthreads();
    const int count = int(min(int64_t(kBlock), end - batch));
    for (int k = 0; k < count && !done; ++k) {
      const float4 co = s_conic_opacity[k];
      const splat::Vec3<float> conic = {co.x, co.y, co.z};
      const float sigma = splat::gaussian_sigma(conic, fx - s_mean[k].x, fy - s_mean[k].y);
      if (sigma < 0.f || sigma > splat::max_sigma(co.w)) continue;
      const float a = fminf(float(splat::kAlphaMax), co.w * __expf(-sigma));
      if (a < float(splat::kAlphaMin)) continue;
      const float next = trans * (1.f - a);
      if (next < float(splat::kTransmittanceMin)) {
        done = true;
        break;
      }
      const float w = a * trans;
      const float* f = features + s_id[k] * D;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] += w * f[d];
      trans = next;
      last = int32_t(batch - start + k + 1);
    }
  }
  if (!inside) return;
  const int64_t pix = (c * height + py) * width + px;
#pragma unroll
  for (int d = 0; d < D; ++d) render[pix * D + d] = acc[d] + (backgrounds ? trans * backgrounds[c * D + d] : 0.f);
  alpha[pix] = 1.f - trans;
  final_T[pix] = trans;
  last_ids[pix] = last;
}

}  // namespace

cudaError_t rasterize_forward(int64_t C, int64_t N, int D, const float* means2d, const float* conics,
                              const float* features, const float* opacities, const float* backgrounds, int width,
                              int height, int tile_size, int tiles_x, int tiles_y, const int64_t* tile_offsets,
                              const int64_t* flat_ids, int64_t n_isects, float* render, float* alpha, float* final_T,
                              int32_t* last_ids, cudaStream_t stream) {
  if (tile_size != kTileSize) return cudaErrorInvalidValue;
  if (C == 0 || tiles_x == 0 || tiles_y == 0) return cudaSuccess;
  const dim3 grid(tiles_x, tiles_y, unsigned(C)), block(kTileSize, kTileSize, 1);
  return with_channels(D, [&](auto channels) {
    SPLAT_LAUNCH(rasterize_forward_kernel<decltype(channels)::value>, grid, block, stream, means2d, conics, features,
                 opacities, backgrounds, width, height, tiles_x, tiles_y, tile_offsets, flat_ids, n_isects, render,
                 alpha, final_T, last_ids);
  });
}

}  // namespace splat_cuda
