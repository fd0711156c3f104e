// Host entry points of the CUDA hash-encoding kernels (hash_math.h). Pointers are device
// memory, float32, contiguous: x [N,D], table [L,S,F] (S a power of two), scales [L],
// res [L] int32, out and v_out [N,L*F]. D is 2 or 3, F 1, 2, 4 or 8
// (cudaErrorInvalidValue otherwise).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace splat_cuda {

cudaError_t hash_encode_forward(int64_t N, int D, int64_t L, int64_t S, int F, const float* x, const float* table,
                                const float* scales, const int32_t* res, float* out, cudaStream_t stream);

// v_table [L,S,F] is accumulated into (zero-initialised); v_x [N,D] is written, or null.
cudaError_t hash_encode_backward(int64_t N, int D, int64_t L, int64_t S, int F, const float* x, const float* table,
                                 const float* scales, const int32_t* res, const float* v_out, float* v_table,
                                 float* v_x, cudaStream_t stream);

}  // namespace splat_cuda
