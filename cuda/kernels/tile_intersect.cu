// Tile intersection (3DGS's duplicate-and-sort, gsplat's isect_tiles): every visible
// (camera, Gaussian) is listed once per tile it touches, under a 64-bit key
// (camera * tiles + tile) << 32 | depth bits; a CUB radix sort of the bits that can
// differ orders the lists by camera, tile and depth at once (stable, so equal depths keep
// increasing id order, as on the CPU), and each tile's start is where the key's upper
// half changes. The prefix sum that places each Gaussian's entries is CUB's too.
#include <cstdint>

#include <cub/cub.cuh>
#include <cuda_runtime.h>

#include "launch.cuh"
#include "splat_math.h"
#include "tile_intersect.h"

namespace splat_cuda {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

int sort_end_bit(int64_t C, int tiles_x, int tiles_y) {
  return 32 + splat::index_bits(C * int64_t(tiles_x) * tiles_y);
}

// The keys hold (camera, tile) in their upper 32 bits.
bool fits_in_keys(int64_t C, int tiles_x, int tiles_y) { return C * int64_t(tiles_x) * tiles_y <= (int64_t(1) << 32); }

__device__ bool visible(const int32_t* radii, int64_t i) { return radii[2 * i] > 0 && radii[2 * i + 1] > 0; }

__device__ splat::TileRect rect_of(const float* means2d, const int32_t* radii, int64_t i, int tile_size, int tiles_x,
                                   int tiles_y) {
  return splat::tile_rect(means2d[2 * i], means2d[2 * i + 1], float(radii[2 * i]), float(radii[2 * i + 1]), tile_size,
                          tiles_x, tiles_y);
}

__global__ void __launch_bounds__(kThreads)
    count_tiles_kernel(int64_t CN, const float* __restrict__ means2d, const int32_t* __restrict__ radii, int tile_size,
                       int tiles_x, int tiles_y, int64_t* __restrict__ tiles) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= CN) return;
  tiles[i] = visible(radii, i) ? rect_of(means2d, radii, i, tile_size, tiles_x, tiles_y).count() : 0;
}

__global__ void __launch_bounds__(kThreads)
    emit_keys_kernel(int64_t CN, int64_t N, const float* __restrict__ means2d, const int32_t* __restrict__ radii,
                     const float* __restrict__ depths, int tile_size, int tiles_x, int tiles_y,
                     const int64_t* __restrict__ tiles_cumsum, uint64_t* __restrict__ keys, int64_t* __restrict__ ids) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= CN || !visible(radii, i)) return;
  const splat::TileRect t = rect_of(means2d, radii, i, tile_size, tiles_x, tiles_y);
  const uint64_t camera_base = uint64_t(i / N) * uint64_t(tiles_x) * uint64_t(tiles_y);
  const uint64_t depth = splat::depth_key(depths[i]);
  int64_t at = i == 0 ? 0 : tiles_cumsum[i - 1];
  for (int y = t.y0; y < t.y1; ++y)
    for (int x = t.x0; x < t.x1; ++x, ++at) {
      keys[at] = (camera_base + uint64_t(y) * uint64_t(tiles_x) + uint64_t(x)) << 32 | depth;
      ids[at] = i;
    }
}

// Entry i starts every tile after the previous entry's up to its own (empty tiles start
// where the next non-empty one does); the last entry also closes the tiles after it.
__global__ void __launch_bounds__(kThreads)
    tile_offsets_kernel(int64_t n_isects, int64_t n_tiles, const uint64_t* __restrict__ sorted_keys,
                        int64_t* __restrict__ tile_offsets) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n_isects) return;
  const int64_t tile = int64_t(sorted_keys[i] >> 32);
  const int64_t previous = i == 0 ? -1 : int64_t(sorted_keys[i - 1] >> 32);
  for (int64_t t = previous + 1; t <= tile; ++t) tile_offsets[t] = i;
  if (i == n_isects - 1)
    for (int64_t t = tile + 1; t < n_tiles; ++t) tile_offsets[t] = n_isects;
}

}  // namespace

size_t isect_count_temp_bytes(int64_t C, int64_t N) {
  size_t bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                C * N);
  return bytes;
}

size_t isect_sort_temp_bytes(int64_t C, int tiles_x, int tiles_y, int64_t n_isects) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint64_t*>(nullptr),
                                  static_cast<uint64_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), n_isects, 0, sort_end_bit(C, tiles_x, tiles_y));
  return bytes;
}

cudaError_t isect_count(int64_t C, int64_t N, const float* means2d, const int32_t* radii, int tile_size, int tiles_x,
                        int tiles_y, int64_t* tiles, int64_t* tiles_cumsum, void* temp, size_t temp_bytes,
                        cudaStream_t stream) {
  if (tile_size < 1 || !fits_in_keys(C, tiles_x, tiles_y)) return cudaErrorInvalidValue;
  const int64_t CN = C * N;
  if (CN == 0) return cudaSuccess;
  SPLAT_LAUNCH(count_tiles_kernel, dim3(blocks_for(CN)), dim3(kThreads), stream, CN, means2d, radii, tile_size,
               tiles_x, tiles_y, tiles);
  if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess) return status;
  return cub::DeviceScan::InclusiveSum(temp, temp_bytes, static_cast<const int64_t*>(tiles), tiles_cumsum, CN, stream);
}

cudaError_t isect_sort(int64_t C, int64_t N, const float* means2d, const int32_t* radii, const float* depths,
                       int tile_size, int tiles_x, int tiles_y, const int64_t* tiles_cumsum, int64_t n_isects,
                       uint64_t* keys, int64_t* ids, void* temp, size_t temp_bytes, int64_t* tile_offsets,
                       int64_t* flat_ids, cudaStream_t stream) {
  if (tile_size < 1 || !fits_in_keys(C, tiles_x, tiles_y)) return cudaErrorInvalidValue;
  const int64_t n_tiles = C * int64_t(tiles_x) * tiles_y;
  if (n_tiles == 0) return cudaSuccess;
  if (n_isects == 0) return cudaMemsetAsync(tile_offsets, 0, size_t(n_tiles) * sizeof(int64_t), stream);
  SPLAT_LAUNCH(emit_keys_kernel, dim3(blocks_for(C * N)), dim3(kThreads), stream, C * N, N, means2d, radii, depths,
               tile_size, tiles_x, tiles_y, tiles_cumsum, keys, ids);
  if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess) return status;
  uint64_t* sorted_keys = keys + n_isects;
  if (const cudaError_t status =
          cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, sorted_keys, ids, flat_ids, n_isects, 0,
                                          sort_end_bit(C, tiles_x, tiles_y), stream);
      status != cudaSuccess)
    return status;
  SPLAT_LAUNCH(tile_offsets_kernel, dim3(blocks_for(n_isects)), dim3(kThreads), stream, n_isects, n_tiles,
               sorted_keys, tile_offsets);
  return cudaGetLastError();
}

}  // namespace splat_cuda
