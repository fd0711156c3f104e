// Backward of the tile compositor: back-to-front per tile, rebuilding each pixel's
// transmittance from the saved final value (3DGS). Per-Gaussian gradients are summed
// over the tile's pixels in registers and added to the output once per (Gaussian,
// tile), so atomics are rare.
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

template <typename T> inline void atomic_add(T* dst, T v) {
#pragma omp atomic
  *dst += v;
}

template <typename T>
void rasterize_backward(int64_t C, int64_t N, int64_t D, const T* means2d, const T* conics,
                        const T* features, const T* opacities, const T* backgrounds, int width,
                        int height, int tile_size, int tiles_x, int tiles_y,
                        const int64_t* tile_offsets, const int64_t* flat_ids, int64_t n_isects,
                        const T* final_T, const int32_t* last_ids, const T* v_render,
                        const T* v_alpha, T* v_means2d, T* v_conics, T* v_features,
                        T* v_opacities, T* v_backgrounds, int num_threads) {
  const int64_t n_tiles = static_cast<int64_t>(tiles_x) * tiles_y;
  const int P = tile_size * tile_size;
  const T alpha_min = T(kAlphaMin), alpha_max = T(kAlphaMax);

  const std::vector<T> packed = pack_gaussians(C * N, D, means2d, conics, opacities, features, num_threads);
  const int64_t R = packed_stride(D);

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<T> trans(P), t_final(P), behind(P * D), vr(P * D), va(P), bg_dot(P), g_f(D), row_g(tile_size);
    std::vector<int32_t> last(P);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < C * n_tiles; ++tile) {
      const int64_t c = tile / n_tiles, t = tile % n_tiles;
      const int tx0 = static_cast<int>(t % tiles_x) * tile_size;
      const int ty0 = static_cast<int>(t / tiles_x) * tile_size;
      const int tw = std::min(tile_size, width - tx0), th = std::min(tile_size, height - ty0);
      const int64_t start = tile_offsets[tile];
      const T* bg = backgrounds ? backgrounds + c * D : nullptr;

      int32_t max_last = 0;
      for (int y = 0; y < th; ++y)
        for (int x = 0; x < tw; ++x) {
          const int p = y * tile_size + x;
          const int64_t pix = (c * height + ty0 + y) * width + tx0 + x;
          trans[p] = t_final[p] = final_T[pix];
          last[p] = last_ids[pix];
          max_last = std::max(max_last, last[p]);
          va[p] = v_alpha ? v_alpha[pix] : T(0);
          T dot = 0;
          for (int64_t d = 0; d < D; ++d) {
            vr[p * D + d] = v_render[pix * D + d];
            behind[p * D + d] = 0;
            if (bg) dot += bg[d] * vr[p * D + d];
          }
          bg_dot[p] = dot;
        }
      if (v_backgrounds && bg) {
        for (int64_t d = 0; d < D; ++d) {
          T s = 0;
          for (int y = 0; y < th; ++y)
            for (int x = 0; x < tw; ++x) {
              const int p = y * tile_size + x;
              s += t_final[p] * vr[p * D + d];
            }
          atomic_add(v_backgrounds + c * D + d, s);
        }
      }

      for (int64_t k = start + max_last - 1; k >= start; --k) {
        const int32_t rank = static_cast<int32_t>(k - start);
        if (k - kPrefetchAhead >= start) prefetch_packed(packed.data() + flat_ids[k - kPrefetchAhead] * R, R);
        const int64_t i = flat_ids[k];
        const T* gi = packed.data() + i * R;
        const T mx = gi[0], my = gi[1];
        const Vec3<T> conic = {gi[2], gi[3], gi[4]};
        const T o = gi[5];
        const T sigma_cut = max_sigma(o);
        const T* f = gi + 6;
        const PixelWindow win = pixel_window(mx, my, conic, o, tx0, ty0, tw, th);
        SplatGrad<T> grad;
        std::fill(g_f.begin(), g_f.end(), T(0));
        bool touched = false;
        for (int y = win.y0; y <= win.y1; ++y) {
          const T dy = y + T(0.5) - my;
          const PixelSpan span = row_span(mx, conic, sigma_cut, dy, win);
          T* gr = row_g.data();
          // exp(-sigma) of the whole span first (vectorised, as in the forward pass);
          // pixels past the cut-off get 0 and are skipped below.
          for (int x = span.x0; x <= span.x1; ++x) {
            const T sigma = gaussian_sigma(conic, x + T(0.5) - mx, dy);
            gr[x - span.x0] = (sigma < 0 || sigma > sigma_cut) ? T(0) : exp_neg(sigma);
          }
          for (int x = span.x0; x <= span.x1; ++x) {
            const int p = (y - ty0) * tile_size + (x - tx0);
            if (rank >= last[p]) continue;
            const T dx = x + T(0.5) - mx;
            const T g = gr[x - span.x0];
            const T og = o * g;
            const T a = std::min(alpha_max, og);
            if (a < alpha_min) continue;
            touched = true;
            const T ra = 1 / (1 - a);
            const T t_before = trans[p] * ra;
            const T w = a * t_before;
            T v_a = 0;
            T* bp = behind.data() + p * D;
            const T* vp = vr.data() + p * D;
            for (int64_t d = 0; d < D; ++d) {
              g_f[d] += w * vp[d];
              v_a += vp[d] * (f[d] * t_before - bp[d] * ra);
              bp[d] += f[d] * w;
            }
            v_a += (va[p] - bg_dot[p]) * t_final[p] * ra;
            trans[p] = t_before;
            pixel_alpha_vjp(conic, o, g, dx, dy, v_a, grad);
          }
        }
        if (!touched) continue;
        add_splat_grad(grad, i, v_means2d, v_conics, v_opacities, atomic_add<T>);
        for (int64_t d = 0; d < D; ++d) atomic_add(v_features + i * D + d, g_f[d]);
      }
    }
  }
}

#define INSTANTIATE(T)                                                                         \
  template void rasterize_backward<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*, \
                                      const T*, const T*, int, int, int, int, int,             \
                                      const int64_t*, const int64_t*, int64_t, const T*,       \
                                      const int32_t*, const T*, const T*, T*, T*, T*, T*, T*,  \
                                      int);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace splat_cpu
