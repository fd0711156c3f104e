// Host entry points of the CUDA tile intersection: which Gaussians touch which tiles, as
// the depth-sorted lists the compositing kernels read (cuda/kernels/rasterize.h). All the
// cameras of a batch in one pass. Pointers are device memory, with the shapes of
// cuda/cpu/ops.h:
//   means2d [C,N,2] float32, radii [C,N,2] int32 (0: not visible), depths [C,N] float32;
//   tile_offsets [C*tiles_y*tiles_x] int64 (start of each tile's entries in flat_ids),
//   flat_ids [n_isects] int64 (c*N+n), sorted by (camera, tile, depth), ties by id.
// Two passes, because the number of entries must reach the host to size the second's
// buffers (the caller reads tiles_cumsum[C*N-1]):
//   1. isect_count: tiles touched by each (camera, Gaussian), and their inclusive prefix
//      sum (CUB) into tiles_cumsum [C*N] int64;
//   2. isect_sort: one 64-bit key per entry, (camera * tiles + tile) << 32 | depth bits,
//      radix-sorted (CUB) on the 32 + index_bits(C*tiles) bits that can differ, then each
//      tile's start found where the key's upper half changes.
// Scratch: tiles [C*N] int64 for pass 1; keys [2*n_isects] uint64 and ids [n_isects]
// int64 for pass 2; and CUB's temporary storage of the sizes the *_temp_bytes functions
// give (the caller allocates, so a torch build uses torch's caching allocator).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace splat_cuda {

size_t isect_count_temp_bytes(int64_t C, int64_t N);
size_t isect_sort_temp_bytes(int64_t C, int tiles_x, int tiles_y, int64_t n_isects);

cudaError_t isect_count(int64_t C, int64_t N, const float* means2d, const int32_t* radii, int tile_size, int tiles_x,
                        int tiles_y, int64_t* tiles, int64_t* tiles_cumsum, void* temp, size_t temp_bytes,
                        cudaStream_t stream);

cudaError_t isect_sort(int64_t C, int64_t N, const float* means2d, const int32_t* radii, const float* depths,
                       int tile_size, int tiles_x, int tiles_y, const int64_t* tiles_cumsum, int64_t n_isects,
                       uint64_t* keys, int64_t* ids, void* temp, size_t temp_bytes, int64_t* tile_offsets,
                       int64_t* flat_ids, cudaStream_t stream);

}  // namespace splat_cuda
