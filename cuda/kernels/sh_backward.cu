// Backward of the SH colour: one thread per (camera, Gaussian); the coefficients'
// gradient, summed over cameras, is added atomically.
#include <cstdint>

#include <cuda_runtime.h>

#include "launch.cuh"
#include "spherical_harmonics.h"
#include "splat_math.h"

namespace splat_cuda {

namespace {

constexpr int kThreads = 256;

__device__ void atomic_accumulate(float* at, float value) { atomicAdd(at, value); }

__global__ void __launch_bounds__(kThreads)
    sh_backward_kernel(int64_t CN, int64_t N, int64_t K, int degree, const float* __restrict__ dirs,
                       const float* __restrict__ coeffs, const float* __restrict__ v_colors,
                       float* __restrict__ v_dirs, float* __restrict__ v_coeffs) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;  // c * N + n
  if (i >= CN) return;
  const int64_t n = i % N;
  const splat::Vec3<float> vd = splat::sh_colour_vjp(degree, dirs + 3 * i, coeffs + n * K * 3, v_colors + 3 * i,
                                                     v_coeffs + n * K * 3, atomic_accumulate);
  if (v_dirs) {
    v_dirs[3 * i] = vd.x;
    v_dirs[3 * i + 1] = vd.y;
    v_dirs[3 * i + 2] = vd.z;
  }
}

}  // namespace

cudaError_t sh_backward(int64_t C, int64_t N, int64_t K, int degree, const float* dirs, const float* coeffs,
                        const float* v_colors, float* v_dirs, float* v_coeffs, cudaStream_t stream) {
  if (degree < 0 || degree > 3 || K < (degree + 1) * (degree + 1)) return cudaErrorInvalidValue;
  if (C * N == 0) return cudaSuccess;
  SPLAT_LAUNCH(sh_backward_kernel, dim3(unsigned((C * N + kThreads - 1) / kThreads)), dim3(kThreads), stream, C * N,
               N, K, degree, dirs, coeffs, v_colors, v_dirs, v_coeffs);
  return cudaGetLastError();
}

}  // namespace splat_cuda
