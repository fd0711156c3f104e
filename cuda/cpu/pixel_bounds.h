// Pixel window of one Gaussian inside one tile, shared by the forward and backward
// compositing loops. Outside this window alpha < 1/255, so skipping it is exact.
#pragma once

#include <algorithm>
#include <cmath>

#include "splat_math.h"

namespace splat_cpu {

struct PixelWindow { int x0, x1, y0, y1; };  // inclusive bounds, empty if x0 > x1 or y0 > y1

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

}  // namespace splat_cpu
