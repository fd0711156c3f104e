// Hash encoding, forward: one thread per (point, level), the level in the block's second
// grid axis so that neighbouring threads read one level's table; the math is
// hash_math.h's encode_level, as on the CPU.
#include <cstdint>

#include <cuda_runtime.h>

#include "hash_encoding.h"
#include "hash_math.h"
#include "launch.cuh"

namespace splat_cuda {

namespace {

constexpr int kThreads = 256;

template <int D, int F>
__global__ void __launch_bounds__(kThreads)
    hash_encode_forward_kernel(int64_t N, int64_t L, int64_t S, const float* __restrict__ x,
                               const float* __restrict__ table, const float* __restrict__ scales,
                               const int32_t* __restrict__ res, float* __restrict__ out) {
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t l = blockIdx.y;
  if (n >= N) return;
  hashgrid::encode_level<D, F>(x + n * D, scales[l], uint32_t(res[l]), uint32_t(S), table + l * S * F,
                               out + n * L * F + l * F);
}

}  // namespace

cudaError_t hash_encode_forward(int64_t N, int D, int64_t L, int64_t S, int F, const float* x, const float* table,
                                const float* scales, const int32_t* res, float* out, cudaStream_t stream) {
  if (N == 0 || L == 0) return hashgrid::with_shape(D, F, [](auto, auto) {}) ? cudaSuccess : cudaErrorInvalidValue;
  const dim3 grid(unsigned((N + kThreads - 1) / kThreads), unsigned(L));
  const bool built = hashgrid::with_shape(D, F, [&](auto dims, auto feats) {
    auto* kernel = &hash_encode_forward_kernel<decltype(dims)::value, decltype(feats)::value>;
    SPLAT_LAUNCH(kernel, grid, dim3(kThreads), stream, N, L, S, x, table, scales, res, out);
  });
  return built ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace splat_cuda
