// Tile/depth sort of visible Gaussians: a counting sort by tile, then a depth sort
// inside each tile. Equivalent to sorting 64-bit (tile, depth) keys, but parallel over
// tiles and without materialising the keys.
#include <algorithm>
#include <utility>

#include "ops.h"
#include "splat_math.h"

namespace splat_cpu {

namespace {
template <typename T>
splat::TileRect tile_rect(const T* m, const int32_t* r, int tile_size, int tiles_x, int tiles_y) {
  return splat::tile_rect(static_cast<float>(m[0]), static_cast<float>(m[1]), static_cast<float>(r[0]),
                          static_cast<float>(r[1]), tile_size, tiles_x, tiles_y);
}
}  // namespace

template <typename T>
void isect_tiles(int64_t C, int64_t N, const T* means2d, const int32_t* radii, const T* depths,
                 int tile_size, int tiles_x, int tiles_y, std::vector<int64_t>& tile_offsets,
                 std::vector<int64_t>& flat_ids, int num_threads) {
  const int64_t n_tiles = static_cast<int64_t>(tiles_x) * tiles_y;
  const int64_t CN = C * N;

  // 1. Count Gaussians per tile (per-thread histograms, no atomics).
  std::vector<int64_t> counts(C * n_tiles + 1, 0);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int64_t> local(C * n_tiles, 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < CN; ++i) {
      if (radii[2 * i] <= 0 || radii[2 * i + 1] <= 0) continue;
      const splat::TileRect t = tile_rect(means2d + 2 * i, radii + 2 * i, tile_size, tiles_x, tiles_y);
      int64_t* row = local.data() + (i / N) * n_tiles;
      for (int y = t.y0; y < t.y1; ++y)
        for (int x = t.x0; x < t.x1; ++x) ++row[static_cast<int64_t>(y) * tiles_x + x];
    }
#pragma omp critical
    for (int64_t j = 0; j < C * n_tiles; ++j) counts[j] += local[j];
  }

  // 2. Exclusive prefix sum -> tile start offsets.
  tile_offsets.assign(C * n_tiles, 0);
  int64_t total = 0;
  for (int64_t j = 0; j < C * n_tiles; ++j) {
    tile_offsets[j] = total;
    total += counts[j];
  }
  flat_ids.assign(total, 0);

  // 3. Scatter Gaussian ids into their tiles, in increasing id order (serial: keeps the
  //    fill deterministic; it is a small share of the runtime).
  std::vector<int64_t> cursor(tile_offsets);
  for (int64_t i = 0; i < CN; ++i) {
    if (radii[2 * i] <= 0 || radii[2 * i + 1] <= 0) continue;
    const splat::TileRect t = tile_rect(means2d + 2 * i, radii + 2 * i, tile_size, tiles_x, tiles_y);
    const int64_t base = (i / N) * n_tiles;
    for (int y = t.y0; y < t.y1; ++y)
      for (int x = t.x0; x < t.x1; ++x) flat_ids[cursor[base + static_cast<int64_t>(y) * tiles_x + x]++] = i;
  }

  // 4. Depth order inside each tile; ties keep increasing id order (stable sort).
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<std::pair<uint32_t, int64_t>> buf;
#pragma omp for schedule(dynamic, 16)
    for (int64_t j = 0; j < C * n_tiles; ++j) {
      const int64_t start = tile_offsets[j], end = start + counts[j];
      if (end - start < 2) continue;
      buf.clear();
      for (int64_t k = start; k < end; ++k)
        buf.emplace_back(splat::depth_key(static_cast<float>(depths[flat_ids[k]])), flat_ids[k]);
      std::sort(buf.begin(), buf.end());
      for (int64_t k = start; k < end; ++k) flat_ids[k] = buf[k - start].second;
    }
  }
}

template void isect_tiles<float>(int64_t, int64_t, const float*, const int32_t*, const float*, int,
                                 int, int, std::vector<int64_t>&, std::vector<int64_t>&, int);
template void isect_tiles<double>(int64_t, int64_t, const double*, const int32_t*, const double*,
                                  int, int, int, std::vector<int64_t>&, std::vector<int64_t>&, int);

}  // namespace splat_cpu
