// Host entry points of the CUDA projection kernels. Pointers are device memory, float32,
// row-major and contiguous, with the shapes of cuda/cpu/ops.h:
//   means [N,3], quats [N,4] (wxyz), scales [N,3] (linear), opacities [N],
//   viewmats [C,4,4] (world-to-camera), Ks [C,3,3];
//   radii [C,N,2] int32, means2d [C,N,2], depths [C,N], conics [C,N,3], compensations [C,N].
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace splat_cuda {

cudaError_t project_forward(int64_t C, int64_t N, const float* means, const float* quats, const float* scales,
                            const float* opacities, const float* viewmats, const float* Ks, int width, int height,
                            float eps2d, float near_plane, float far_plane, bool antialiased, int32_t* radii,
                            float* means2d, float* depths, float* conics, float* compensations, cudaStream_t stream);

// Gradients are accumulated into zero-initialised outputs; v_compensations and v_viewmats
// may be null (no gradient through the compensation; none wanted for the cameras).
cudaError_t project_backward(int64_t C, int64_t N, const float* means, const float* quats, const float* scales,
                             const float* viewmats, const float* Ks, int width, int height, float eps2d,
                             const int32_t* radii, const float* conics, const float* compensations,
                             const float* v_means2d, const float* v_depths, const float* v_conics,
                             const float* v_compensations, float* v_means, float* v_quats, float* v_scales,
                             float* v_viewmats, cudaStream_t stream);

}  // namespace splat_cuda
