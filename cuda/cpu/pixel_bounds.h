// Pixels of one Gaussian inside one tile, shared by the forward and backward compositing
// loops: a window over the rows, then the exact span of each row. Outside them
// alpha < 1/255, so skipping them is exact.
#pragma once

#include <algorithm>
#include <cmath>

#include "splat_math.h"

namespace splat_cpu {

struct PixelWindow { int x0, x1, y0, y1; };  // inclusive bounds, empty if x0 > x1 or y0 > y1
struct PixelSpan { int x0, x1; };            // inclusive, empty if x0 > x1

template <typename T>
inline PixelWindow pixel_window(T mx, T my, const splat::Vec3<T>& conic, T opacity, int tx0, int ty0,
                                int tw, int th) {
  const T det = conic.x * conic.z - conic.y * conic.y;
  const T k = splat::extent_sigmas(opacity);
  PixelWindow w = {tx0, tx0 - 1, ty0, ty0 - 1};
  if (!(det > 0) || !(k > 0)) return w;
  const T rx = k * std::sqrt(conic.z / det), ry = k * std::sqrt(conic.x / det);
  // Pixel centres are at integer + 0.5; widen by one pixel against rounding.
  w.x0 = std::max(tx0, static_cast<int>(std::floor(mx - rx - T(0.5))));
  w.x1 = std::min(tx0 + tw - 1, static_cast<int>(std::ceil(mx + rx - T(0.5))));
  w.y0 = std::max(ty0, static_cast<int>(std::floor(my - ry - T(0.5))));
  w.y1 = std::min(ty0 + th - 1, static_cast<int>(std::ceil(my + ry - T(0.5))));
  return w;
}

// Columns of row offset dy (pixel centre minus mean) where sigma <= sigma_cut, within
// [win.x0, win.x1]. sigma(dx) = a/2 dx^2 + b dy dx + c/2 dy^2 is a parabola in dx; its
// roots bound the span. An ellipse fills about pi/4 of its bounding box, and far less
// when it is thin and tilted, so this skips most of the pixels the window alone visits.
template <typename T>
inline PixelSpan row_span(T mx, const splat::Vec3<T>& conic, T sigma_cut, T dy, const PixelWindow& win) {
  const T det = conic.x * conic.z - conic.y * conic.y;
  const T disc = T(2) * conic.x * sigma_cut - det * dy * dy;  // (a/2)-scaled discriminant
  if (!(disc >= 0) || !(conic.x > 0)) return {win.x0, win.x0 - 1};
  const T root = std::sqrt(disc), centre = mx - conic.y * dy / conic.x - T(0.5);
  // Widened by one pixel against rounding; the caller still tests sigma per pixel.
  return {std::max(win.x0, static_cast<int>(std::floor(centre - root / conic.x)) - 1),
          std::min(win.x1, static_cast<int>(std::ceil(centre + root / conic.x)) + 1)};
}

}  // namespace splat_cpu
