// Front-to-back alpha compositing per 16x16 tile (3DGS): alpha = min(0.99, o * G),
// contributions below 1/255 skipped, a pixel stops once its transmittance would fall
// below 1e-4. One tile per task; Gaussian-major loops so each Gaussian is loaded once.
#include <algorithm>
#include <cmath>
#include <vector>

#include "exp_neg.h"
#include "ops.h"
#include "packed_gaussians.h"
#include "pixel_bounds.h"
#include "splat_math.h"

namespace splat_cpu {
using namespace splat;

template <typename T>
void rasterize_forward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics,
                       const T* features, const T* opacities, const T* backgrounds, int width,
                       int height, int tile_size, int tiles_x, int tiles_y,
                       const int64_t* tile_offsets, const int64_t* flat_ids, int64_t n_isects,
                       T* render, T* alpha, T* final_T, int32_t* last_ids, int num_threads) {
  const int64_t n_tiles = static_cast<int64_t>(tiles_x) * tiles_y;
  const int P = tile_size * tile_size;
  const T alpha_min = T(kAlphaMin), alpha_max = T(kAlphaMax), t_min = T(kTransmittanceMin);

  const std::vector<T> packed = pack_gaussians(C * N, D, means2d, conics, opacities, features, num_threads);
  const int64_t R = packed_stride(D);

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<T> trans(P), acc(P * D), row_alpha(tile_size);
    std::vector<int32_t> last(P);
    std::vector<unsigned char> done(P);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < C * n_tiles; ++tile) {
      const int64_t c = tile / n_tiles, t = tile % n_tiles;
      const int tx0 = static_cast<int>(t % tiles_x) * tile_size;
      const int ty0 = static_cast<int>(t / tiles_x) * tile_size;
      const int tw = std::min(tile_size, width - tx0), th = std::min(tile_size, height - ty0);
      const int64_t start = tile_offsets[tile];
      const int64_t end = tile + 1 < C * n_tiles ? tile_offsets[tile + 1] : n_isects;

      std::fill(trans.begin(), trans.end(), T(1));
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(last.begin(), last.end(), 0);
      std::fill(done.begin(), done.end(), 0);
      int remaining = tw * th;

      for (int64_t k = start; k < end && remaining > 0; ++k) {
        if (k + kPrefetchAhead < end) prefetch_packed(packed.data() + flat_ids[k + kPrefetchAhead] * R, R);
        const T* g = packed.data() + flat_ids[k] * R;
        const T mx = g[0], my = g[1];
        const Vec3<T> conic = {g[2], g[3], g[4]};
        const T o = g[5];
        const T sigma_cut = max_sigma(o);
        const T* f = g + 6;
        const PixelWindow win = pixel_window(mx, my, conic, o, tx0, ty0, tw, th);
        for (int y = win.y0; y <= win.y1; ++y) {
          const T dy = y + T(0.5) - my;
          const PixelSpan span = row_span(mx, conic, sigma_cut, dy, win);
          T* ra = row_alpha.data();
          // Alphas of the whole span first: this loop vectorises, and exp() is most of
          // the cost. Pixels past the cut-off get 0 and are skipped below.
          for (int x = span.x0; x <= span.x1; ++x) {
            const T sigma = gaussian_sigma(conic, x + T(0.5) - mx, dy);
            const T a = std::min(alpha_max, o * exp_neg(sigma));
            ra[x - span.x0] = (sigma < 0 || sigma > sigma_cut) ? T(0) : a;
          }
          for (int x = span.x0; x <= span.x1; ++x) {
            const int p = (y - ty0) * tile_size + (x - tx0);
            const T a = ra[x - span.x0];
            if (done[p] || a < alpha_min) continue;
            const T next = trans[p] * (1 - a);
            if (next < t_min) {
              done[p] = 1;
              --remaining;
              continue;
            }
            const T w = a * trans[p];
            T* ap = acc.data() + p * D;
            for (int64_t d = 0; d < D; ++d) ap[d] += w * f[d];
            trans[p] = next;
            last[p] = static_cast<int32_t>(k - start + 1);
          }
        }
      }

      const T* bg = backgrounds ? backgrounds + c * D : nullptr;
      for (int y = 0; y < th; ++y)
        for (int x = 0; x < tw; ++x) {
          const int p = y * tile_size + x;
          const int64_t pix = (c * height + ty0 + y) * width + tx0 + x;
          for (int64_t d = 0; d < D; ++d)
            render[pix * D + d] = acc[p * D + d] + (bg ? trans[p] * bg[d] : T(0));
          alpha[pix] = 1 - trans[p];
          final_T[pix] = trans[p];
          last_ids[pix] = last[p];
        }
    }
  }
}

#define INSTANTIATE(T)                                                                        \
  template void rasterize_forward<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*, \
                                     const T*, const T*, int, int, int, int, int,             \
                                     const int64_t*, const int64_t*, int64_t, T*, T*, T*,     \
                                     int32_t*, int);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace splat_cpu
