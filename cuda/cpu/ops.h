// Raw-pointer CPU operations of the rasterizer. No torch headers here: bindings.cpp
// owns tensors, shapes and dtype dispatch. Each operation lives in its own file and is
// instantiated for float and double (double is used by the finite-difference tests).
//
// Shapes (row-major, contiguous):
//   means [N,3], quats [N,4] (wxyz), scales [N,3] (linear), opacities [N]
//   viewmats [C,4,4] (world-to-camera), Ks [C,3,3]
//   radii [C,N,2] int32, means2d [C,N,2], depths [C,N], conics [C,N,3], compensations [C,N]
//   tile_offsets [C*tiles_y*tiles_x] int64 (start of each tile in flat_ids), flat_ids [M] int64 (c*N+n)
#pragma once

#include <cstdint>
#include <vector>

namespace splat_cpu {

template <typename T>
void project_forward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales,
                     const T* opacities, const T* viewmats, const T* Ks, int width, int height,
                     T eps2d, T near_plane, T far_plane, bool antialiased, int32_t* radii,
                     T* means2d, T* depths, T* conics, T* compensations, int num_threads);

// v_compensations may be null; v_viewmats may be null (no camera gradient wanted).
template <typename T>
void project_backward(int64_t C, int64_t N, const T* means, const T* quats, const T* scales,
                      const T* viewmats, const T* Ks, int width, int height, T eps2d,
                      const int32_t* radii, const T* conics, const T* compensations,
                      const T* v_means2d, const T* v_depths, const T* v_conics,
                      const T* v_compensations, T* v_means, T* v_quats, T* v_scales,
                      T* v_viewmats, int num_threads);

// dirs [C,N,3] (any length), coeffs [N,K,3] -> colors [C,N,3]
template <typename T>
void sh_forward(int64_t C, int64_t N, int64_t K, int degree, const T* dirs, const T* coeffs,
                T* colors, int num_threads);

// v_dirs may be null. v_coeffs is written (summed over cameras).
template <typename T>
void sh_backward(int64_t C, int64_t N, int64_t K, int degree, const T* dirs, const T* coeffs,
                 const T* v_colors, T* v_dirs, T* v_coeffs, int num_threads);

// Tile/depth sort: every visible Gaussian is listed in each 16x16 tile its extent
// touches, tiles in order, depth order inside a tile (ties by c*N+n).
template <typename T>
void isect_tiles(int64_t C, int64_t N, const T* means2d, const int32_t* radii, const T* depths,
                 int tile_size, int tiles_x, int tiles_y, std::vector<int64_t>& tile_offsets,
                 std::vector<int64_t>& flat_ids, int num_threads);

// features [C,N,D], opacities [C,N], backgrounds [C,D] or null.
// Outputs render [C,H,W,D], alpha [C,H,W], final_T [C,H,W], last_ids [C,H,W]
// (per pixel, one past the last tile-list entry that was composited).
template <typename T>
void rasterize_forward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics,
                       const T* features, const T* opacities, const T* backgrounds, int width,
                       int height, int tile_size, int tiles_x, int tiles_y,
                       const int64_t* tile_offsets, const int64_t* flat_ids, int64_t n_isects,
                       T* render, T* alpha, T* final_T, int32_t* last_ids, int num_threads);

// Gradients are accumulated into zero-initialised outputs; v_backgrounds may be null.
template <typename T>
void rasterize_backward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics,
                        const T* features, const T* opacities, const T* backgrounds, int width,
                        int height, int tile_size, int tiles_x, int tiles_y,
                        const int64_t* tile_offsets, const int64_t* flat_ids, int64_t n_isects,
                        const T* final_T, const int32_t* last_ids, const T* v_render,
                        const T* v_alpha, T* v_means2d, T* v_conics, T* v_features,
                        T* v_opacities, T* v_backgrounds, int num_threads);

// Multi-resolution hash encoding (hash_math.h). x [N,D], table [L,S,F] (S a power of two),
// scales [L], res [L] -> out [N,L*F] (level-major). D is 2 or 3, F 1, 2, 4 or 8; false
// for others.
template <typename T>
bool hash_encode_forward(int64_t N, int D, int64_t L, int64_t S, int F, const T* x, const T* table,
                         const T* scales, const int32_t* res, T* out, int num_threads);

// v_table [L,S,F] is written; v_x [N,D] is written, or null.
template <typename T>
bool hash_encode_backward(int64_t N, int D, int64_t L, int64_t S, int F, const T* x, const T* table,
                          const T* scales, const int32_t* res, const T* v_out, T* v_table, T* v_x,
                          int num_threads);

}  // namespace splat_cpu
