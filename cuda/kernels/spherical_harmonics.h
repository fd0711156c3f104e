// Host entry points of the CUDA spherical-harmonics kernels (degree 0..3). Pointers are
// device memory, float32, contiguous: dirs [C,N,3] (any length), coeffs [N,K,3] with
// K >= (degree+1)^2, colors [C,N,3].
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace splat_cuda {

cudaError_t sh_forward(int64_t C, int64_t N, int64_t K, int degree, const float* dirs, const float* coeffs,
                       float* colors, cudaStream_t stream);

// v_coeffs [N,K,3] is accumulated into (zero-initialised; summed over cameras); v_dirs may
// be null.
cudaError_t sh_backward(int64_t C, int64_t N, int64_t K, int degree, const float* dirs, const float* coeffs,
                        const float* v_colors, float* v_dirs, float* v_coeffs, cudaStream_t stream);

}  // namespace splat_cuda
