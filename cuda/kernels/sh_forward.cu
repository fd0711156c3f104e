// View-dependent colour of every Gaussian in every camera: one thread per (camera,
// Gaussian); the math is splat_math.h's sh_colour, as on the CPU.
#include <cstdint>

#include <cuda_runtime.h>

#include "launch.cuh"
#include "spherical_harmonics.h"
#include "splat_math.h"

namespace splat_cuda {

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    sh_forward_kernel(int64_t CN, int64_t N, int64_t K, int degree, const float* __restrict__ dirs,
                      const float* __restrict__ coeffs, float* __restrict__ colors) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;  // c * N + n
  if (i >= CN) return;
  const splat::Vec3<float> rgb = splat::sh_colour(degree, dirs + 3 * i, coeffs + (i % N) * K * 3);
  colors[3 * i] = rgb.x;
  colors[3 * i + 1] = rgb.y;
  colors[3 * i + 2] = rgb.z;
}

}  // namespace

cudaError_t sh_forward(int64_t C, int64_t N, int64_t K, int degree, const float* dirs, const float* coeffs,
                       float* colors, cudaStream_t stream) {
  if (degree < 0 || degree > 3 || K < (degree + 1) * (degree + 1)) return cudaErrorInvalidValue;
  if (C * N == 0) return cudaSuccess;
  SPLAT_LAUNCH(sh_forward_kernel, dim3(unsigned((C * N + kThreads - 1) / kThreads)), dim3(kThreads), stream, C * N, N,
               K, degree, dirs, coeffs, colors);
  return cudaGetLastError();
}

}  // namespace splat_cuda
