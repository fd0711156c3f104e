// Host entry points of the CUDA compositing kernels. Pointers are device memory, float32,
// row-major and contiguous, with the shapes of cuda/cpu/ops.h:
//   means2d [C,N,2], conics [C,N,3], features [C,N,D], opacities [C,N], backgrounds [C,D]
//   or null; tile_offsets [C*tiles_y*tiles_x] int64 (start of each tile in flat_ids),
//   flat_ids [n_isects] int64 (c*N+n), tiles of kTileSize x kTileSize pixels;
//   render [C,H,W,D], alpha [C,H,W], final_T [C,H,W], last_ids [C,H,W] int32 (per pixel,
//   one past the last entry of its tile's list that was composited, counted from the
//   tile's start).
// Each returns cudaSuccess, or cudaErrorInvalidValue for a channel count or tile size the
// kernels are not built for (kMaxChannels, kTileSize).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace splat_cuda {

constexpr int kTileSize = 16;   // one thread per pixel of a 16x16 tile (3DGS)
constexpr int kMaxChannels = 4;  // colour + depth

cudaError_t rasterize_forward(int64_t C, int64_t N, int D, const float* means2d, const float* conics,
                              const float* features, const float* opacities, const float* backgrounds, int width,
                              int height, int tile_size, int tiles_x, int tiles_y, const int64_t* tile_offsets,
                              const int64_t* flat_ids, int64_t n_isects, float* render, float* alpha, float* final_T,
                              int32_t* last_ids, cudaStream_t stream);

// Gradients are accumulated into zero-initialised outputs; v_backgrounds may be null.
cudaError_t rasterize_backward(int64_t C, int64_t N, int D, const float* means2d, const float* conics,
                               const float* features, const float* opacities, const float* backgrounds, int width,
                               int height, int tile_size, int tiles_x, int tiles_y, const int64_t* tile_offsets,
                               const int64_t* flat_ids, int64_t n_isects, const float* final_T,
                               const int32_t* last_ids, const float* v_render, const float* v_alpha, float* v_means2d,
                               float* v_conics, float* v_features, float* v_opacities, float* v_backgrounds,
                               cudaStream_t stream);

}  // namespace splat_cuda
