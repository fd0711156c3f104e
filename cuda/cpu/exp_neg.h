// exp(-sigma) for the compositing loops, written so a row of pixels vectorises (with
// -fno-trapping-math, which lets GCC turn the compares into selects). glibc only offers a
// SIMD expf under -ffast-math, which would also loosen the NaN and ordering rules the
// 3DGS cut-offs depend on. The float version is Cephes' expf (Cody-Waite range
// reduction, degree-6 polynomial; measured max relative error 7.9e-8 over the sigma range
// kept, under one ulp); double keeps std::exp, for the finite-difference gradient checks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace splat_cpu {

template <typename T> inline T exp_neg(T sigma) { return std::exp(-sigma); }

template <> inline float exp_neg<float>(float sigma) {
  // Alphas are only kept for sigma <= ln(255 o) < 5.55, so clamping far below exp's
  // underflow changes nothing the caller keeps and keeps 2^n a normal float.
  const float x = -std::min(std::max(sigma, 0.0f), 80.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return e * __builtin_bit_cast(float, bits);
}

}  // namespace splat_cpu
